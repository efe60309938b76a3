"""nicegan_jax: NICE-GAN ("Reusing Discriminators for Encoding", CVPR 2020) in JAX/Flax.

The inference API is re-exported here: `load_translator(workdir)` then `translate(translator, images)`.
"""

from nicegan_jax.inference import Translator, load_translator, translate

__all__ = ["Translator", "load_translator", "translate"]
