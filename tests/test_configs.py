"""Configs: every shipped config is complete and valid; bad values get one clear error up front."""

import importlib
import os
import pathlib
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from conftest import ROOT
from nicegan_jax import config_lib

CONFIGS = ("default", "test", "demo", "selfie2anime", "cat2dog", "full", "horse2zebra",
           "summer2winter", "vangogh2photo", "animal_horse2zebra")


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_validate(name, tmp_path):
  config = importlib.import_module(f"configs.{name}").get_config()
  if config.data.dataset == "image_folder":
    for split in ("trainA", "trainB", "testA", "testB"):  # the real folders live on the user's machine
      (tmp_path / split).mkdir(exist_ok=True)
    config.data.path = str(tmp_path)
  config_lib.validate(config)


def test_paper_defaults():
  config = importlib.import_module("configs.default").get_config()
  assert (config.model.ch, config.model.n_res, config.model.n_dis, config.model.img_size) == (64, 6, 7, 256)
  assert config.model.light and config.train.batch_size == 1
  assert (config.loss.adv_weight, config.loss.cycle_weight, config.loss.recon_weight) == (1, 10, 10)
  assert (config.optimizer.lr, config.optimizer.b1, config.optimizer.b2) == (1e-4, 0.5, 0.999)
  assert config.optimizer.weight_decay == 1e-4 and config.optimizer.disc_lr_scale == 1.0
  assert not importlib.import_module("configs.full").get_config().model.light


def test_animal_horse2zebra_recipes_differ_only_in_the_tuned_values():
  module = importlib.import_module("configs.animal_horse2zebra")
  faithful, tuned = module.get_config(), module.get_config("tuned")
  assert faithful.to_dict() == module.get_config("faithful").to_dict()
  assert (faithful.data.resize_margin, faithful.train.batch_size, faithful.optimizer.lr) == (8, 1, 1e-4)
  assert (tuned.data.resize_margin, tuned.train.batch_size, tuned.optimizer.lr) == (0, 4, 2e-4)
  assert (faithful.train.num_steps, tuned.train.num_steps) == (3000, 4500)
  for config in (faithful, tuned):
    config.data.resize_margin, config.train.batch_size, config.optimizer.lr = 0, 0, 0.0
    config.train.num_steps = 0
  assert faithful.to_dict() == tuned.to_dict()  # the model, losses and schedule are the same
  config_lib.validate(module.get_config("tuned"))
  with pytest.raises(ValueError, match="unknown recipe; use one of faithful, tuned"):
    module.get_config("fast")


def test_a_recipe_is_chosen_on_the_command_line():
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values)
  flag_values(["benchmark", f"--config={ROOT / 'configs' / 'animal_horse2zebra.py'}:tuned"])
  config = flag_values.config
  assert config.train.batch_size == 4 and config.data.resize_margin == 0


@pytest.mark.parametrize("field,value,message", [
    ("model.img_size", 62, "multiple of 4"),
    ("model.img_size", 64, "too small for n_dis=7"),
    ("model.dtype", "float64", "use one of"),
    ("data.dataset", "imagenet", "unknown dataset"),
    ("data.dataset", "cycle_gan/horse2cow", "unknown cycle_gan dataset"),
    ("data.dataset", "animal_mnist/horse2unicorn", "two classes"),
    ("data.path", "", "set it to the folder"),
    ("data.path", "/no/such/folder", "no such folder"),
    ("data.path", "/", "missing sub-folder"),
    ("train.batch_size", 0, "must be >= 1"),
    ("train.log_every_steps", 0, "must be >= 1"),
    ("train.profile_steps", -1, "must be >= 0"),
    ("optimizer.lr", 0.0, "must be > 0"),
    ("optimizer.disc_lr_scale", 0.0, "must be > 0"),
    ("optimizer.decay_start_step", 400_000, "below train.num_steps"),
])
def test_bad_values_are_named(field, value, message, tmp_path):
  config = importlib.import_module("configs.default").get_config()
  for split in ("trainA", "trainB", "testA", "testB"):
    (tmp_path / split).mkdir()
  config.data.path = str(tmp_path)
  group, key = field.split(".")
  config[group][key] = value
  with pytest.raises(config_lib.ConfigError, match=message) as err:
    config_lib.validate(config)
  assert f"config.{group}" in str(err.value)


@pytest.mark.parametrize("override,message", [
    ("--config.model.img_size=62", "error: config.model.img_size=62"),
    ("--config.data.path=/", "error: config.data.path='/': missing sub-folder(s) trainA"),
])
def test_main_reports_a_bad_config_in_one_line_without_a_traceback(tmp_path, override, message):
  cmd = [sys.executable, "main.py", "--config=configs/test.py", f"--workdir={tmp_path / 'run'}",
         f"--config.data.path={tmp_path}", override]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode != 0
  assert message in result.stderr
  assert "Traceback" not in result.stderr
  assert "oneDNN" not in result.stderr  # nor TensorFlow's start-up banner
  assert not (tmp_path / "run").exists()  # nothing is left behind


@pytest.mark.parametrize("override,message", [
    ("--config.train.batch_szie=4", 'error: --config.train.batch_szie: no such config field (Did you mean '
                                    '"batch_size" instead of "batch_szie"?)'),
    ("--config.trian.batch_size=4", 'error: --config.trian.batch_size: no such config field (Did you mean '
                                    '"train" instead of "trian"?)'),
])
def test_an_unknown_config_field_is_named_in_one_line(tmp_path, override, message):
  cmd = [sys.executable, "main.py", "--config=configs/test.py", f"--workdir={tmp_path / 'run'}", override]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines() == [message + "; configs/default.py lists every field"]
  assert not (tmp_path / "run").exists()


def test_url_run_folders_are_refused_not_made_into_local_folders(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # where pathlib would have made a local "gs:" folder
  for args in (["--config=configs/test.py", "--workdir=gs://bucket/run"],
               ["--mode=translate", "--workdir=runs/x", "--input=s3://bucket/in", "--output=out"]):
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode != 0 and "takes a local path: URLs (gs://, s3://, ...) are not" in result.stderr
  from nicegan_jax import checkpoints, load_translator, train
  with pytest.raises(ValueError, match="workdir gs://bucket/run: URLs"):
    train.train_and_evaluate(importlib.import_module("configs.test").get_config(), "gs://bucket/run")
  with pytest.raises(ValueError, match="checkpoint path gs://bucket/run: URLs"):
    load_translator("gs://bucket/run")
  assert checkpoints.local_path("~/runs/x") == pathlib.Path.home() / "runs" / "x"
  assert list(tmp_path.iterdir()) == [] and not (ROOT / "gs:").exists() and not (ROOT / "s3:").exists()


def test_a_saved_config_from_before_a_field_existed_loads_with_its_default():
  saved = importlib.import_module("configs.test").get_config().to_dict()
  del saved["train"]["steps_per_dispatch"], saved["model"]["conv_impl"], saved["mesh"]["model"]
  saved["model"]["ch"] = 12
  config = config_lib.with_defaults(saved)
  assert config.train.steps_per_dispatch == 1 and config.model.conv_impl == "auto"
  assert config.mesh.model == 1 and config.model.ch == 12  # the saved values win
  with pytest.raises(config_lib.ConfigError, match="config.model.ch='twelve'"):
    config_lib.with_defaults({"model": {"ch": "twelve"}})


@pytest.mark.parametrize("old,new", [("matmul", "cpu"), ("xla", "xla"), ("auto", "auto")])
def test_a_config_saved_with_conv_weight_grad_loads_as_conv_impl(old, new):
  saved = importlib.import_module("configs.test").get_config().to_dict()
  del saved["model"]["conv_impl"]
  saved["model"]["conv_weight_grad"] = old  # the field's name before conv_impl
  config = config_lib.with_defaults(saved)
  assert config.model.conv_impl == new and "conv_weight_grad" not in config.model
