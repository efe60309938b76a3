"""Exporting a translator as one self-contained file that runs with JAX alone, on CPU, GPU or TPU.

Owns: `export_translator(translator, direction, platforms)`, the `jax.export.Exported` of one
direction's network (the source domain's encoder and the target generator, their weights inside the
program, any batch size), and `write_exported(exported, path)`. The file needs neither this library nor
Flax to run:

    from jax import export
    with open("horse2zebra.jaxexport", "rb") as f:
      translate = export.deserialize(f.read())
    zebras = translate.call(horses)  # float32 (N, S, S, 3) in [-1, 1] -> the same; S: the training size

The program is the network at its training size on [-1, 1] images; resizing and uint8 conversion are
the caller's (`inference.translate` does both). Convolutions are XLA's own, the path GPUs and TPUs
run (`convolutions.conv_valid`), so one file serves every platform it was exported for.
"""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
from jax import export as jax_export

from nicegan_jax import inference
from nicegan_jax import models as models_lib

PLATFORMS = ("cpu", "cuda", "tpu")
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def check_platforms(platforms) -> tuple[str, ...]:
  platforms = tuple(platforms)
  unknown = [p for p in platforms if p not in KNOWN_PLATFORMS]
  if not platforms or unknown:
    raise ValueError(f"platforms must be some of {KNOWN_PLATFORMS}; got {platforms}")
  return platforms


def export_translator(translator: inference.Translator, direction: str = "A2B",
                      platforms=PLATFORMS) -> jax_export.Exported:
  """The program `images -> translated` of `direction` (float32 (N, S, S, 3) in [-1, 1], N symbolic)."""
  if direction not in inference.DIRECTIONS:
    raise ValueError(f"direction must be one of {inference.DIRECTIONS}; got {direction!r}")
  platforms = check_platforms(platforms)
  model_config = ml_collections.ConfigDict(translator.config.model.to_dict())
  model_config.conv_impl = "xla"  # the portable convolutions, whatever machine exports
  models = models_lib.create_models(model_config)
  encoder, generator = translator.encoders[direction], translator.generators[direction]

  def translate(images):
    return inference.translate_at_work_size(encoder, generator, images, models=models, direction=direction)

  size = model_config.img_size
  batch, = jax_export.symbolic_shape("batch")
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  return jax_export.export(jax.jit(translate), platforms=platforms)(images)


def check_output(path: str | pathlib.Path, overwrite: bool = False) -> pathlib.Path:
  """`path` as a Path, refused when it is a folder, or an existing file unless `overwrite`."""
  path = pathlib.Path(path).expanduser()
  if path.is_dir():
    raise ValueError(f"{path} is a folder: give the exported program a file name")
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; give another file name, or --overwrite to replace it")
  return path


def write_exported(exported: jax_export.Exported, path: str | pathlib.Path, *,
                   overwrite: bool = False) -> pathlib.Path:
  """Serialises `exported` to `path` (an existing file only with `overwrite`), written under a
  temporary name and renamed when complete."""
  path = check_output(path, overwrite)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + ".partial")
  partial.write_bytes(exported.serialize())
  os.replace(partial, path)
  return path
