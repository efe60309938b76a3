"""Layers against small numpy references written here from the PyTorch definitions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import normal
from nicegan_jax import layers


def numpy_iln(x, rho_logits, eps=1e-5):
  """NCHW-free reference: x is NHWC, variances with ddof=1 as torch.var."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  rho = np.exp(rho_logits) / np.exp(rho_logits).sum(-1, keepdims=True)
  for b in range(x.shape[0]):
    s = x[b]
    ln = (s - s.mean()) / np.sqrt(s.var(ddof=1) + eps)
    for c in range(x.shape[-1]):
      ch = s[..., c]
      inn = (ch - ch.mean()) / np.sqrt(ch.var(ddof=1) + eps)
      out[b, ..., c] = rho[c, 0] * inn + rho[c, 1] * ln[..., c]
  return out


def test_iln_matches_numpy_with_unbiased_variance():
  x = normal(0, (2, 5, 6, 4)) * 3 + 1
  variables = layers.ILN().init(jax.random.PRNGKey(1), x)
  rho = np.array([[0.3, -1.0], [2.0, 0.5], [1.0, 3.2], [0.0, 0.0]], np.float32)
  gamma = np.array([1.0, 2.0, -0.5, 0.1], np.float32)
  beta = np.array([0.0, 0.3, 1.0, -2.0], np.float32)
  params = {"params": {"rho": rho, "gamma": gamma, "beta": beta}}
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, params)
  got = layers.ILN().apply(params, x)
  want = numpy_iln(x, rho) * gamma + beta
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # A biased variance would be visibly off at this tiny spatial size.
  biased = (np.asarray(x) - np.asarray(x).mean((1, 2), keepdims=True)) / np.sqrt(
      np.asarray(x).var((1, 2), keepdims=True) + 1e-5)
  assert not np.allclose(got, biased * gamma + beta, atol=1e-3)


def test_iln_and_adailn_rho_init():
  x = jnp.ones((1, 4, 4, 3))
  iln = layers.ILN().init(jax.random.PRNGKey(0), x)["params"]
  np.testing.assert_array_equal(iln["rho"], np.tile([1.0, 3.2], (3, 1)).astype(np.float32))
  np.testing.assert_array_equal(iln["gamma"], np.ones(3))
  np.testing.assert_array_equal(iln["beta"], np.zeros(3))
  ada = layers.AdaILN().init(jax.random.PRNGKey(0), x, jnp.ones((1, 3)), jnp.zeros((1, 3)))["params"]
  np.testing.assert_array_equal(ada["rho"], np.tile([3.2, 1.0], (3, 1)).astype(np.float32))
  assert set(ada) == {"rho"}  # AdaILN owns no affine: gamma/beta come from the MLP
  np.testing.assert_allclose(jax.nn.softmax(ada["rho"])[0], [0.9002495, 0.0997505], rtol=1e-6)


def test_adailn_uses_per_sample_gamma_beta():
  x = normal(2, (2, 4, 3, 5))
  rho = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
  gamma = np.random.default_rng(1).normal(size=(2, 5)).astype(np.float32)
  beta = np.random.default_rng(2).normal(size=(2, 5)).astype(np.float32)
  got = layers.AdaILN().apply({"params": {"rho": rho}}, x, gamma, beta)
  want = numpy_iln(x, rho) * gamma[:, None, None, :] + beta[:, None, None, :]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_pixel_shuffle_uses_pytorch_channel_order():
  r, c = 2, 3
  x = np.arange(2 * 2 * 3 * c * r * r, dtype=np.float32).reshape(2, 2, 3, c * r * r)
  want = np.zeros((2, 2 * r, 3 * r, c), np.float32)
  for b in range(2):
    for h in range(2):
      for w in range(3):
        for ch in range(c):
          for i in range(r):
            for j in range(r):  # PyTorch: input channel ch*r*r + i*r + j -> (ch, h*r+i, w*r+j)
              want[b, h * r + i, w * r + j, ch] = x[b, h, w, ch * r * r + i * r + j]
  np.testing.assert_array_equal(layers.pixel_shuffle(jnp.asarray(x), r), want)
  with pytest.raises(ValueError, match="not divisible"):
    layers.pixel_shuffle(jnp.zeros((1, 2, 2, 6)), 2)


def test_reflection_pad_does_not_repeat_the_edge():
  x = jnp.arange(3.0).reshape(1, 1, 3, 1)
  x = jnp.broadcast_to(x, (1, 3, 3, 1))
  padded = layers.reflect_pad(x, 1)
  np.testing.assert_array_equal(padded[0, 1, :, 0], [1.0, 0.0, 1.0, 2.0, 1.0])


def numpy_power_iteration(w, u, v):
  norm = lambda a: a / max(np.linalg.norm(a), 1e-12)
  v = norm(w.T @ u)
  u = norm(w @ v)
  return u @ w @ v, u, v


def test_spectral_conv_matches_pytorch_power_iteration():
  x = normal(0, (1, 6, 6, 3))
  conv = layers.Conv(4, 4, stride=2, pad=1, spectral_norm=True)
  variables = conv.init(jax.random.PRNGKey(1), x)
  kernel = np.asarray(variables["params"]["kernel"], np.float64)
  u0 = np.asarray(variables["spectral"]["u"], np.float64)
  v0 = np.asarray(variables["spectral"]["v"], np.float64)
  assert u0.shape == (4,) and v0.shape == (3 * 4 * 4,)
  np.testing.assert_allclose([np.linalg.norm(u0), np.linalg.norm(v0)], [1.0, 1.0], rtol=1e-6)
  w_mat = kernel.transpose(3, 2, 0, 1).reshape(4, -1)  # PyTorch (out, in*kh*kw)

  y, mutated = conv.apply(variables, x, update_stats=True, mutable=["spectral"])
  sigma, u1, v1 = numpy_power_iteration(w_mat, u0, v0)
  np.testing.assert_allclose(mutated["spectral"]["u"], u1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mutated["spectral"]["v"], v1, rtol=1e-5, atol=1e-6)
  bias = np.asarray(variables["params"]["bias"])
  conv_only = layers.Conv(4, 4, stride=2, pad=1).apply({"params": variables["params"]}, x) - bias
  np.testing.assert_allclose(y, conv_only / sigma + bias, rtol=1e-5, atol=1e-5)

  # Inference mode: no power iteration, sigma from the stored vectors.
  y_eval = conv.apply(variables, x)
  np.testing.assert_allclose(y_eval, conv_only / (u0 @ w_mat @ v0) + bias, rtol=1e-5, atol=1e-5)


def test_spectral_norm_converges_to_the_largest_singular_value():
  w = np.random.default_rng(0).normal(size=(5, 12))
  u, v = np.ones(5) / math.sqrt(5), np.ones(12) / math.sqrt(12)
  for _ in range(50):
    sigma, u, v = layers.spectral_normalize(jnp.asarray(w, jnp.float32), u, v, update=True)
  np.testing.assert_allclose(sigma, np.linalg.svd(w, compute_uv=False)[0], rtol=1e-4)


def test_spectral_gradient_flows_through_sigma_only_via_the_weight():
  w = normal(0, (3, 4))
  u, v = jnp.ones(3) / jnp.sqrt(3.0), jnp.ones(4) / 2.0

  def f(w):
    sigma, _, _ = layers.spectral_normalize(w, u, v, update=True)
    return sigma

  # With u, v fixed after the iteration, d sigma / dW = u v^T.
  _, u1, v1 = layers.spectral_normalize(w, u, v, update=True)
  np.testing.assert_allclose(jax.grad(f)(w), np.outer(u1, v1), rtol=1e-5)


def test_pytorch_default_init_bounds():
  x = jnp.zeros((1, 8, 8, 32))
  params = layers.Conv(64, 3, use_bias=True).init(jax.random.PRNGKey(0), x)["params"]
  bound = 1 / math.sqrt(32 * 9)
  k = np.asarray(params["kernel"])
  assert k.shape == (3, 3, 32, 64)
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.98 * bound
  np.testing.assert_allclose(k.std(), bound / math.sqrt(3), rtol=0.03)  # std of U(-b, b)
  assert np.abs(params["bias"]).max() <= bound and np.abs(params["bias"]).max() > 0.8 * bound
  dense = layers.Dense(16).init(jax.random.PRNGKey(0), jnp.zeros((1, 100)))["params"]
  assert dense["kernel"].shape == (100, 16) and "bias" not in dense
  assert np.abs(dense["kernel"]).max() <= 0.1 and np.abs(dense["kernel"]).max() > 0.09
