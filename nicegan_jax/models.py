"""The four NICE-GAN networks: discriminators (encoder + CAM + classifier heads) and generators.

Owns: `Discriminator`, `Generator`, the size arithmetic that says which image sizes a discriminator
depth accepts (`discriminator_feature_sizes`), `create_models` (config -> modules) and the pure inference
helpers `encode` / `decode`.

Parameter names mirror the original's state_dict, with '.' replaced by '_' (`Dis1_0.4` -> `Dis1_0_4`),
so the key map to PyTorch is mechanical; it is spelled out in `nicegan_jax/param_map.py`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from nicegan_jax import convolutions, layers

Dtype = Any


def leaky_relu(x: jax.Array, negative_slope: float) -> jax.Array:
  """`jax.nn.leaky_relu`'s formula, inline: the same values and gradients, but no jitted call of
  jax.nn's, which the ONNX converter (jax2onnx 0.13) cannot lower."""
  return jnp.where(x >= 0, x, negative_slope * x)


class DiscriminatorOutput(NamedTuple):
  """What a discriminator returns, in the original's order."""
  local_logits: jax.Array  # (B, 30, 30, 1) at 256 input: the 70x70 PatchGAN head (`conv0`)
  global_logits: jax.Array  # (B, 6, 6, 1) at 256 input: the 286x286 head (`conv1`)
  cam_logit: jax.Array  # (B, 1): the CAM head on [GAP || GMP] of the encoder features
  heatmap: jax.Array  # (B, 64, 64, 1): channel sum of z, for visualisation only
  z: jax.Array  # (B, 64, 64, 2*ch): the code the generators decode


def _down(size: int) -> int:
  """Spatial size after reflection pad 1 and a 4x4 stride-2 conv."""
  return (size + 2 - 4) // 2 + 1


def _same(size: int) -> int:
  """Spatial size after reflection pad 1 and a 4x4 stride-1 conv."""
  return size + 2 - 4 + 1


def discriminator_feature_sizes(img_size: int, n_layers: int) -> dict[str, int]:
  """Spatial sizes inside a discriminator, or a ValueError naming why this size/depth cannot work.

  Checks the original's channel arithmetic (n_layers >= 6), that every reflection pad of 1 sees at
  least 2 pixels (PyTorch refuses otherwise) and that both heads produce at least a 1x1 map.
  """
  if n_layers < 6:
    raise ValueError(f"n_dis={n_layers}: the original discriminator needs n_dis >= 6 (below that its "
                     "channel arithmetic breaks)")
  if img_size % 4:
    raise ValueError(f"img_size={img_size} must be a multiple of 4 (two stride-2 encoder convs and two "
                     "x2 PixelShuffle stages must return the input size)")
  sizes = {"input": img_size}

  def step(size: int, fn, name: str) -> int:
    if size < 2:  # ReflectionPad2d(1) needs at least 2 pixels; then every output is >= 1x1
      raise ValueError(f"img_size={img_size} is too small for n_dis={n_layers}: the {name} layer would "
                       f"reflection-pad a {size}x{size} map; use a larger image or a smaller n_dis")
    return fn(size)

  size = step(step(img_size, _down, "first encoder"), _down, "second encoder")
  sizes["z"] = size
  for _ in range(2, n_layers - 4):
    size = step(size, _down, "shared trunk")
  sizes["trunk"] = size
  sizes["local"] = step(step(size, _same, "local head"), _same, "local output")
  for _ in range(n_layers - 4, n_layers - 2):
    size = step(size, _down, "global downsampling")
  sizes["global"] = step(step(size, _same, "global head"), _same, "global output")
  return sizes


class Discriminator(nn.Module):
  """Discriminator of one domain; its first layers (rows 1-3 of the spec's table) are the encoder.

  `__call__(x, update_stats)` returns a DiscriminatorOutput. With `encode_only` it stops after the
  encoder and returns z alone (what inference needs). `update_stats` runs one power iteration in every
  spectral-normalised layer (training mode); it needs `mutable=["spectral"]`.
  """
  ch: int = 64
  n_layers: int = 7
  dtype: Dtype = jnp.float32
  conv: Callable = convolutions.conv_valid  # how convs are computed (convolutions.for_impl)

  def _sn_conv(self, features: int, stride: int, name: str, use_bias: bool = True, pad: int = 1):
    return layers.Conv(features, 4, stride=stride, pad=pad, use_bias=use_bias, spectral_norm=True,
                       dtype=self.dtype, conv=self.conv, name=name)

  @nn.compact
  def __call__(self, x: jax.Array, update_stats: bool = False, encode_only: bool = False):
    ch, n = self.ch, self.n_layers
    lrelu = lambda t: leaky_relu(t, 0.2)
    x = lrelu(self._sn_conv(ch, 2, "model_1")(x, update_stats))
    x0 = lrelu(self._sn_conv(ch * 2, 2, "model_4")(x, update_stats))

    # CAM block. The logit uses fc's spectrally-normalised weight; the feature weighting uses the raw
    # `weight_orig`, exactly as the original (which reads the first parameter of the SN-wrapped fc).
    x0_f32 = x0.astype(jnp.float32)
    pooled = jnp.concatenate([jnp.mean(x0_f32, axis=(1, 2)), jnp.max(x0_f32, axis=(1, 2))], axis=-1)
    cam_logit, raw_weight = layers.SpectralLinear(1, name="fc")(pooled, update_stats)
    weighted = jnp.concatenate([x0, x0], axis=-1) * raw_weight[0].astype(x0.dtype)
    attention = layers.Conv(ch * 2, 1, use_bias=True, dtype=self.dtype, conv=self.conv,
                            name="conv1x1")(weighted)
    lamda = self.param("lamda", nn.initializers.zeros, (1,))
    z = lrelu(lamda.astype(x0.dtype) * attention + x0)
    if encode_only:
      return z
    heatmap = jnp.sum(z.astype(jnp.float32), axis=-1, keepdims=True)

    h = z
    for i in range(2, n - 4):  # shared trunk `Dis0_0`
      mult = 2 ** (i - 1)
      h = lrelu(self._sn_conv(ch * mult * 2, 2, f"Dis0_0_{3 * (i - 2) + 1}")(h, update_stats))
    g = h
    for i in range(n - 4, n - 2):  # global downsampling `Dis1_0`
      mult = 2 ** (i - 1)
      g = lrelu(self._sn_conv(ch * mult * 2, 2, f"Dis1_0_{3 * (i - n + 4) + 1}")(g, update_stats))
    local = lrelu(self._sn_conv(ch * 2 ** (n - 4), 1, "Dis0_1_1")(h, update_stats))
    g = lrelu(self._sn_conv(ch * 2 ** (n - 2), 1, "Dis1_1_1")(g, update_stats))
    local = self._sn_conv(1, 1, "conv0", use_bias=False)(local, update_stats)
    glob = self._sn_conv(1, 1, "conv1", use_bias=False)(g, update_stats)
    return DiscriminatorOutput(local.astype(jnp.float32), glob.astype(jnp.float32),
                               cam_logit.astype(jnp.float32), heatmap, z)


class Generator(nn.Module):
  """Decoder from a code z (B, S/4, S/4, 2*ch) to an image (B, S, S, 3) in [-1, 1].

  `light` feeds the gamma/beta MLP with the global average of the features; the full variant flattens
  them in PyTorch's (C, H, W) order so the 268M-weight `FC_0` ports one to one.
  """
  ch: int = 64
  n_res: int = 6
  img_size: int = 256
  light: bool = True
  dtype: Dtype = jnp.float32
  remat: bool = False  # recompute the residual blocks' activations in the backward pass (saves memory)
  conv: Callable = convolutions.conv_valid  # how convs are computed (convolutions.for_impl)

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    width = self.ch * 4
    conv = lambda f, k, name, bias: layers.Conv(f, k, pad=(k - 1) // 2, use_bias=bias, dtype=self.dtype,
                                                conv=self.conv, name=name)
    x = nn.relu(layers.ILN(name="UpBlock0_2")(conv(width, 3, "UpBlock0_1", True)(z)))

    if self.light:
      mlp_in = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    else:
      mlp_in = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    h = nn.relu(layers.Dense(width, dtype=self.dtype, name="FC_0")(mlp_in))
    h = nn.relu(layers.Dense(width, dtype=self.dtype, name="FC_2")(h))
    gamma = layers.Dense(width, dtype=self.dtype, name="gamma")(h).astype(jnp.float32)
    beta = layers.Dense(width, dtype=self.dtype, name="beta")(h).astype(jnp.float32)

    block = nn.remat(layers.ResnetAdaILNBlock) if self.remat else layers.ResnetAdaILNBlock
    for i in range(1, self.n_res + 1):
      x = block(width, dtype=self.dtype, conv=self.conv, name=f"UpBlock1_{i}")(x, gamma, beta)

    for stage, half in enumerate((width // 2, width // 4)):
      base = 8 * stage
      x = conv(half, 3, f"UpBlock2_{base + 1}", False)(x)
      x = nn.relu(layers.ILN(name=f"UpBlock2_{base + 2}")(x))
      x = conv(half * 4, 1, f"UpBlock2_{base + 4}", True)(x)
      x = layers.pixel_shuffle(x, 2)
      x = nn.relu(layers.ILN(name=f"UpBlock2_{base + 6}")(x))
    x = conv(3, 7, "UpBlock2_17", False)(x)
    return jnp.tanh(x.astype(jnp.float32))


class Models(NamedTuple):
  """The module definitions (stateless); parameters live in the train state."""
  disA: Discriminator
  disB: Discriminator
  gen2A: Generator
  gen2B: Generator


def create_models(model_config, conv: Callable | None = None) -> Models:
  """Maps `config.model` (ch, n_res, n_dis, img_size, light, dtype, remat, conv_impl) to the four
  modules. `conv` replaces the convolution `conv_impl` picks (a benchmark's `CpuConvolutions(policy)`)."""
  dtype = jnp.dtype(model_config.dtype)
  conv = conv or convolutions.for_impl(model_config.conv_impl)
  disc = Discriminator(ch=model_config.ch, n_layers=model_config.n_dis, dtype=dtype, conv=conv)
  gen = Generator(ch=model_config.ch, n_res=model_config.n_res, img_size=model_config.img_size,
                  light=model_config.light, dtype=dtype, remat=bool(model_config.remat),
                  conv=conv)
  return Models(disA=disc, disB=disc, gen2A=gen, gen2B=gen)


def encode(disc: Discriminator, disc_variables: dict, images: jax.Array) -> jax.Array:
  """z of `images` under a discriminator's encoder, in inference mode (no power iteration)."""
  return disc.apply(disc_variables, images, update_stats=False, encode_only=True)


def decode(gen: Generator, gen_params: dict, z: jax.Array) -> jax.Array:
  """A generator's image for code z."""
  return gen.apply({"params": gen_params}, z)
