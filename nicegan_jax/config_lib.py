"""The config schema: one clear error for a bad value, before anything is loaded or compiled.

Owns: `with_defaults(config)`, which completes a config (or a checkpoint's saved config) with
`configs/default.py`'s values for every field it lacks, the one place defaults fill in, so that a
config saved before a field existed still loads; and `validate(config)` with its model part
`validate_model(config.model)`, raising `ConfigError` (a ValueError) that names the field, its value
and what would work. The rest of the library reads every field directly.
"""

from __future__ import annotations

import copy
import pathlib

import ml_collections

from nicegan_jax import convolutions, datasets, train_state
from nicegan_jax.models import discriminator_feature_sizes

CYCLE_GAN_NAMES = ("apple2orange", "summer2winter_yosemite", "horse2zebra", "monet2photo",
                   "cezanne2photo", "ukiyoe2photo", "vangogh2photo", "maps", "facades",
                   "iphone2dslr_flower")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """A config value that cannot work."""


def with_defaults(config) -> ml_collections.ConfigDict:
  """`config` (a ConfigDict, or a dict such as a checkpoint's saved config) merged onto
  configs/default.py's config: its values win, fields it lacks take their defaults."""
  from configs import default  # the schema: every field, with the original's value
  merged = default.get_config()
  values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else copy.deepcopy(config)
  _merge(merged, _renamed(values), "config")
  return merged


# model.conv_weight_grad (auto | xla | matmul) became model.conv_impl (auto | xla | cpu).
CONV_IMPL_OF_WEIGHT_GRAD = {"auto": "auto", "xla": "xla", "matmul": "cpu"}


def _renamed(values: dict) -> dict:
  """A saved config's values with fields that were renamed since under their current names."""
  model = values.get("model")
  if isinstance(model, dict) and "conv_weight_grad" in model:
    old = model.pop("conv_weight_grad")
    model.setdefault("conv_impl", CONV_IMPL_OF_WEIGHT_GRAD.get(old, old))
  return values


def _merge(base: ml_collections.ConfigDict, values: dict, where: str) -> None:
  for key, value in values.items():
    if isinstance(value, dict) and isinstance(base.get(key), ml_collections.ConfigDict):
      _merge(base[key], value, f"{where}.{key}")
      continue
    try:
      base[key] = value
    except TypeError as e:  # ConfigDict keeps each field's type
      raise ConfigError(f"{where}.{key}={value!r}: {e}") from None


def _require(ok: bool, field: str, value, why: str) -> None:
  if not ok:
    raise ConfigError(f"config.{field}={value!r}: {why}")


def validate_data(data) -> None:
  kind, _, name = data.dataset.partition("/")
  if kind == "image_folder":
    _require(bool(data.path), "data.path", data.path, "set it to the folder with trainA/ trainB/ testA/ "
             "testB/ (e.g. --config.data.path=dataset/selfie2anime)")
    root = pathlib.Path(data.path).expanduser()
    _require(root.is_dir(), "data.path", data.path, "no such folder")
    missing = [s for s in datasets.SPLITS if not (root / s).is_dir()]
    _require(not missing, "data.path", data.path, f"missing sub-folder(s) {', '.join(missing)} "
             f"(an image-folder dataset needs {', '.join(datasets.SPLITS)})")
  elif kind == "cycle_gan":
    _require(name in CYCLE_GAN_NAMES, "data.dataset", data.dataset,
             f"unknown cycle_gan dataset; use one of {', '.join('cycle_gan/' + n for n in CYCLE_GAN_NAMES)}")
  elif kind == "animal_mnist":
    a, _, b = name.partition("2")
    _require(a in datasets.ANIMAL_MNIST_CLASSES and b in datasets.ANIMAL_MNIST_CLASSES and a != b,
             "data.dataset", data.dataset,
             f"use animal_mnist/<a>2<b> with two classes from {', '.join(datasets.ANIMAL_MNIST_CLASSES)}")
  else:
    _require(False, "data.dataset", data.dataset,
             "unknown dataset; use image_folder, cycle_gan/<name> or animal_mnist/<a>2<b>")
  _require(data.resize_margin >= 0, "data.resize_margin", data.resize_margin, "must be >= 0")


def validate_model(m) -> None:
  """Raises ConfigError for the first value of `config.model` that cannot work."""
  try:
    discriminator_feature_sizes(m.img_size, m.n_dis)
  except ValueError as e:
    raise ConfigError(f"config.model.img_size={m.img_size!r} / config.model.n_dis={m.n_dis!r}: {e}") from None
  _require(m.ch >= 1, "model.ch", m.ch, "must be >= 1")
  _require(m.n_res >= 0, "model.n_res", m.n_res, "must be >= 0")
  _require(m.dtype in DTYPES, "model.dtype", m.dtype, f"use one of {', '.join(DTYPES)}")
  impls = ("auto", *convolutions.IMPLS)
  _require(m.conv_impl in impls, "model.conv_impl", m.conv_impl, f"use one of {', '.join(impls)}")


def validate(config) -> None:
  """Raises ConfigError for the first value that cannot work."""
  m, t, o = config.model, config.train, config.optimizer
  validate_model(m)
  for name in ("adv_weight", "cycle_weight", "recon_weight"):
    _require(config.loss[name] >= 0, f"loss.{name}", config.loss[name], "must be >= 0")
  _require(o.lr > 0, "optimizer.lr", o.lr, "must be > 0")
  scale = train_state.disc_lr_scale(o)
  _require(scale > 0, "optimizer.disc_lr_scale", scale, "must be > 0")
  _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optimizer.b1/b2", (o.b1, o.b2), "must lie in [0, 1)")
  _require(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "must be >= 0")
  _require(o.decay_start_step < t.num_steps, "optimizer.decay_start_step", o.decay_start_step,
           f"must be below train.num_steps={t.num_steps} (-1: half of it)")
  _require(t.num_steps >= 1, "train.num_steps", t.num_steps, "must be >= 1")
  _require(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
  _require(t.log_every_steps >= 1, "train.log_every_steps", t.log_every_steps, "must be >= 1")
  _require(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, "must be >= 1")
  for name in ("checkpoint_every_steps", "sample_every_steps", "eval_every_steps"):
    _require(t[name] >= 0, f"train.{name}", t[name], "must be >= 0 (0 = only at the end / off)")
  _require(t.sample_columns >= 1, "train.sample_columns", t.sample_columns, "must be >= 1")
  k = t.steps_per_dispatch
  _require(k >= 1, "train.steps_per_dispatch", k, "must be >= 1")
  for name in ("num_steps", "log_every_steps", "checkpoint_every_steps", "sample_every_steps",
               "eval_every_steps"):
    _require(t[name] % k == 0, f"train.{name}", t[name],
             f"must be a multiple of train.steps_per_dispatch={k} (steps run {k} at a time)")
  _require(t.prefetch >= 0, "train.prefetch", t.prefetch, "must be >= 0 (0 = off)")
  profile_steps = t.profile_steps
  _require(profile_steps >= 0 and profile_steps % k == 0, "train.profile_steps", profile_steps,
           f"must be >= 0 (0 = off) and a multiple of train.steps_per_dispatch={k}")
  _require(config.mesh.data == -1 or config.mesh.data >= 1, "mesh.data", config.mesh.data,
           "use -1 (all devices) or a positive number of replicas")
  _require(config.mesh.model >= 1, "mesh.model", config.mesh.model, "must be >= 1")
  validate_data(config.data)
