"""export --format=onnx: one direction's network as an ONNX model that onnxruntime runs without JAX,
equal to translate's networks; and the README's onnxruntime lines, run as they are written."""

import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import test as test_config
from conftest import ROOT, write_tiny_checkpoint
from nicegan_jax import export, inference, models, train_state

pytest.importorskip("jax2onnx", reason="the onnx extra is not installed (pip install '.[onnx]')")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install '.[onnx]')")

# Run first in every process below: JAX, Flax and this library cannot be imported there.
WITHOUT_JAX = """
import sys
class _Refuse:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("jax", "jaxlib", "flax", "nicegan_jax", "jax2onnx"):
      raise ImportError(f"{name} is not available in this process")
sys.meta_path.insert(0, _Refuse())
"""

RUN_WITH_ONNXRUNTIME = WITHOUT_JAX + """
import numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
(images,), (translated,) = session.get_inputs(), session.get_outputs()
assert (images.name, images.shape[0], translated.name) == ("images", "N", "translated"), images
x = np.load(sys.argv[2])
for n in (1, len(x)):  # two batch sizes through one model
  np.save(sys.argv[3] + f"_{n}.npy", session.run(None, {"images": x[:n]})[0])
assert not any(m.split(".")[0] in ("jax", "jaxlib", "flax") for m in sys.modules)
"""


def readme_onnx_lines() -> str:
  """The README's onnxruntime example: the python block after the line that introduces it."""
  readme = (ROOT / "README.md").read_text()
  match = re.search(r"runs in onnxruntime without JAX[^\n]*\n+```python\n(.*?)```", readme, re.S)
  assert match, "README.md lost its onnxruntime example"
  return match.group(1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("onnx")
  write_tiny_checkpoint(root / "run" / "checkpoints", 2)
  return root / "run"


def run_without_jax(code: str, *args, cwd) -> subprocess.CompletedProcess:
  result = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def expected_translation(translator, direction, images):
  return np.asarray(inference.translate_at_work_size(
      translator.encoders[direction], translator.generators[direction], images,
      models=translator.models, direction=direction))


def check_in_onnxruntime(model_path, translator, direction, tmp_path, seed):
  images = np.random.default_rng(seed).uniform(-1, 1, (3, 64, 64, 3)).astype(np.float32)
  np.save(tmp_path / "images.npy", images)
  run_without_jax(RUN_WITH_ONNXRUNTIME, model_path, tmp_path / "images.npy", tmp_path / "out", cwd=tmp_path)
  expected = expected_translation(translator, direction, images)
  for n in (1, 3):
    got = np.load(tmp_path / f"out_{n}.npy")
    assert got.shape == (n, 64, 64, 3)
    np.testing.assert_allclose(got, expected[:n], atol=1e-4)


def test_main_exports_a_light_model_that_onnxruntime_runs_without_jax(workdir, tmp_path):
  out = tmp_path / "b2a.onnx"
  result = subprocess.run([sys.executable, "main.py", "--mode=export", "--format=onnx",
                           f"--workdir={workdir}", f"--output={out}", "--direction=B2A"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Wrote B2A (light, ch 8" in result.stdout and "ONNX" in result.stdout and str(out) in result.stdout
  assert out.is_file() and not out.with_name(out.name + ".partial").exists()
  check_in_onnxruntime(out, inference.load_translator(workdir), "B2A", tmp_path, seed=0)

  result = subprocess.run([sys.executable, "main.py", "--mode=export", "--format=onnx",
                           f"--workdir={workdir}", f"--output={out}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
      f"error: {out} exists; give another file name, or --overwrite to replace it")


def test_a_full_model_exports_and_runs_too(tmp_path):
  config = test_config.get_config()
  config.model.light = False
  nets = models.create_models(config.model)
  state = train_state.create_train_state(config, jax.random.PRNGKey(1), nets)
  translator = inference.translator_from_state(config, nets, state)
  path = export.write_onnx(export.export_onnx(translator, "A2B"), tmp_path / "full.onnx")
  check_in_onnxruntime(path, translator, "A2B", tmp_path, seed=1)


def test_the_readme_lines_run_as_written(workdir, tmp_path):
  translator = inference.load_translator(workdir)
  export.write_onnx(export.export_onnx(translator, "A2B"), tmp_path / "horse2zebra.onnx")
  rng = np.random.default_rng(3)
  horse = np.rint(rng.uniform(0, 255, (64, 64, 3))).astype(np.uint8)  # at the work size: no resizing
  Image.fromarray(horse).save(tmp_path / "horse.png")
  run_without_jax(WITHOUT_JAX + readme_onnx_lines(), cwd=tmp_path)
  with Image.open(tmp_path / "zebra.png") as written:
    zebra = np.asarray(written)
  expected = inference.translate(translator, horse, "A2B")
  assert zebra.shape == expected.shape and zebra.dtype == np.uint8
  # Rounding to uint8 may differ by one level where onnxruntime and XLA differ in the last float bits.
  assert np.abs(zebra.astype(int) - expected.astype(int)).max() <= 1


def test_export_onnx_refuses_what_it_cannot_do(workdir, monkeypatch):
  translator = inference.load_translator(workdir)
  with pytest.raises(ValueError, match="direction must be one of"):
    export.export_onnx(translator, "B2B")
  monkeypatch.setitem(sys.modules, "jax2onnx", None)  # as if the extra were not installed
  with pytest.raises(export.MissingExtraError, match=r"needs the onnx extra: pip install '.\[onnx\]'"):
    export.export_onnx(translator, "A2B")
