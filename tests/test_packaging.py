"""pyproject.toml: the wheel holds the library and configs, pins requirements.txt, and works outside a checkout."""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT, SLOWEST_FIRST, write_tiny_checkpoint

pytest.importorskip("setuptools", reason="building the wheel needs setuptools (requirements-test.txt)")

PACKAGES = ("nicegan_jax", "configs")


def requirement_lines(path: pathlib.Path) -> list[str]:
  lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
  return [line for line in lines if line]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("wheel")
  source = tmp_path_factory.mktemp("source")  # setuptools writes build/ and *.egg-info beside the source
  for name in ("pyproject.toml", "README.md", "requirements.txt", "requirements-demo.txt",
               "requirements-onnx.txt"):
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
  assert [p for p in pins if "; extra ==" not in p] == requirement_lines(ROOT / "requirements.txt")
  for extra in ("demo", "onnx"):  # pip install '.[demo]', '.[onnx]'
    assert f"Provides-Extra: {extra}" in metadata
    assert [p.split(";")[0].strip() for p in pins if f'extra == "{extra}"' in p] == requirement_lines(
        ROOT / f"requirements-{extra}.txt")


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


# ------------------------------------------------------------------ requirements.txt on its own
def distribution_closure(requirements: list[str]) -> set[str]:
  """The normalised names of the installed distributions that `requirements` pull in, transitively
  (environment markers evaluated, no extras): what a fresh `pip install -r requirements.txt` holds."""
  import importlib.metadata as md
  from packaging.requirements import Requirement
  from packaging.utils import canonicalize_name
  seen, todo = set(), [Requirement(line) for line in requirements if not line.startswith("-")]
  while todo:
    req = todo.pop()
    name = canonicalize_name(req.name)
    if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
      continue
    seen.add(name)
    todo += [Requirement(r) for r in md.requires(req.name) or []]
  return seen


def top_level_modules(distribution) -> set[str]:
  text = distribution.read_text("top_level.txt")
  if text:
    return {line.strip() for line in text.splitlines() if line.strip()}
  return {pathlib.PurePath(str(f)).parts[0].removesuffix(".py") for f in distribution.files or []
          if not str(f).startswith(("..", "/")) and ".dist-info" not in str(f)}


CACHE_USER = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))

class Uninstalled(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.partition(".")[0] in BLOCKED:
      raise ModuleNotFoundError(f"No module named {name!r} (not installed by requirements.txt)")

sys.meta_path.insert(0, Uninstalled())
sys.path.insert(0, sys.argv[3])
import jax, jax.numpy as jnp
import main  # the entry point's own cache set-up, with its size limit
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event))
main.enable_compilation_cache(sys.argv[2])
jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)(jnp.ones((32, 32))).block_until_ready()
print(hits.count("/jax/compilation_cache/cache_hits"))
"""


def test_the_compilation_cache_serves_a_second_process_with_requirements_txt_alone(tmp_path):
  """Two processes that can import only what requirements.txt installs (every other installed package
  hidden) compile the same program with main.py's cache settings: the second loads it from the cache,
  and neither warns that the cache could not be used."""
  import importlib.metadata as md
  from packaging.utils import canonicalize_name
  closure = distribution_closure(requirement_lines(ROOT / "requirements.txt"))
  assert "filelock" in closure and "jax" in closure
  blocked, kept = set(), set()
  for distribution in md.distributions():
    inside = canonicalize_name(distribution.metadata["Name"]) in closure
    (kept if inside else blocked).update(top_level_modules(distribution))
  # A namespace shared with an installed extra (orbax: orbax-checkpoint's and orbax-export's) stays.
  blocked -= kept | {"nicegan_jax", "configs", "main", "", "__pycache__"}
  assert "torch" in blocked or "torch" not in {d.metadata["Name"] for d in md.distributions()}
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  command = [sys.executable, "-c", CACHE_USER, ",".join(sorted(blocked)), str(tmp_path / "cache"), str(ROOT)]
  runs = [subprocess.run(command, capture_output=True, text=True, timeout=300, env=env) for _ in range(2)]
  for result in runs:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "filelock" not in result.stderr and "persistent compilation cache" not in result.stderr
  assert int(runs[0].stdout) == 0 and int(runs[1].stdout) >= 1  # every program of the first, from the cache


def test_the_suites_slowest_first_order_names_test_files_that_exist():
  test_files = {p.name for p in (ROOT / "tests").glob("test_*.py")}
  assert set(SLOWEST_FIRST) <= test_files and len(set(SLOWEST_FIRST)) == len(SLOWEST_FIRST)
