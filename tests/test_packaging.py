"""pyproject.toml: the wheel holds the library and configs, pins requirements.txt, and works outside a checkout."""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT, write_tiny_checkpoint

pytest.importorskip("setuptools", reason="building the wheel needs setuptools (requirements-test.txt)")

PACKAGES = ("nicegan_jax", "configs")


def requirement_lines(path: pathlib.Path) -> list[str]:
  lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
  return [line for line in lines if line]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("wheel")
  source = tmp_path_factory.mktemp("source")  # setuptools writes build/ and *.egg-info beside the source
  for name in ("pyproject.toml", "README.md", "requirements.txt"):
    shutil.copy(ROOT / name, source / name)
  for package in PACKAGES:
    shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(out), str(source)], check=True, timeout=300)
  wheels = list(out.glob("nicegan_jax-*.whl"))
  assert len(wheels) == 1, wheels
  return wheels[0]


def test_wheel_holds_every_module_and_pins_the_requirements(wheel):
  with zipfile.ZipFile(wheel) as archive:
    names = set(archive.namelist())
    metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
  for package in PACKAGES:
    for module in (ROOT / package).glob("*.py"):
      assert f"{package}/{module.name}" in names
  assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
  pins = [line.removeprefix("Requires-Dist: ") for line in metadata.splitlines()
          if line.startswith("Requires-Dist: ")]
  assert pins == requirement_lines(ROOT / "requirements.txt")


def test_installed_library_translates_a_checkpoint_outside_the_checkout(wheel, tmp_path):
  site = tmp_path / "site"
  with zipfile.ZipFile(wheel) as archive:
    archive.extractall(site)
  write_tiny_checkpoint(tmp_path / "run" / "checkpoints", 1)
  script = f"""
import pathlib, numpy as np
import nicegan_jax, configs.default
from nicegan_jax import load_translator, translate
site = pathlib.Path({str(site)!r})
assert pathlib.Path(nicegan_jax.__file__).is_relative_to(site), nicegan_jax.__file__
assert pathlib.Path(configs.default.__file__).is_relative_to(site), configs.default.__file__
translator = load_translator({str(tmp_path / "run")!r})
out = translate(translator, np.zeros((20, 24, 3), np.uint8))
assert out.shape == (20, 24, 3) and out.dtype == np.uint8, (out.shape, out.dtype)
from configs import full  # a variant config, through the configs it imports
assert full.get_config().model.light is False
print("ok")
"""
  env = {**os.environ, "PYTHONPATH": str(site)}
  result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")
