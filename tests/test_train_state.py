"""Learning-rate schedule and the coupled-weight-decay Adam, against numbers worked out here."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from nicegan_jax import config_lib, train_state


def lr_at(step, **overrides):
  config = default.get_config().optimizer
  config.update(overrides)
  return float(train_state.learning_rate_fn(config, 300_000)(step))


@pytest.mark.parametrize("step,expected", [
    (1, 1e-4), (150_000, 1e-4),  # constant for the first half
    (150_001, 1e-4 * 149_999 / 150_000),  # the original: lr0 - lr0/half at the first decayed step
    (225_000, 0.5e-4), (300_000, 0.0), (310_000, 0.0),
])
def test_original_schedule(step, expected):
  assert lr_at(step) == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_schedule_options():
  assert lr_at(250_000, decay_flag=False) == pytest.approx(1e-4)
  assert lr_at(100_000, decay_start_step=100_000) == pytest.approx(1e-4)
  assert lr_at(200_000, decay_start_step=100_000) == pytest.approx(0.5e-4)


def torch_adam_reference(param, grads, lr, wd, b1=0.5, b2=0.999, eps=1e-8):
  """torch.optim.Adam(weight_decay=wd), written out: L2 added to the gradient before the moments."""
  m = np.zeros_like(param)
  v = np.zeros_like(param)
  for t, g in enumerate(grads, start=1):
    g = g + wd * param
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    param = param - lr * m_hat / (np.sqrt(v_hat) + eps)
  return param


def test_coupled_weight_decay_equals_torch_adam():
  config = default.get_config().optimizer
  config.weight_decay = 0.1  # large, so coupled vs decoupled decay differ clearly
  tx = train_state.create_optimizer(config, num_steps=100)
  param = np.array([1.0, -2.0, 0.5], np.float64)
  grads = [np.array([0.1, 0.2, -0.3]), np.array([-0.2, 0.0, 0.1]), np.array([0.05, 0.05, 0.05])]
  p = jnp.asarray(param, jnp.float32)
  opt_state = tx.init(p)
  for g in grads:
    updates, opt_state = tx.update(jnp.asarray(g, jnp.float32), opt_state, p)
    p = optax.apply_updates(p, updates)
  want = torch_adam_reference(param, grads, lr=1e-4, wd=0.1)
  np.testing.assert_allclose(p, want, rtol=1e-6)
  # First step by hand: g + wd*p = [0.2, 0.0, -0.25]; Adam's first step is lr * sign(g) where g != 0.
  first, _ = tx.update(jnp.asarray(grads[0], jnp.float32), tx.init(jnp.asarray(param, jnp.float32)),
                       jnp.asarray(param, jnp.float32))
  np.testing.assert_allclose(first, [-1e-4, 0.0, 1e-4], atol=1e-9)
  # AdamW (decoupled) would not match.
  adamw = optax.adamw(1e-4, b1=0.5, b2=0.999, weight_decay=0.1)
  q, s = jnp.asarray(param, jnp.float32), adamw.init(jnp.asarray(param, jnp.float32))
  for g in grads:
    u, s = adamw.update(jnp.asarray(g, jnp.float32), s, q)
    q = optax.apply_updates(q, u)
  assert not np.allclose(q, want, rtol=1e-7, atol=1e-7)


def test_optimizer_schedule_counts_from_the_first_iteration():
  config = default.get_config().optimizer
  config.weight_decay = 0.0
  config.decay_start_step = 0
  tx = train_state.create_optimizer(config, num_steps=4)  # lr(s) = 1e-4 * (4 - s) / 4
  p = jnp.zeros(())
  opt_state = tx.init(p)
  sizes = []
  for _ in range(4):
    updates, opt_state = tx.update(jnp.ones(()), opt_state, p)
    sizes.append(-float(updates))
  np.testing.assert_allclose(sizes, [0.75e-4, 0.5e-4, 0.25e-4, 0.0], rtol=1e-5, atol=1e-12)


def test_disc_lr_scale_sets_only_the_discriminator_learning_rate():
  config = default.get_config()
  config.optimizer.weight_decay = 0.0
  config.optimizer.decay_flag = False
  p = jnp.zeros(())
  sizes = {}
  for scale in (1.0, 4.0):
    config.optimizer.disc_lr_scale = scale
    g_tx, d_tx = train_state.optimizers(config)
    for name, tx in (("G", g_tx), ("D", d_tx)):
      updates, _ = tx.update(jnp.ones(()), tx.init(p), p)  # Adam's first step moves by lr exactly
      sizes[name, scale] = -float(updates)
  np.testing.assert_allclose([sizes["G", 1.0], sizes["D", 1.0], sizes["G", 4.0], sizes["D", 4.0]],
                             [1e-4, 1e-4, 1e-4, 4e-4], rtol=1e-5)
  saved = config.to_dict()
  del saved["optimizer"]["disc_lr_scale"]  # a config written before the option: the original's equal rates
  assert train_state.disc_lr_scale(config_lib.with_defaults(saved).optimizer) == 1.0
