"""Building blocks of NICE-GAN, matching the PyTorch original numerically.

Owns: PyTorch-default initialisers, reflection padding, the convolution and linear layers with optional
spectral normalisation (power iteration by hand, so the CAM block can read the raw weight), the ILN and
AdaILN normalisations with softmax-parameterised mixing weights and unbiased variances, the AdaILN
residual block and PixelShuffle with PyTorch's channel order. How a convolution is computed is a
function the layers are given (`conv`, from `convolutions`: XLA's own, or the faster paths on a CPU);
every implementation gives the same values up to float rounding.

Layout is NHWC. Kernels are stored as (kh, kw, in, out) and dense weights as (in, out); the spectral-norm
vectors keep PyTorch's layout (`u`: out, `v`: in*kh*kw flattened in (in, kh, kw) order) so that they port
one to one from a PyTorch `weight_u` / `weight_v`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nicegan_jax import convolutions

Dtype = Any

SPECTRAL_EPS = 1e-12
NORM_EPS = 1e-5
SPECTRAL = "spectral"  # the mutable collection that holds the power-iteration vectors u and v


def _uniform(key, shape, bound: float, dtype=jnp.float32) -> jax.Array:
  # Sampled flat, then reshaped: XLA:CPU takes seconds to compile a 4-D threefry draw, not a 1-D one.
  flat = jax.random.uniform(key, (math.prod(shape),), dtype, -bound, bound)
  return flat.reshape(shape)


def torch_kernel_init(key, shape, dtype=jnp.float32) -> jax.Array:
  """PyTorch's Conv2d/Linear weight init, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).

  `shape` is (kh, kw, in, out) or (in, out): the fan-in is the product of all but the last axis.
  """
  return _uniform(key, shape, 1.0 / math.sqrt(math.prod(shape[:-1])), dtype)


def torch_bias_init(fan_in: int):
  """PyTorch's default bias init, U(+-1/sqrt(fan_in)) with the fan-in of the layer's weight."""
  return lambda key, shape, dtype=jnp.float32: _uniform(key, shape, 1.0 / math.sqrt(fan_in), dtype)


def reflect_pad(x: jax.Array, pad: int) -> jax.Array:
  """ReflectionPad2d on an NHWC batch (edge pixel not repeated)."""
  if pad == 0:
    return x
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


def _l2_normalize(x: jax.Array) -> jax.Array:
  """torch.nn.functional.normalize(x, dim=0, eps=1e-12)."""
  return x / jnp.maximum(jnp.linalg.norm(x), SPECTRAL_EPS)


def _unit_gaussian(key, shape, dtype=jnp.float32):
  return _l2_normalize(jax.random.normal(key, shape, dtype))


def spectral_normalize(weight_mat: jax.Array, u: jax.Array, v: jax.Array,
                       update: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Returns (sigma, u, v) as torch.nn.utils.spectral_norm computes them.

  `weight_mat` is (out, in*k*k) in PyTorch's order. With `update` (training mode) one power iteration
  runs first, without gradient; sigma = u . (W v) is then differentiated through W only.
  """
  if update:
    w = jax.lax.stop_gradient(weight_mat)
    v = _l2_normalize(w.T @ u)
    u = _l2_normalize(w @ v)
  sigma = jnp.dot(u, weight_mat @ v)
  return sigma, u, v


def _spectral_vectors(module: nn.Module, out_dim: int, in_dim: int):
  u = module.variable(SPECTRAL, "u", lambda: _unit_gaussian(module.make_rng("params"), (out_dim,)))
  v = module.variable(SPECTRAL, "v", lambda: _unit_gaussian(module.make_rng("params"), (in_dim,)))
  return u, v


def _apply_spectral_norm(module: nn.Module, weight_mat: jax.Array, update_stats: bool) -> jax.Array:
  """Returns sigma for `weight_mat` and advances the module's u/v when `update_stats` is set."""
  u, v = _spectral_vectors(module, *weight_mat.shape)
  if module.is_initializing():
    update_stats = False
  sigma, new_u, new_v = spectral_normalize(weight_mat, u.value, v.value, update_stats)
  if update_stats:
    u.value, v.value = new_u, new_v
  return sigma



class Conv(nn.Module):
  """Conv2d with padding 0 after an explicit reflection pad, optionally spectral-normalised.

  Params: `kernel` (kh, kw, in, out), `bias` (out). With `spectral_norm` the kernel is PyTorch's
  `weight_orig` and the u/v vectors live in the `spectral` collection. `conv` computes the convolution,
  `(x, kernel, stride) -> y` with VALID padding: XLA's own by default, or `convolutions.CpuConvolutions`
  (`convolutions.for_impl`); it changes no value beyond rounding.
  """
  features: int
  kernel_size: int
  stride: int = 1
  pad: int = 0
  use_bias: bool = True
  spectral_norm: bool = False
  dtype: Dtype = jnp.float32
  conv: Callable = convolutions.conv_valid

  @nn.compact
  def __call__(self, x: jax.Array, update_stats: bool = False) -> jax.Array:
    in_features = x.shape[-1]
    k = self.kernel_size
    fan_in = in_features * k * k
    kernel = self.param("kernel", torch_kernel_init, (k, k, in_features, self.features))
    if self.spectral_norm:
      # PyTorch reshapes (out, in, kh, kw) to (out, in*kh*kw).
      weight_mat = jnp.transpose(kernel, (3, 2, 0, 1)).reshape(self.features, -1)
      kernel = kernel / _apply_spectral_norm(self, weight_mat, update_stats)
    x = reflect_pad(x, self.pad).astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    y = self.conv(x, kernel, self.stride)
    if self.use_bias:
      bias = self.param("bias", torch_bias_init(fan_in), (self.features,))
      y = y + bias.astype(self.dtype)
    return y


class Dense(nn.Module):
  """nn.Linear with PyTorch init; `kernel` is (in, out). No spectral norm here (see CAMLinear)."""
  features: int
  use_bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", torch_kernel_init, (x.shape[-1], self.features))
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", torch_bias_init(x.shape[-1]), (self.features,)).astype(self.dtype)
    return y


class SpectralLinear(nn.Module):
  """Spectral-normalised nn.Linear without bias, returning (output, raw weight).

  The CAM block needs both: its logit uses W / sigma, while the original multiplies the features by
  `list(fc.parameters())[0]`, which after `spectral_norm` is the raw `weight_orig` (the CAM weight quirk).
  The raw weight is returned with PyTorch's (out, in) shape.
  """
  features: int

  @nn.compact
  def __call__(self, x: jax.Array, update_stats: bool = False) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", torch_kernel_init, (x.shape[-1], self.features))
    weight_mat = kernel.T  # (out, in), PyTorch's Linear.weight
    sigma = _apply_spectral_norm(self, weight_mat, update_stats)
    return x @ (kernel / sigma), weight_mat


def _unbiased_moments(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  mean = jnp.mean(x, axis=axes, keepdims=True)
  var = jnp.var(x, axis=axes, keepdims=True, ddof=1)  # torch.var's default is unbiased
  return mean, var


def instance_layer_mix(x: jax.Array, rho_logits: jax.Array) -> jax.Array:
  """softmax(rho)[IN] * InstanceNorm(x) + softmax(rho)[LN] * LayerNorm(x), without affine.

  `x` is NHWC, `rho_logits` (C, 2). Statistics in float32 with the unbiased variance and eps 1e-5.
  """
  x = x.astype(jnp.float32)
  in_mean, in_var = _unbiased_moments(x, (1, 2))
  ln_mean, ln_var = _unbiased_moments(x, (1, 2, 3))
  out_in = (x - in_mean) / jnp.sqrt(in_var + NORM_EPS)
  out_ln = (x - ln_mean) / jnp.sqrt(ln_var + NORM_EPS)
  rho = jax.nn.softmax(rho_logits, axis=-1)
  return rho[:, 0] * out_in + rho[:, 1] * out_ln


def _rho_init(in_logit: float, ln_logit: float):
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.broadcast_to(jnp.asarray([in_logit, ln_logit], dtype), shape)

  return init


class ILN(nn.Module):
  """Instance-Layer Norm with its own per-channel gamma (init 1) and beta (init 0); rho logits (1.0, 3.2)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    rho = self.param("rho", _rho_init(1.0, 3.2), (c, 2))
    gamma = self.param("gamma", nn.initializers.ones, (c,))
    beta = self.param("beta", nn.initializers.zeros, (c,))
    return (instance_layer_mix(x, rho) * gamma + beta).astype(x.dtype)


class AdaILN(nn.Module):
  """Adaptive ILN: gamma/beta (B, C) come from the generator's MLP; rho logits (3.2, 1.0)."""

  @nn.compact
  def __call__(self, x: jax.Array, gamma: jax.Array, beta: jax.Array) -> jax.Array:
    rho = self.param("rho", _rho_init(3.2, 1.0), (x.shape[-1], 2))
    out = instance_layer_mix(x, rho)
    return (out * gamma[:, None, None, :] + beta[:, None, None, :]).astype(x.dtype)


class ResnetAdaILNBlock(nn.Module):
  """pad, conv3x3 (no bias), AdaILN, ReLU, pad, conv3x3, AdaILN; plus the input (no activation after)."""
  dim: int
  dtype: Dtype = jnp.float32
  conv: Callable = convolutions.conv_valid

  @nn.compact
  def __call__(self, x: jax.Array, gamma: jax.Array, beta: jax.Array) -> jax.Array:
    conv = lambda name: Conv(self.dim, 3, pad=1, use_bias=False, dtype=self.dtype, conv=self.conv, name=name)
    out = conv("conv1")(x)
    out = nn.relu(AdaILN(name="norm1")(out, gamma, beta))
    out = conv("conv2")(out)
    out = AdaILN(name="norm2")(out, gamma, beta)
    return out + x


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
  """torch.nn.PixelShuffle on NHWC: input channel c*r*r + i*r + j goes to channel c at offset (i, j)."""
  b, h, w, crr = x.shape
  if crr % (r * r):
    raise ValueError(f"pixel_shuffle: {crr} channels are not divisible by r*r = {r * r}")
  c = crr // (r * r)
  x = x.reshape(b, h, w, c, r, r)
  x = jnp.transpose(x, (0, 1, 4, 2, 5, 3))
  return x.reshape(b, h * r, w * r, c)
