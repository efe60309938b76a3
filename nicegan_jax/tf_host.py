"""TensorFlow on the host only: clu's metric writers and the TFDS builders import it, and it must never
claim the GPU memory that JAX preallocates.

`requirements.txt` pins `tensorflow-cpu`, which sees no GPU; a machine with a GPU build of TensorFlow
(Colab, most CUDA images) would otherwise map nearly all of every GPU's memory the first time it runs
an op (a summary write, a TFDS preparation), and JAX then runs out of memory, or the reverse. Every place
that hands work to TensorFlow calls `keep_tensorflow_on_host()` first.
"""

import functools
import logging


@functools.cache
def keep_tensorflow_on_host() -> None:
  """Hides every GPU from TensorFlow (once per process), before TensorFlow initialises its devices."""
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError as e:  # TensorFlow ran an op before this call: its devices are already fixed
    if tf.config.get_visible_devices("GPU"):
      logging.warning("TensorFlow already holds GPU(s) and may take their memory from JAX: %s", e)
