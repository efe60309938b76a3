"""The Animal-MNIST horse->zebra benchmark command, run on a handful of images for a few steps.

Plumbing only: every reported field is present and well-formed. Quality is the benchmark's job
(docs/results.md: the numbers of full runs), never a unit test's.
"""

import ast
import gc
import json
import math

import numpy as np
import pytest

from benchmarks import horse2zebra_mini as bench
from configs import animal_horse2zebra
from conftest import ROOT, image_size_and_mode


def test_mask_iou_and_blur_behave():
  img = np.zeros((1, 28, 28))
  img[0, 8:20, 8:20] = 200
  assert bench.mask_iou(img, img)[0] == 1.0
  assert bench.mask_iou(img, np.zeros_like(img))[0] == 0.0
  shifted = bench.mask_iou(img, np.roll(img, 2, axis=2))[0]
  assert 0.6 < shifted < 0.9
  blurred = bench.gaussian_blur(img)
  assert abs(blurred.sum() - img.sum()) < 1e-6 * img.sum()  # a normalised kernel keeps the mass
  assert blurred[0, 14, 14] == 200 and 0 < blurred[0, 6, 14] < 24  # flat inside, a soft edge outside


def test_class_shares_names_each_predicted_class_most_common_first():
  zebra, horse = bench.ZEBRA, bench.HORSE
  shares = bench.class_shares(np.array([zebra, horse, zebra, zebra]))
  assert list(shares) == ["zebra", "horse"] and shares == {"zebra": 0.75, "horse": 0.25}


def test_drawn_in_box_puts_the_zebra_on_the_horses_box():
  horse = np.zeros((28, 28), np.float32)
  horse[5:15, 3:21] = 250
  zebra = np.zeros((28, 28), np.float32)
  zebra[20:25, 0:9] = 120
  zebra[20:25, 9:18] = 180  # two halves, so the resize must keep left on the left
  drawn = bench.drawn_in_box(zebra, horse)
  assert bench.foreground_box(drawn) == (5, 15, 3, 21) == bench.foreground_box(horse)
  assert drawn[5:15, 3:8].max() == 120 and drawn[5:15, 16:21].min() == 180
  assert drawn.sum() == drawn[5:15, 3:21].sum()  # nothing outside the box
  assert bench.foreground_box(np.zeros((28, 28))) == (0, 28, 0, 28)  # an empty image: the whole frame


def test_benchmark_smoke_run_reports_every_field(tmp_path):
  config = animal_horse2zebra.get_config()
  config.model.ch, config.model.n_res = 8, 1
  # As configs/test.py: XLA's convolutions, a constant rate and 2 images a step, so the run compiles the
  # programs main.py's runs of that config do, and shares them through the compilation cache.
  config.model.conv_impl = "xla"
  config.optimizer.decay_flag, config.train.batch_size = False, 2
  config.train.num_steps, config.train.checkpoint_every_steps, config.train.sample_every_steps = 2, 1, 2
  config.train.log_every_steps = 1
  results = bench.run_benchmark(config, tmp_path / "run", num_test=4, judge_steps=30)
  saved = json.loads((tmp_path / "run" / "benchmark.json").read_text())
  assert saved == json.loads(json.dumps(results))
  assert results["steps"] == 2 and results["num_test"] == 4
  assert results["config"] == {"img_size": 64, "ch": 8, "n_res": 1, "n_dis": 6, "light": True}
  assert results["train_wall_s"] > 0 and results["train_img_per_s"] > 0
  for key in ("judge_heldout_accuracy", "judge_zebra_rate", "mask_iou"):
    assert 0.0 <= results[key] <= 1.0, key
  assert math.isfinite(results["kid_x100"])
  for key in ("judge_zebra_rate_raw_horses", "judge_zebra_rate_real_zebras", "kid_x100_raw_horses",
              "kid_x100_train_zebras_64_roundtrip", "mask_iou_unrelated_zebra", "mask_iou_horse_shifted_2px",
              "judge_zebra_rate_zebras_in_horse_boxes", "mask_iou_zebras_in_horse_boxes",
              "kid_x100_zebras_in_horse_boxes"):
    assert math.isfinite(results["baselines"][key]), key
  assert set(results["pass"]) == set(bench.CRITERIA) and isinstance(results["passed"], bool)
  assert sum(results["judge_classes"].values()) == pytest.approx(1.0)
  assert results["judge_classes"].get("zebra", 0.0) == pytest.approx(results["judge_zebra_rate"])
  assert image_size_and_mode(results["grid"])[0] == (2 * 4 * 64, 2 * 2 * 64)
  assert "checkpoints" not in results
  # Scoring again without training reuses the run and its recorded wall time; every_checkpoint also
  # scores each kept checkpoint, the newest one exactly as the main result.
  # The scored run's batch size counts, not the flags' (here a different one).
  eval_config = config.copy_and_resolve_references()
  eval_config.train.batch_size = 3
  again = bench.run_benchmark(eval_config, tmp_path / "run", eval_only=True, num_test=4, judge_steps=30,
                              every_checkpoint=True)
  assert again["steps"] == 2 and again["train_wall_s"] == results["train_wall_s"]
  assert again["train_img_per_s"] == pytest.approx(results["train_img_per_s"])
  assert [row["steps"] for row in again["checkpoints"]] == [1, 2]
  for key in ("judge_zebra_rate", "mask_iou", "kid_x100"):
    assert again["checkpoints"][-1][key] == pytest.approx(again[key], rel=1e-6, abs=1e-9), key
    assert all(math.isfinite(row[key]) for row in again["checkpoints"]), key
  assert all(isinstance(row["passed"], bool) for row in again["checkpoints"])


def test_startup_benchmark_sees_main_py_collect_less_often_than_python_would(tmp_path):
  """benchmarks/startup.py's hooked child on main.py's imports alone (`--helpshort` exits after them):
  at Python's thresholds they take full collections, at main.py's none, and the hook times both."""
  from benchmarks import startup
  ours = startup.run_main(tmp_path, "ours", ["--helpshort"], python_defaults=False, check=False)
  defaults = startup.run_main(tmp_path, "defaults", ["--helpshort"], python_defaults=True, check=False)
  assert ours["full"] == 0 < defaults["full"], (ours, defaults)
  assert 0 < ours["gc_s"] < defaults["gc_s"] and ours["cpu_s"] > 0, (ours, defaults)
  report = startup.summary([ours, ours, defaults])  # medians: ours twice out of three
  assert report["full_collections"] == 0 and len(report["wall_s_each"]) == 3


def test_the_test_processes_collect_garbage_at_main_pys_thresholds():
  """conftest.py sets main.py's GC_THRESHOLDS in the test processes, read here from main.py's source
  (importing main would define its absl flags in this process)."""
  tree = ast.parse((ROOT / "main.py").read_text())
  [value] = [node.value for node in tree.body if isinstance(node, ast.Assign)
             and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["GC_THRESHOLDS"]]
  assert gc.get_threshold() == ast.literal_eval(value)
