"""export: one direction's network as a jax.export file that runs with JAX alone and equals translate."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import test as test_config
from conftest import ROOT, write_tiny_checkpoint
from nicegan_jax import export, inference, models, train_state

RUN_WITH_JAX_ALONE = """
import importlib.util, sys
import numpy as np
from jax import export
assert importlib.util.find_spec("nicegan_jax") is None and importlib.util.find_spec("flax") is None
with open(sys.argv[1], "rb") as f:
  translate = export.deserialize(f.read())
assert translate.platforms == ("cpu", "cuda", "tpu"), translate.platforms
images = np.load(sys.argv[2])
for n in (1, len(images)):  # any batch size
  np.save(sys.argv[3] + f"_{n}.npy", np.asarray(translate.call(images[:n])))
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
  """A workdir holding one checkpoint of a freshly initialised tiny model (as training writes it)."""
  root = tmp_path_factory.mktemp("export")
  write_tiny_checkpoint(root / "run" / "checkpoints", 2)
  return root / "run"


def jax_alone_env(root: pathlib.Path) -> dict:
  """The environment of a process (run with -S: no site-packages) that finds JAX, numpy and flatbuffers
  (jax.export's file format) but neither this library nor Flax."""
  site = pathlib.Path(np.__file__).parents[1]
  jax_only = root / "jax_only_site"
  jax_only.mkdir()
  for name in ("jax", "jaxlib", "numpy", "ml_dtypes", "opt_einsum", "scipy", "flatbuffers"):
    (jax_only / name).symlink_to(site / name)
  return {**os.environ, "PYTHONPATH": str(jax_only)}


def test_main_exports_a_program_that_runs_with_jax_alone_and_equals_translate(workdir, tmp_path):
  out = tmp_path / "b2a.jaxexport"
  result = subprocess.run([sys.executable, "main.py", "--mode=export", f"--workdir={workdir}",
                           f"--output={out}", "--direction=B2A"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Wrote B2A (light, ch 8" in result.stdout and str(out) in result.stdout
  assert out.is_file() and not out.with_name(out.name + ".partial").exists()

  images = np.random.default_rng(0).uniform(-1, 1, (3, 64, 64, 3)).astype(np.float32)
  np.save(tmp_path / "images.npy", images)
  result = subprocess.run([sys.executable, "-S", "-c", RUN_WITH_JAX_ALONE, str(out),
                           str(tmp_path / "images.npy"), str(tmp_path / "out")], cwd=tmp_path,
                          env=jax_alone_env(tmp_path), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  translator = inference.load_translator(workdir)
  expected = np.asarray(inference.translate_at_work_size(
      translator.encoders["B2A"], translator.generators["B2A"], images, models=translator.models,
      direction="B2A"))
  for n in (1, 3):
    np.testing.assert_allclose(np.load(tmp_path / f"out_{n}.npy"), expected[:n], atol=2e-5)


def test_export_refuses_bad_arguments(workdir, tmp_path):
  translator = inference.load_translator(workdir)
  with pytest.raises(ValueError, match="direction must be one of"):
    export.export_translator(translator, "A2A")
  with pytest.raises(ValueError, match="platforms must be some of"):
    export.export_translator(translator, "A2B", platforms=("gpu",))
  result = subprocess.run([sys.executable, "main.py", "--mode=export", f"--workdir={workdir}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and "--mode=export needs --output" in result.stderr
  result = subprocess.run([sys.executable, "main.py", "--mode=export", f"--workdir={workdir}",
                           f"--output={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and "is a folder: --mode=export writes one file" in result.stderr
  cpu_only = export.export_translator(translator, "A2B", platforms=("cpu",))
  assert cpu_only.platforms == ("cpu",)
  with pytest.raises(ValueError, match="is a folder"):
    export.write_exported(cpu_only, tmp_path)
  existing = tmp_path / "taken.jaxexport"
  existing.write_bytes(b"someone's file")
  with pytest.raises(FileExistsError, match="exists; give another file name, or --overwrite"):
    export.write_exported(cpu_only, existing)
  assert existing.read_bytes() == b"someone's file"
  result = subprocess.run([sys.executable, "main.py", "--mode=export", f"--workdir={workdir}",
                           f"--output={existing}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (f"error: {existing} exists; give another file name, "
                                                    "or --overwrite to replace it")
  export.write_exported(cpu_only, existing, overwrite=True)
  assert existing.read_bytes() == cpu_only.serialize()


def test_a_full_model_exports_too():
  config = test_config.get_config()
  config.model.light = False
  nets = models.create_models(config.model)
  state = train_state.create_train_state(config, jax.random.PRNGKey(1), nets)
  translator = inference.translator_from_state(config, nets, state)
  program = export.export_translator(translator, "A2B", platforms=("cpu",))
  images = np.random.default_rng(1).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  expected = inference.translate_at_work_size(translator.encoders["A2B"], translator.generators["A2B"],
                                              images, models=nets, direction="A2B")
  np.testing.assert_allclose(np.asarray(program.call(images)), np.asarray(expected), atol=2e-5)
