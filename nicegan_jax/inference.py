"""Inference: load a trained translator and translate images, one or a batch, at any size.

Owns: `Translator` (the config and, per direction, the source discriminator's encoder variables and the
target generator's params), `load_translator(path)` (from a workdir or one checkpoint folder, config
included), `translate(translator, images, direction)` with its input contract, `attention` (where the
source encoder looks: the CAM heatmap), and the jitted networks they run at the work size
(`translate_at_work_size`, `attention_at_work_size`). The folder and test-split commands built
on it are in `translate_files`.

The contract of `translate`: images are (H, W, 3) or (N, H, W, 3), either uint8 in [0, 255] or floating
point in [-1, 1]; the output has the same shape and dtype. By default the input is resized to the
training size, translated and resized back, so the output has the input's size and aspect ratio
(`native=True`: translate at the input's own size rounded up to a multiple of 4, light models only).
The resizing runs on the host with PIL's filter, as training's (`resize_images`).
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nicegan_jax import checkpoints, config_lib, input_pipeline, visualize
from nicegan_jax import models as models_lib
from nicegan_jax import train_state as train_state_lib

DIRECTIONS = ("A2B", "B2A")


def domains(direction: str) -> tuple[str, str]:
  """(source, target) domain of a direction: ("A", "B") for "A2B"."""
  return direction[0], direction[-1]


def network_names(direction: str) -> tuple[str, str]:
  """(encoder, generator) of a direction: A2B encodes with disA and decodes with gen2B."""
  source, target = domains(direction)
  return f"dis{source}", f"gen2{target}"


class Translator(NamedTuple):
  """What inference needs: per direction the source encoder and the target generator."""
  config: ml_collections.ConfigDict
  models: models_lib.Models
  encoders: dict[str, Any]  # "A2B" -> disA's variables (params + spectral), "B2A" -> disB's
  generators: dict[str, Any]  # "A2B" -> gen2B's params, "B2A" -> gen2A's
  step: int | None = None  # the training step of the checkpoint it was read from


def load_translator(path: str | pathlib.Path) -> Translator:
  """Reads the config and only the inference weights (no optimiser state) from a workdir's newest
  readable checkpoint, or from one checkpoint folder (`checkpoints.restore_for_inference`)."""
  def wanted(config_dict):
    config = config_lib.with_defaults(config_dict)
    config_lib.validate_model(config.model)
    shapes = jax.eval_shape(lambda: train_state_lib.init_network_variables(
        models_lib.create_models(config.model), config.model.img_size, jax.random.PRNGKey(0)))
    return dict(zip(("gen_params", "disc_params", "spectral"), shapes))

  config_dict, state, step = checkpoints.restore_for_inference(path, wanted)
  config = config_lib.with_defaults(config_dict)
  models = models_lib.create_models(config.model)
  encoders, generators = {}, {}
  for direction in DIRECTIONS:
    disc, gen = network_names(direction)
    encoders[direction] = {"params": state["disc_params"][disc], "spectral": state["spectral"][disc]}
    generators[direction] = state["gen_params"][gen]
  return Translator(config, models, encoders, generators, step)


def translator_from_state(config, models: models_lib.Models, state) -> Translator:
  """The Translator of a live TrainState (e.g. at the end of training)."""
  names = {d: network_names(d) for d in DIRECTIONS}
  return Translator(config, models, {d: state.disc_variables(disc) for d, (disc, _) in names.items()},
                    {d: state.gen_params[gen] for d, (_, gen) in names.items()}, int(state.step))


def check_images(images) -> tuple[np.ndarray, bool]:
  """Validates the input contract; returns (NHWC array, whether the input was a single image)."""
  if isinstance(images, (str, pathlib.Path)):
    raise ValueError(f"images must be an array, not a path ({images!r}): read the file first, or use "
                     "translate_files.translate_folder for files and folders")
  try:
    images = np.asarray(images)
  except ValueError as e:  # numpy refuses ragged nestings
    raise ValueError("images must form one array: a list of images of different sizes (or with "
                     "something else in it) cannot form one batch; translate them one at a time") from e
  if images.dtype == object:
    raise ValueError("images must be an array of numbers; got Python objects (None, or images of "
                     "different sizes?): translate images of different sizes one at a time")
  if images.ndim not in (3, 4):
    raise ValueError(f"images must be (H, W, 3) or (N, H, W, 3); got shape {images.shape}")
  single = images.ndim == 3
  batch = images[None] if single else images
  if batch.shape[-1] != 3:
    raise ValueError(f"images must have 3 (RGB) channels last; got shape {images.shape}")
  if min(batch.shape[1:3]) < 4 or batch.shape[0] == 0:
    raise ValueError(f"images must be at least 4x4 and the batch non-empty; got shape {images.shape}")
  if batch.dtype == np.uint8:
    return batch, single
  if not np.issubdtype(batch.dtype, np.floating):
    raise ValueError(f"images must be uint8 in [0, 255] or floating point in [-1, 1]; got {batch.dtype}")
  if not np.all(np.isfinite(batch)):
    raise ValueError("images contain NaN or infinite values")
  lo, hi = float(batch.min()), float(batch.max())
  if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
    raise ValueError(f"floating-point images must lie in [-1, 1]; got values in [{lo:.3f}, {hi:.3f}] "
                     "(for [0, 255] data pass uint8)")
  return batch, single


def check_native(translator: Translator, native: bool) -> None:
  if native and not translator.config.model.light:
    raise ValueError("native-resolution translation needs a light model: the full model's MLP is "
                     f"tied to img_size={translator.config.model.img_size}")


def translation_size(height: int, width: int, img_size: int, native: bool) -> tuple[int, int]:
  if not native:
    return img_size, img_size
  return -(-height // 4) * 4, -(-width // 4) * 4  # rounded up to a multiple of 4


def chunk_size(backend: str) -> int | None:
  """Largest batch translated in one call: 8 on CPUs, unlimited elsewhere.

  XLA:CPU's convolutions lose throughput on large batches (`benchmarks/speed.py`: 32 images in one call
  translate at two thirds the rate of 8 at a time at 64x64, at half the rate of one at a time at
  128x128); accelerators gain from them. Most of that loss was the narrow convolutions, which now run
  as output taps on a CPU (`convolutions.conv_output_taps`), so the chunking mainly bounds memory.
  """
  return 8 if backend == "cpu" else None


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of an NHWC batch to `size` with PIL, antialiased when shrinking, as the training
  and test transforms (`input_pipeline.resize`, torchvision's Resize): uint8 as RGB images, float32
  channel by channel in PIL's float mode (no rounding).

  On the host, so that an input of a new size costs no compilation: the networks are compiled once
  per batch size at the size they work at (seconds for a 256px model), which a folder of photos of
  many sizes would otherwise pay per photo.
  """
  if tuple(images.shape[1:3]) == tuple(size):
    return images
  resize = lambda image: input_pipeline.resize(image, size)
  if images.dtype == np.uint8:
    return np.stack([resize(image) for image in images])
  return np.stack([np.stack([resize(np.ascontiguousarray(image[..., c], np.float32))
                             for c in range(image.shape[-1])], axis=-1) for image in images])


def translate_network(encoder, generator, images, *, models, direction):
  """[-1, 1] float32 NHWC, at the size the networks work at -> translated, in [-1, 1]: the source
  encoder, then the target generator (unjitted: what the exports trace)."""
  disc, gen = (getattr(models, name) for name in network_names(direction))
  return jnp.clip(models_lib.decode(gen, generator, models_lib.encode(disc, encoder, images)), -1.0, 1.0)


translate_at_work_size = jax.jit(translate_network, static_argnames=("models", "direction"))


@functools.partial(jax.jit, static_argnames=("models", "direction"))
def attention_at_work_size(encoder, images, *, models, direction):
  """[-1, 1] float32 NHWC -> (N, h, w, 1): the channel sum of the source encoder's code z (the CAM
  heatmap of the sample grids), scaled to [0, 1] per image."""
  disc = getattr(models, network_names(direction)[0])
  heatmap = jnp.sum(models_lib.encode(disc, encoder, images).astype(jnp.float32), axis=-1, keepdims=True)
  return visualize.scale_per_image(heatmap)


def check_direction(direction: str) -> None:
  if direction not in DIRECTIONS:
    raise ValueError(f"direction must be one of {DIRECTIONS}; got {direction!r}")


def run_at_work_size(network, batch: np.ndarray, work_size: tuple[int, int]) -> np.ndarray:
  """`network` ([-1, 1] float32 NHWC at `work_size` -> NHWC) over a checked batch (`check_images`):
  resized to the work size on the host (uint8 as training resizes it, then scaled to [-1, 1]) and run
  `chunk_size` images at a time. Returns the network's outputs at the work size, a new array."""
  x = resize_images(batch if batch.dtype == np.uint8 else batch.astype(np.float32), work_size)
  x = input_pipeline.to_unit_range(x) if batch.dtype == np.uint8 else x
  run = lambda chunk: np.asarray(network(jnp.asarray(chunk)))
  return np.concatenate([run(chunk)[:n] for chunk, n in input_pipeline.padded_chunks(
      x, chunk_size(jax.default_backend()))])


def attention(translator: Translator, images, direction: str = "A2B") -> np.ndarray:
  """Where the source discriminator's encoder attends, for one image (H, W, 3) or a batch (N, H, W, 3)
  under `translate`'s input contract: float32 (H, W) or (N, H, W) in [0, 1], at the input's size (the
  encoder's map at a quarter of the work size, resized bilinearly on the host)."""
  check_direction(direction)
  batch, single = check_images(images)
  size = translator.config.model.img_size
  maps = run_at_work_size(functools.partial(attention_at_work_size, translator.encoders[direction],
                                            models=translator.models, direction=direction),
                          batch, (size, size))
  maps = np.clip(resize_images(maps, batch.shape[1:3])[..., 0], 0.0, 1.0)
  return maps[0] if single else maps


def translate(translator: Translator, images, direction: str = "A2B", *, native: bool = False):
  """Translates one image (H, W, 3) or a batch (N, H, W, 3); returns the same shape and dtype.

  uint8 in -> uint8 out ([0, 255]); float in -> float out ([-1, 1]). Resizing to the work size and back
  runs on the host (`resize_images`), so the networks compile once per batch size, whatever the input
  sizes; on a CPU a batch of more than 8 images is translated 8 at a time (`chunk_size`).
  `native` (light models only) translates at the input's size rounded up to a multiple of 4 instead of
  at the training size.
  """
  check_direction(direction)
  check_native(translator, native)
  batch, single = check_images(images)
  dtype = batch.dtype
  input_size = batch.shape[1:3]
  work_size = translation_size(*input_size, translator.config.model.img_size, native)
  network = functools.partial(translate_at_work_size, translator.encoders[direction],
                              translator.generators[direction], models=translator.models,
                              direction=direction)
  y = run_at_work_size(network, batch, work_size)
  y = resize_images(y, input_size)  # a new array either way (concatenated or resized): ours to change
  np.clip(y, -1.0, 1.0, out=y)
  y = input_pipeline.from_unit_range(y) if dtype == np.uint8 else y.astype(dtype)
  return y[0] if single else y
