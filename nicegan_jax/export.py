"""Exporting a translator as one self-contained file: a JAX program, or an ONNX model.

Owns: `export_translator(translator, direction, platforms)`, the `jax.export.Exported` of one
direction's network (the source domain's encoder and the target generator, their weights inside the
program, any batch size), `export_onnx(translator, direction)`, the same network as an ONNX model, and
the writing of either (`write_exported`, `write_onnx`). A JAX program needs neither this library nor
Flax to run:

    from jax import export
    with open("horse2zebra.jaxexport", "rb") as f:
      translate = export.deserialize(f.read())
    zebras = translate.call(horses)  # float32 (N, S, S, 3) in [-1, 1] -> the same; S: the training size

The program is the network at its training size on [-1, 1] images; resizing and uint8 conversion are
the caller's (`inference.translate` does both). Convolutions are XLA's own, the path GPUs and TPUs
run (`convolutions.conv_valid`), so one file serves every platform it was exported for.

The ONNX model (opset 23, input "images" float32 (N, S, S, 3) in [-1, 1], output "translated", N
dynamic) runs in onnxruntime without JAX; it is converted from the same jaxpr by jax2onnx, an extra
(`pip install .[onnx]`). jax2tf with tf2onnx was the other candidate, but jax2tf now always emits one
opaque `XlaCallModule` op (its graph mode is gone), which tf2onnx cannot convert.

    import numpy as np, onnxruntime as ort
    session = ort.InferenceSession("horse2zebra.onnx")
    zebras = session.run(None, {"images": horses})[0]  # float32 (N, S, S, 3) in [-1, 1] -> the same
"""

from __future__ import annotations

import contextlib
import functools
import logging
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


# Warnings the ONNX conversion logs that say nothing about the model written: jax2onnx 0.13's traceback
# for each dm_pix plugin that cannot load with this JAX (the network uses none), and onnx_ir's line per
# intermediate shape value whose type it leaves out of the file's optional value_info (about 260 here).
CONVERTER_NOISE = ("jax2onnx.plugins.plugin_system", "onnx_ir.serde")


@contextlib.contextmanager
def quiet_loggers(*names: str):
  """Raises the named loggers to ERROR for the block, then restores their levels."""
  loggers = [logging.getLogger(name) for name in names]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


class MissingExtraError(ImportError):
  """An export format whose optional packages are not installed."""


def check_platforms(platforms) -> tuple[str, ...]:
  platforms = tuple(platforms)
  unknown = [p for p in platforms if p not in KNOWN_PLATFORMS]
  if not platforms or unknown:
    raise ValueError(f"platforms must be some of {KNOWN_PLATFORMS}; got {platforms}")
  return platforms


def export_translator(translator: inference.Translator, direction: str = "A2B",
                      platforms=PLATFORMS) -> jax_export.Exported:
  """The program `images -> translated` of `direction` (float32 (N, S, S, 3) in [-1, 1], N symbolic)."""
  translate = network_function(translator, direction)
  platforms = check_platforms(platforms)
  size = translator.config.model.img_size
  batch, = jax_export.symbolic_shape("batch")
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  return jax_export.export(jax.jit(translate), platforms=platforms)(images)


def network_function(translator: inference.Translator, direction: str):
  """`images -> translated` of `direction` with the weights closed over and XLA's own convolutions
  (the portable ones), unjitted: what both exports trace."""
  inference.check_direction(direction)
  model_config = ml_collections.ConfigDict(translator.config.model.to_dict())
  model_config.conv_impl = "xla"  # the portable convolutions, whatever machine exports
  return functools.partial(inference.translate_network, translator.encoders[direction],
                           translator.generators[direction], models=models_lib.create_models(model_config),
                           direction=direction)


def export_onnx(translator: inference.Translator, direction: str = "A2B"):
  """The network of `direction` as an `onnx.ModelProto`: "images" float32 (N, S, S, 3) in [-1, 1] ->
  "translated", the same shape, N dynamic. Needs the onnx extra (jax2onnx)."""
  with quiet_loggers(*CONVERTER_NOISE):
    try:
      from jax2onnx import to_onnx
    except ImportError as e:
      raise MissingExtraError(f"--format=onnx needs the onnx extra: pip install '.[onnx]' (or -r "
                              f"requirements-onnx.txt) ({e})") from None
    size = translator.config.model.img_size
    return to_onnx(network_function(translator, direction), inputs=[("N", size, size, 3)],
                   model_name=f"nicegan_{direction}", input_names=["images"], output_names=["translated"])


def check_output(path: str | pathlib.Path, overwrite: bool = False) -> pathlib.Path:
  """`path` as a Path, refused when it is a folder, or an existing file unless `overwrite`."""
  path = pathlib.Path(path).expanduser()
  if path.is_dir():
    raise ValueError(f"{path} is a folder: give the exported program a file name")
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; give another file name, or --overwrite to replace it")
  return path


def write_bytes(data: bytes, path: str | pathlib.Path, *, overwrite: bool = False) -> pathlib.Path:
  """Writes `data` to `path` (an existing file only with `overwrite`) under a temporary name, renamed
  when complete: a failed write never leaves a truncated file under the name asked for."""
  path = check_output(path, overwrite)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + ".partial")
  partial.write_bytes(data)
  os.replace(partial, path)
  return path


def write_exported(exported: jax_export.Exported, path: str | pathlib.Path, *,
                   overwrite: bool = False) -> pathlib.Path:
  """Serialises a JAX program to `path` (`write_bytes`)."""
  return write_bytes(exported.serialize(), path, overwrite=overwrite)


def write_onnx(model, path: str | pathlib.Path, *, overwrite: bool = False) -> pathlib.Path:
  """Serialises an ONNX model (`export_onnx`) to `path` (`write_bytes`)."""
  return write_bytes(model.SerializeToString(), path, overwrite=overwrite)
