"""Reading run folders: damaged checkpoints are skipped (and only damage is), nothing good is ever moved,
no run starts over from step 0 on top of checkpoints, and every mode reads them the same way."""

import asyncio
import errno
import gc
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import time
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import test as test_config
from conftest import ROOT, write_tiny_checkpoint
from nicegan_jax import checkpoints, inference, models, train_state


# --------------------------------------------------------------------------- a run folder to damage
@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  """A workdir with intact checkpoints at steps 2 and 4 of the tiny model (4 holds other weights)."""
  root = tmp_path_factory.mktemp("pristine")
  config = test_config.get_config()
  config.data.path = str(root / "data")
  _, _, state2 = write_tiny_checkpoint(root / "run" / "checkpoints", 2, config)
  config.train.seed = 1
  nets = models.create_models(config.model)
  state4 = train_state.create_train_state(config, jax.random.PRNGKey(1), nets)
  writer = checkpoints.Checkpointer(root / "run" / "checkpoints", async_save=False)
  writer.save(4, state4, config.to_dict())
  writer.close()
  return root / "run", config, jax.device_get(state2), jax.device_get(state4)


@pytest.fixture
def run(pristine, tmp_path):
  """A fresh copy of the pristine workdir, to damage."""
  workdir = tmp_path / "run"
  shutil.copytree(pristine[0], workdir)
  return workdir


def names(workdir: pathlib.Path) -> list[str]:
  return sorted(p.name for p in (workdir / "checkpoints").iterdir())


def truncate_files(step_dir: pathlib.Path) -> None:
  for f in step_dir.rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


DAMAGE = {
    "every file truncated": truncate_files,
    "manifest zeroed": lambda d: (d / "state" / "manifest.ocdbt").write_bytes(b"\0" * 64),
    "data files removed": lambda d: [f.unlink() for f in (d / "state" / "ocdbt.process_0" / "d").iterdir()],
    "config not JSON": lambda d: (d / "config" / "metadata").write_text("{not json"),
    "state metadata garbage": lambda d: (d / "state" / "_METADATA").write_text("xx"),
    "state metadata removed": lambda d: (d / "state" / "_METADATA").unlink(),
    "state item removed": lambda d: shutil.rmtree(d / "state" / "ocdbt.process_0"),
}


def abstract_state(config=None, seed=0):
  config = config or test_config.get_config()
  nets = models.create_models(config.model)
  shapes = jax.eval_shape(lambda: train_state.create_train_state(config, jax.random.PRNGKey(seed), nets))
  return checkpoints.abstract_like(shapes, checkpoints.first_local_device())


def assert_state_equal(restored, reference):
  for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------- what is damage
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_each_kind_of_damage_is_recognised_and_training_restores_the_older_checkpoint(
    pristine, run, damage, caplog, monkeypatch):
  DAMAGE[damage](run / "checkpoints" / "4")
  unraisable_seen = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable_seen.append)
  ckpt = checkpoints.Checkpointer(run / "checkpoints")
  state, step = ckpt.restore_latest(abstract_state(), model=pristine[1].model.to_dict())
  ckpt.close()
  gc.collect()  # the reads the failed restore abandoned: dropped, even when collected later
  assert [repr(u.exc_value)[:200] for u in unraisable_seen] == []
  assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
  assert step == 2
  assert_state_equal(state, pristine[2])
  moved = [n for n in names(run) if n.startswith("unreadable-4-")]
  assert len(moved) == 1 and names(run) == ["2", moved[0]]
  warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(warnings) == 1 and "step 4" in warnings[0]


class StateWithRng(flax.struct.PyTreeNode):
  """TrainState as earlier versions saved it: the same fields and an unused PRNG key."""
  step: jax.Array
  gen_params: dict
  disc_params: dict
  spectral: dict
  g_opt_state: object
  d_opt_state: object
  rng: jax.Array


def test_a_checkpoint_of_an_earlier_version_with_an_rng_key_restores_for_training_and_translation(pristine, tmp_path):
  config, state2 = pristine[1], pristine[2]
  old = StateWithRng(**{f: getattr(state2, f) for f in train_state.TrainState.__dataclass_fields__},
                     rng=jax.random.split(jax.random.PRNGKey(5))[1])  # as create_train_state kept it
  writer = checkpoints.Checkpointer(tmp_path / "run" / "checkpoints", async_save=False)
  writer.save(2, old, config.to_dict())
  writer.close()
  assert "rng" in (tmp_path / "run" / "checkpoints" / "2" / "state" / "_METADATA").read_text()
  ckpt = checkpoints.Checkpointer(tmp_path / "run" / "checkpoints")
  state, step = ckpt.restore_latest(abstract_state(), model=config.model.to_dict())
  ckpt.close()
  assert step == 2 and isinstance(state, train_state.TrainState)
  assert_state_equal(state, state2)
  translator = inference.load_translator(tmp_path / "run")
  assert translator.step == 2


def test_a_checkpoint_missing_a_field_of_the_state_is_not_restored_with_a_gap(pristine, tmp_path):
  """Restoring tolerates fields the state no longer has, never fields it has that were not saved."""
  config, state2 = pristine[1], pristine[2]
  partial = {f: getattr(state2, f) for f in train_state.TrainState.__dataclass_fields__ if f != "d_opt_state"}
  writer = checkpoints.Checkpointer(tmp_path / "checkpoints", async_save=False)
  writer.save(2, partial, config.to_dict())
  writer.close()
  ckpt = checkpoints.Checkpointer(tmp_path / "checkpoints")
  with pytest.raises(checkpoints.CheckpointError, match=r"/2 holds no d_opt_state \(not written by this "
                     r"program.*nothing was moved"):
    ckpt.restore_latest(abstract_state(), model=config.model.to_dict())
  ckpt.close()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
  # Translation restores only the generators' weights (and the discriminators', for the encoders).
  no_generators = {f: getattr(state2, f) for f in train_state.TrainState.__dataclass_fields__
                   if f != "gen_params"}
  writer = checkpoints.Checkpointer(tmp_path / "inference" / "checkpoints", async_save=False)
  writer.save(3, no_generators, config.to_dict())
  writer.close()
  with pytest.raises(checkpoints.CheckpointError, match=r"/3 holds no gen_params \(not written by this"):
    inference.load_translator(tmp_path / "inference")


@pytest.mark.parametrize("error", [
    PermissionError(errno.EACCES, "Permission denied", "x"), OSError(errno.ENOSPC, "No space left on device"),
    MemoryError(), ValueError("PERMISSION_DENIED: Error opening file"),
    ValueError("RESOURCE_EXHAUSTED: out of memory"), RuntimeError("something nobody foresaw")],
    ids=["permission", "disk full", "out of memory", "tensorstore permission", "tensorstore memory",
         "unknown"])
def test_a_failure_that_is_not_damage_stops_and_moves_nothing(pristine, run, monkeypatch, error):
  def failing_restore(self, directory, *args, **kwargs):
    raise error
  monkeypatch.setattr(ocp.Checkpointer, "restore", failing_restore)
  ckpt = checkpoints.Checkpointer(run / "checkpoints")
  expected = r"cannot read the checkpoint .*/4 .*nothing was moved"
  with pytest.raises(checkpoints.CheckpointError, match=expected):
    ckpt.restore_latest(abstract_state(), model=pristine[1].model.to_dict())
  assert names(run) == ["2", "4"]
  with pytest.raises(checkpoints.CheckpointError, match="nothing was moved"):
    inference.load_translator(run)


def test_damage_is_read_from_the_whole_chain_of_causes():
  try:
    try:
      raise ValueError('DATA_LOSS: Error reading "x" in OCDBT database')
    except ValueError as inner:
      raise Exception("Encountered error while reading array index") from inner
  except Exception as e:
    assert checkpoints.damage_of(e).startswith("DATA_LOSS: Error reading")
  assert checkpoints.damage_of(ValueError("FAILED_PRECONDITION: Truncated Zstd")) is not None
  assert checkpoints.damage_of(ValueError("UNAVAILABLE: try again")) is None
  assert checkpoints.damage_of(TypeError("a bug")) is None
  assert checkpoints.damage_of(FileNotFoundError(errno.ENOENT, "gone", "f")) == "a file of it is missing (f)"


# ---------------------------------------------------------------------- nothing lost, nothing reset
def test_when_every_checkpoint_is_damaged_training_stops_and_names_them(pristine, run):
  for step in ("2", "4"):
    truncate_files(run / "checkpoints" / step)
  ckpt = checkpoints.Checkpointer(run / "checkpoints")
  with pytest.raises(checkpoints.CheckpointError) as error:
    ckpt.restore_latest(abstract_state(), model=pristine[1].model.to_dict())
  message = str(error.value)
  assert "none of the checkpoints" in message and "step 4:" in message and "step 2:" in message
  assert "nothing was moved" in message and "To start over on purpose, move" in message
  assert names(run) == ["2", "4"]


def test_another_model_with_a_damaged_newest_config_moves_nothing(pristine, run):
  DAMAGE["config not JSON"](run / "checkpoints" / "4")
  config = test_config.get_config()
  config.model.ch = 16
  ckpt = checkpoints.Checkpointer(run / "checkpoints")
  with pytest.raises(checkpoints.ModelMismatchError, match="model.ch: saved 8, configured 16"):
    ckpt.restore_latest(abstract_state(config), model=config.model.to_dict())
  assert names(run) == ["2", "4"]  # the intact step 2 is not "unreadable"; neither is 4 moved


def test_execution_only_fields_are_not_a_different_model():
  saved = test_config.get_config().model.to_dict()
  current = dict(saved, dtype="bfloat16", remat=True, conv_impl="cpu")
  assert checkpoints.model_differences(saved, current) == []
  assert checkpoints.model_differences(saved, dict(saved, n_res=3)) == ["model.n_res: saved 1, configured 3"]


# ------------------------------------------------------------------------ the read-only modes
def test_translation_falls_back_past_a_damaged_checkpoint_and_moves_nothing(pristine, run, caplog):
  truncate_files(run / "checkpoints" / "4")
  translator = inference.load_translator(run)
  assert translator.step == 2
  np.testing.assert_array_equal(translator.generators["A2B"]["UpBlock0_1"]["kernel"],
                                pristine[2].gen_params["gen2B"]["UpBlock0_1"]["kernel"])
  assert names(run) == ["2", "4"]
  assert any("step 4" in r.getMessage() and "is damaged" in r.getMessage() for r in caplog.records)
  assert inference.load_translator(run / "checkpoints" / "2").step == 2
  with pytest.raises(checkpoints.CheckpointError, match=r"the checkpoint .*/4 is damaged"):
    inference.load_translator(run / "checkpoints" / "4")  # asked for by name: no fallback


def test_translation_reads_the_newest_intact_checkpoint(pristine, run):
  translator = inference.load_translator(run)
  assert translator.step == 4
  np.testing.assert_array_equal(translator.encoders["B2A"]["spectral"]["fc"]["v"],
                                pristine[3].spectral["disB"]["fc"]["v"])


def test_main_modes_fall_back_or_stop_in_one_line(run, tmp_path):
  """translate with the newest checkpoint truncated: the older one, a warning, no tracebacks; then with
  every checkpoint damaged: one error line, exit status 1, nothing moved."""
  truncate_files(run / "checkpoints" / "4")
  Image.fromarray(np.full((20, 24, 3), 128, np.uint8)).save(tmp_path / "in.png")
  cmd = [sys.executable, "main.py", "--mode=translate", f"--workdir={run}", f"--input={tmp_path / 'in.png'}",
         f"--output={tmp_path / 'out'}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  for noise in ("Traceback", "Event loop is closed", "never retrieved"):
    assert noise not in result.stderr
  assert "The checkpoint at step 4" in result.stderr and (tmp_path / "out" / "in.png").is_file()
  truncate_files(run / "checkpoints" / "2")
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(f"error: none of the checkpoints in {run}")
  assert names(run) == ["2", "4"]


# --------------------------------------------------------------------- quiet abandoned reads
def closed_loop_error() -> RuntimeError:
  """The real exception a callback posting to a closed event loop raises, with its traceback."""
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(print)
  except RuntimeError as e:
    return e
  raise AssertionError("a closed loop accepted a callback")


def unraisable(exc: BaseException, obj=None):
  return types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=exc.__traceback__,
                               err_msg=None, object=obj)


def closed_coroutine_error(cause: BaseException) -> Exception:
  """An exception raised, as Orbax's read coroutines raise it, from the exception closing one."""
  error = Exception("Encountered error while reading array index")
  error.__cause__ = cause
  return error


def coroutine_of(filename: str):
  """Stands for a coroutine object whose code is in `filename` (what the filter looks at)."""
  return types.SimpleNamespace(cr_code=types.SimpleNamespace(co_filename=filename))


def test_the_filter_drops_only_callbacks_posted_to_a_closed_loop_and_closed_orbax_reads(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  checkpoints.drop_orphaned_restore_callbacks()
  checkpoints.drop_orphaned_restore_callbacks()  # a second call does not wrap the wrapper
  hook = sys.unraisablehook
  assert hook is not seen.append and hook.drops_orphaned_restore_callbacks
  orbax_file = "/site-packages/orbax/checkpoint/_src/serialization/serialization.py"
  dropped = [unraisable(closed_loop_error()),
             unraisable(closed_coroutine_error(GeneratorExit()), obj=coroutine_of(orbax_file))]
  others = [unraisable(closed_loop_error(), obj="a generator"),
            unraisable(RuntimeError("Event loop is closed")), unraisable(ValueError("something else")),
            unraisable(closed_coroutine_error(GeneratorExit()), obj=coroutine_of("/site-packages/mine.py")),
            unraisable(closed_coroutine_error(ValueError("a real bug")), obj=coroutine_of(orbax_file))]
  for args in [*dropped, *others]:
    hook(args)
  assert seen == others


def raised_from(filename: str) -> Exception:
  """An exception whose traceback runs through code in `filename`."""
  namespace = {}
  exec(compile("def read():\n  raise ValueError('NOT_FOUND: Error reading a shard')\n", filename, "exec"),
       namespace)
  try:
    namespace["read"]()
  except ValueError as e:
    return e
  raise AssertionError("read() returned")


def test_asyncios_reports_of_abandoned_orbax_reads_are_dropped_and_nothing_else():
  def record(message, error):
    exc_info = (type(error), error, error.__traceback__) if error else None
    return logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1, message, None, exc_info)

  orbax_error = raised_from("/site-packages/orbax/checkpoint/_src/serialization/serialization.py")
  wrapped = Exception("Encountered error while reading array index")
  wrapped.__cause__ = orbax_error  # as Orbax re-raises TensorStore's error
  never = "_GatheringFuture exception was never retrieved\nfuture: <_GatheringFuture finished>"
  quiet = checkpoints.AbandonedOrbaxReads()
  assert not quiet.filter(record(never, orbax_error))
  assert not quiet.filter(record(never, wrapped))
  assert quiet.filter(record(never, raised_from("/home/me/my_code.py")))
  assert quiet.filter(record(never, None))
  assert quiet.filter(record("Unclosed client session", orbax_error))


def test_a_tensorstore_read_failed_outside_python_is_dropped_only_for_a_checkpoint_that_failed(tmp_path):
  """TensorStore may fail a future of an abandoned read in its own thread: the exception then has no
  traceback, and only the file it names ties it to the failed restore (seen in a suite run, reported
  while a later test ran)."""
  def record(error):
    return logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1,
                             f"Future exception was never retrieved\nfuture: <Future finished exception={error!r}>",
                             None, (type(error), error, None))

  def tensorstore_error(folder):
    return ValueError(f'DATA_LOSS: Error opening "zarr" driver: Error reading "gen_params.gen2B.FC_2.kernel/'
                      f'.zarray" in OCDBT database at local file "{folder / "state"}/": Error decoding manifest')

  failed, good, elsewhere = tmp_path / "run" / "4", tmp_path / "good" / "2", tmp_path / "other" / "4"
  failed.mkdir(parents=True)  # a checkpoint folder with nothing in it
  with pytest.raises(checkpoints.DamagedCheckpoint):
    checkpoints.read_step(failed)
  writer = checkpoints.Checkpointer(good.parent, async_save=False)
  writer.save(2, {"w": jnp.ones((2,))}, {"any": 1})
  writer.close()
  assert checkpoints.read_step(good)[0] == {"any": 1}
  quiet = checkpoints.AbandonedOrbaxReads()
  assert not quiet.filter(record(tensorstore_error(failed)))
  assert quiet.filter(record(tensorstore_error(good)))  # read successfully: a report of it is news
  assert quiet.filter(record(tensorstore_error(elsewhere)))
  assert quiet.filter(record(ValueError("a bug in my own code")))


def test_falling_back_past_a_damaged_checkpoint_reports_it_once(tmp_path, monkeypatch, caplog):
  state = {f"layer_{i}": jnp.full((4, 4), float(i)) for i in range(64)}  # many arrays, many reads
  writer = checkpoints.Checkpointer(tmp_path, async_save=False)
  writer.save(1, state, {})
  writer.save(2, jax.tree.map(lambda x: x + 1, state), {})
  writer.close()
  manifest = tmp_path / "2" / "state" / "manifest.ocdbt"
  manifest.write_bytes(b"\0" * manifest.stat().st_size)

  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  abstract = checkpoints.abstract_like(state, checkpoints.first_local_device())
  reader = checkpoints.Checkpointer(tmp_path)
  restored, step = reader.restore_latest(abstract)
  reader.close()
  time.sleep(0.5)  # the abandoned reads' callbacks arrive from TensorStore's threads
  gc.collect()

  assert step == 1
  for name, value in restored.items():
    np.testing.assert_array_equal(value, state[name])
  assert [str(u.exc_value) for u in seen] == []
  damaged = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(damaged) == 1 and "step 2" in damaged[0]
  assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
