"""The training program end to end: main.py, checkpoints, exact resume, TensorBoard, grids, NaN stop."""

import glob
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import test as test_config
from conftest import ROOT, image_size_and_mode, quick_compiles
from nicegan_jax import checkpoints, input_pipeline, step as step_lib, train


def make_dataset(root: pathlib.Path) -> pathlib.Path:
  rng = np.random.default_rng(0)
  for split in ("trainA", "trainB", "testA", "testB"):
    (root / split).mkdir(parents=True)
    for i in range(3):
      Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8)).save(
          root / split / f"{i}.png")
  return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_dataset(tmp_path_factory.mktemp("data") / "tiny")


def tiny_config(dataset, tmp_root):
  config = test_config.get_config()
  config.data.path = str(dataset)
  config.data.data_dir = str(tmp_root / "cache")
  return config


def read_tensorboard(workdir):
  from tensorboard.backend.event_processing import event_accumulator as ea
  from tensorboard.util import tensor_util
  files = glob.glob(str(workdir / "events.out.tfevents.*"))
  assert len(files) == 1
  acc = ea.EventAccumulator(files[0], size_guidance={ea.TENSORS: 0})
  acc.Reload()
  tags = set(acc.Tags()["tensors"])
  loss = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors("G/loss")]
  return tags, loss


def test_main_trains_end_to_end(dataset, tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "main.py", "--config=configs/test.py", f"--workdir={workdir}",
         f"--config.data.path={dataset}", f"--config.data.data_dir={tmp_path / 'cache'}",
         "--config.train.profile_steps=2"]
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  progress = [line for line in result.stderr.splitlines() if "steps/s" in line]
  assert len(progress) == 2 and "(2/4)" in progress[0] and "(4/4)" in progress[1]  # one per log step
  assert all("ETA" in line for line in progress)
  assert "D/adv_A_cam=" not in result.stderr  # the scalars go to TensorBoard only
  assert "CheckpointManager created" not in result.stderr  # Orbax's INFO narration is filtered out
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
  assert (workdir / "config.json").is_file()
  # train.profile_steps=2: steps 3..4 (after two warm-up steps), a trace TensorBoard's Profile tab reads.
  assert "Profiling steps 3..4 into" in result.stderr
  assert len(list((workdir / "plugins" / "profile").glob("*/*.xplane.pb"))) == 1
  tags, loss = read_tensorboard(workdir)
  assert {"D/loss", "G/loss", "G/cycle_A", "D/adv_B_cam", "lr/G", "steps_per_sec",
          "samples/A2B", "samples/B2A"} <= tags
  assert [s for s, _ in loss] == [2, 4] and all(np.isfinite(v) for _, v in loss)
  for direction in ("A2B", "B2A"):
    with Image.open(workdir / "samples" / f"{direction}_0000004.png") as grid:
      grid.verify()
    # 5 rows (real, heatmap, recon, translation, cycle) x (2 train + 2 test) columns of 64x64 tiles.
    assert image_size_and_mode(workdir / "samples" / f"{direction}_0000004.png")[0] == (4 * 64, 5 * 64)


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
  root = tmp_path_factory.mktemp("uninterrupted")
  config = tiny_config(dataset, root)
  logged = []
  state, summary = train.train_and_evaluate(config, str(root / "run"),
                                            on_log=lambda step, scalars: logged.append((step, scalars)))
  assert [step for step, _ in logged] == list(range(config.train.log_every_steps, config.train.num_steps + 1,
                                                    config.train.log_every_steps))
  assert logged[-1][1] == {**summary, "steps_per_sec": logged[-1][1]["steps_per_sec"], "eta_s": 0.0}
  return jax.device_get(state), summary, root / "run"


def corrupt_checkpoint(path: pathlib.Path) -> None:
  for f in path.rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "ocdbt" in str(f) or f.name == "manifest.ocdbt":
      f.write_bytes(b"\0" * 16)


def test_resume_after_a_stop_is_bit_identical_and_skips_a_damaged_checkpoint(
    dataset, tmp_path, uninterrupted):
  config = tiny_config(dataset, tmp_path)
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  ckpt_dir = workdir / "checkpoints"
  # A stop after step 2 whose later checkpoint was damaged, plus a save that never finished.
  corrupt_checkpoint(ckpt_dir / "4")
  shutil.copytree(ckpt_dir / "2", ckpt_dir / "6.orbax-checkpoint-tmp-1234")
  resumed, _ = train.train_and_evaluate(config, str(workdir))
  reference, _, _ = uninterrupted
  assert int(resumed.step) == 4
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed)), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)
  names = sorted(p.name for p in ckpt_dir.iterdir())
  assert "2" in names and "4" in names and any(n.startswith("unreadable-4-") for n in names)


def test_a_workdir_of_another_model_is_refused_not_overwritten(dataset, tmp_path, uninterrupted):
  _, _, workdir = uninterrupted  # checkpoints of the tiny model
  before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  config = tiny_config(dataset, tmp_path)
  config.model.ch = 16
  with pytest.raises(checkpoints.ModelMismatchError, match="model.ch: saved 8, configured 16"):
    train.train_and_evaluate(config, str(workdir))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


def test_restore_onto_the_same_state_round_trips(dataset, tmp_path, uninterrupted, recwarn):
  reference, _, _ = uninterrupted
  ckpt = checkpoints.Checkpointer(tmp_path / "ckpt", max_to_keep=1)
  state = jax.tree.map(jnp.asarray, reference)
  ckpt.save(4, state, {"note": "test"})
  ckpt.wait()
  restored, step = ckpt.restore_latest(jax.eval_shape(lambda: state))  # shapes without shardings
  assert step == 4 and ckpt.restore_config()["note"] == "test"
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
    assert a.sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  # Not Orbax's fallback to the placement saved in the checkpoint, "unsafe on a different topology".
  assert not [w for w in recwarn if "Sharding info not provided" in str(w.message)]
  ckpt.close()


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(dataset, tmp_path,
                                                                         monkeypatch):
  """One NaN pixel in step 3's batch turns the real step's losses NaN: the run stops at the next log
  step, before the checkpoint of step 4 is written, and names the first bad step."""
  make_batches = input_pipeline.train_batches

  def batches_with_a_nan_pixel_at_step_3(*args, start_step=0, **kwargs):
    for step, batch in enumerate(make_batches(*args, start_step=start_step, **kwargs), start_step + 1):
      if step == 3:
        batch = dict(batch, B=batch["B"].copy())
        batch["B"][0, 0, 0, 0] = np.nan
      yield batch

  monkeypatch.setattr(input_pipeline, "train_batches", batches_with_a_nan_pixel_at_step_3)
  config = tiny_config(dataset, tmp_path)
  config.train.log_every_steps = 4  # the check still runs before the checkpoint at step 4
  # The NaN reaches every term of step 3; the first loss term in the step's order (D updates first) is named.
  expected = (r"non-finite loss term D/adv_A_cam at step 3 \(also: .*G/cycle_B.*G/grad_norm.*\); "
              r"stopped\. The last good checkpoint is step 2")
  with pytest.raises(train.NonFiniteLossError, match=expected):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2"]


def test_an_overflowing_gradient_at_a_checkpoint_step_keeps_that_checkpoint_from_being_written(
    dataset, tmp_path, monkeypatch):
  """What a float16 overflow in G's backward pass looks like: every loss of the step finite, the
  gradient infinite, G's weights NaN after Adam's update. At a checkpoint step only the gradient norm
  shows it (the losses turn NaN one step later), and it is checked like the losses."""
  original_loss, original_update = step_lib.generator_loss, step_lib.generator_update

  def loss_that_overflows(gen_params, disc_params, spectral, batch, **kwargs):
    batch = dict(batch)
    overflow = batch.pop("overflow")
    loss, aux = original_loss(gen_params, disc_params, spectral, batch, **kwargs)
    s = jnp.sum(jax.tree.leaves(gen_params)[0] * 1e30)  # zero in value below; gradient 1e60 -> inf
    return loss + jnp.where(overflow, 1e30, 0.0) * (s - jax.lax.stop_gradient(s)), aux

  def update_that_overflows_at_step_4(state, batch, **kwargs):
    return original_update(state, {**batch, "overflow": state.step + 1 == 4}, **kwargs)

  monkeypatch.setattr(step_lib, "generator_loss", loss_that_overflows)
  monkeypatch.setattr(step_lib, "generator_update", update_that_overflows_at_step_4)
  # This step is this test's own program, and what is asserted (infinite or not) no rounding can change:
  # it compiles quickly (conftest.quick_compiles); the programs shared through the cache do not.
  compile_everywhere = train.compile_everywhere

  def compile_quickly(*args):
    with quick_compiles():
      return compile_everywhere(*args)

  monkeypatch.setattr(train, "compile_everywhere", compile_quickly)
  config = tiny_config(dataset, tmp_path)  # checkpoints at steps 2 and 4
  expected = r"non-finite gradient G/grad_norm at step 4 \(also: none\).*last good checkpoint is step 2"
  with pytest.raises(train.NonFiniteLossError, match=expected):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2"]


def test_accumulator_means_and_first_bad_step():
  acc = None
  for step, value in enumerate([1.0, 3.0], start=1):
    acc = train.accumulate(acc, {"a": jnp.float32(value)}, jnp.int32(step))
  assert train.summarize(acc) == {"a": 2.0}
  acc = train.accumulate(acc, {"a": jnp.float32(np.inf)}, jnp.int32(3))
  acc = train.accumulate(acc, {"a": jnp.float32(np.nan)}, jnp.int32(4))
  with pytest.raises(train.NonFiniteLossError, match="term a at step 3"):
    train.summarize(acc)
  # At the same step, the loss term is named before the gradient norm it made NaN; a gradient alone too.
  both = train.accumulate(None, {"G/grad_norm": jnp.float32(np.nan), "G/recon_A": jnp.float32(np.nan)},
                          jnp.int32(5))
  with pytest.raises(train.NonFiniteLossError, match=r"loss term G/recon_A at step 5 \(also: G/grad_norm\)"):
    train.summarize(both)
  alone = train.accumulate(None, {"D/grad_norm": jnp.float32(np.inf), "D/loss": jnp.float32(1.0)},
                           jnp.int32(7))
  with pytest.raises(train.NonFiniteLossError, match="non-finite gradient D/grad_norm at step 7"):
    train.summarize(alone)


def test_profile_window_skips_the_warm_up_and_stays_within_the_run():
  assert train.profile_window(0, 100, 1, 0) is None
  assert train.profile_window(0, 100, 1, 5) == (3, 7)  # after two dispatches: compile and warm-up
  assert train.profile_window(40, 100, 10, 20) == (61, 80)  # a resumed run, 10 steps per dispatch
  assert train.profile_window(0, 4, 1, 10) == (3, 4)
  assert train.profile_window(98, 100, 1, 5) is None  # nothing left after the warm-up


def test_is_due_treats_the_last_step_like_the_others():
  assert [s for s in range(1, 8) if train.is_due(s, 3, 7)] == [3, 6, 7]
  assert [s for s in range(1, 8) if train.is_due(s, 0, 7)] == [7]


def test_a_fresh_run_traces_the_state_init_once_and_gets_create_train_states_state(tmp_path, monkeypatch):
  """initial_state needs the state's shapes (to look for a checkpoint) before the state: both come from
  one trace of the init, not two (a trace of it takes 0.35 s for configs/test.py and 1.3 s for the
  default model on 2 CPU cores, at every fresh start of main.py)."""
  from nicegan_jax import config_lib, models, sharding, train_state
  config = config_lib.with_defaults(test_config.get_config())
  nets = models.create_models(config.model)
  traces = []
  init_network_variables = train_state.init_network_variables
  monkeypatch.setattr(train_state, "init_network_variables",
                      lambda *args: (traces.append(1), init_network_variables(*args))[1])
  ckpt = checkpoints.Checkpointer(tmp_path / "checkpoints")
  try:
    state, _ = train.initial_state(config, nets, sharding.create_mesh(config.mesh), ckpt)
  finally:
    ckpt.close()
  assert len(traces) == 1
  expected = train_state.create_train_state(config, jax.random.PRNGKey(config.train.seed), nets)
  assert len(traces) == 2  # a new init function is a new trace: the count above can see a second one
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(expected))


def test_evaluation_during_training_keeps_the_best_checkpoint_by_kid(tmp_path):
  from nicegan_jax import inception
  try:
    inception.fetch_weights()
  except inception.WeightsError as e:
    pytest.skip(f"the FID Inception weights could not be fetched: {e}")
  rng = np.random.default_rng(3)
  root = tmp_path / "data"
  for split in ("trainA", "trainB", "testA", "testB"):
    (root / split).mkdir(parents=True)
    for i in range(3):  # one size: the Inception features compile once
      Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / split / f"{i}.png")
  config = tiny_config(root, tmp_path)
  config.train.eval_every_steps = 2
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  lines = [json.loads(l) for l in (workdir / "eval.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [2, 4]
  assert all(l[d]["n_real"] == 3 and l[d]["n_fake"] == 3 for l in lines for d in ("A2B", "B2A"))
  best_step = min(lines, key=lambda l: l["kid_x100_mean"])["step"]
  best = checkpoints.Checkpointer(workdir / "checkpoints_best")
  assert best.steps() == [best_step]
  assert best.restore_metadata()["kid_x100_mean"] == pytest.approx(
      min(l["kid_x100_mean"] for l in lines))
  best.close()
  assert (workdir / "eval_real_features.npz").is_file()
  tags, _ = read_tensorboard(workdir)
  assert {"eval/A2B/fid", "eval/B2A/kid_x100", "eval/kid_x100_mean"} <= tags
