"""The loss terms against hand-computed values, and how the D and G losses weigh and name them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from nicegan_jax import losses, models, step, train_state


def test_lsgan_discriminator_term():
  # MSE(real, 1) = mean(0.25, 0.25) = 0.25; MSE(fake, 0) = mean(0, 4) = 2.
  value = losses.lsgan_discriminator_loss(real_logits=jnp.array([[1.5, 0.5]]),
                                          fake_logits=jnp.array([[0.0, 2.0]]))
  assert float(value) == pytest.approx(2.25)


def test_lsgan_generator_term():
  # MSE(fake, 1) = mean(1, 0, 4) = 5/3.
  assert float(losses.lsgan_generator_loss(fake_logits=jnp.array([0.0, 1.0, 3.0]))) == pytest.approx(5 / 3)


def test_l1_term():
  # mean(|1|, |-1|, |0.5|, |0|) = 2.5 / 4.
  assert float(losses.l1_loss(jnp.array([1.0, -1.0, 0.5, 2.0]), jnp.array([0.0, 0.0, 0.0, 2.0]))) == 0.625


def test_terms_are_means_over_every_element_as_torch_losses():
  """nn.MSELoss() and nn.L1Loss() average over batch, positions and channels alike."""
  logits = jnp.full((2, 30, 30, 1), 3.0).at[0, 0, 0, 0].set(1.0)  # one element already at the target
  expected = (2 * 30 * 30 - 1) * 4.0 / (2 * 30 * 30)
  assert float(losses.lsgan_generator_loss(fake_logits=logits)) == pytest.approx(expected)
  images = jnp.zeros((2, 8, 8, 3)).at[1].set(1.0)
  assert float(losses.l1_loss(images, jnp.zeros_like(images))) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def tiny():
  config = test_config.get_config()
  nets = models.create_models(config.model)
  state = train_state.create_train_state(config, jax.random.PRNGKey(0), nets)
  rng = np.random.default_rng(0)
  batch = {d: jnp.asarray(rng.uniform(-1, 1, (1, 64, 64, 3)), jnp.float32) for d in "AB"}
  return nets, state, batch


def test_the_discriminator_loss_is_the_weighted_sum_of_its_six_terms(tiny):
  nets, state, batch = tiny
  loss, (_, metrics) = step.discriminator_loss(state.disc_params, state.spectral, state.gen_params, batch,
                                               models=nets, adv_weight=0.5)
  terms = [f"D/adv_{d}_{h}" for d in "AB" for h in step.HEADS]
  assert sorted(k for k in metrics if k != "D/loss") == sorted(terms)
  assert float(loss) == pytest.approx(0.5 * sum(float(metrics[t]) for t in terms), rel=1e-6)


def test_the_generator_loss_weighs_and_names_its_terms(tiny):
  nets, state, batch = tiny
  loss, (_, metrics, images) = step.generator_loss(
      state.gen_params, state.disc_params, state.spectral, batch, models=nets, adv_weight=1.0,
      cycle_weight=10.0, recon_weight=3.0)
  adv = sum(float(metrics[f"G/adv_{d}_{h}"]) for d in "AB" for h in step.HEADS)
  cycle = float(metrics["G/cycle_A"]) + float(metrics["G/cycle_B"])
  recon = float(metrics["G/recon_A"]) + float(metrics["G/recon_B"])
  assert float(loss) == pytest.approx(adv + 10.0 * cycle + 3.0 * recon, rel=1e-6)
  # G/cycle_A scores A -> B -> A against real A; G/recon_A scores A -> A against real A.
  assert float(metrics["G/cycle_A"]) == pytest.approx(float(losses.l1_loss(images["fake_A2B2A"], batch["A"])))
  assert float(metrics["G/recon_B"]) == pytest.approx(float(losses.l1_loss(images["fake_B2B"], batch["B"])))
