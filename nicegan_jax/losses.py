"""NICE-GAN's loss terms as small pure functions.

Owns: the LSGAN terms for the discriminator and the generator (means of squared errors over every
element, as `nn.MSELoss()`), and the L1 term used for cycle consistency and reconstruction (mean of
absolute errors over every element, as `nn.L1Loss()`). Weights are applied by the caller.
"""

import jax
import jax.numpy as jnp


def lsgan_discriminator_loss(*, real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """MSE(real, 1) + MSE(fake, 0): push the head's output on real images to 1 and on fakes to 0."""
  return jnp.mean(jnp.square(real_logits - 1.0)) + jnp.mean(jnp.square(fake_logits))


def lsgan_generator_loss(*, fake_logits: jax.Array) -> jax.Array:
  """MSE(fake, 1): the generator wants the head to call its output real."""
  return jnp.mean(jnp.square(fake_logits - 1.0))


def l1_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
  """Mean absolute error over every element (cycle and reconstruction terms)."""
  return jnp.mean(jnp.abs(prediction - target))
