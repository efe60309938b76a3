"""nicegan_jax: NICE-GAN ("Reusing Discriminators for Encoding", CVPR 2020) in JAX/Flax."""
