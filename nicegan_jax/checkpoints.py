"""Run folders and their checkpoints: the one place that writes and reads them.

Owns: `Checkpointer` (training: async Orbax saves, keep the last K, restore the newest readable
checkpoint), `restore_for_inference` (the config and a part of the state, from a workdir or one
checkpoint folder, for translate, test, evaluate and export), the same-model check, and `local_path`
(run folders are local paths). Each checkpoint `<workdir>/checkpoints/<step>/` holds the whole
`TrainState` (step, params, spectral-norm vectors, both optimiser states) and the resolved config
as JSON. Checkpoints of older versions, whose state also held an unused `rng` key, restore as well:
fields the state no longer has are left unread.

What can go wrong when reading, and what happens:

* A save that never finished leaves only a temporary folder (Orbax renames a checkpoint when it is
  complete), which is not a checkpoint.
* A checkpoint whose own files do not read or decode (truncated, zeroed, missing pieces, a config
  that is not JSON) is *damaged*: the next older one is tried, with a warning. Training then renames
  the damaged newer ones `unreadable-<step>-<time>` (kept, never deleted), so its next saves do not
  collide with them; the read-only modes move nothing.
* If checkpoints exist and none can be restored, `CheckpointError` names each with its damage and
  says how to start over on purpose; nothing is moved and nothing starts from step 0.
* A checkpoint of another model (`ModelMismatchError`), and any failure that is not damage of the
  checkpoint's own files (a permission error, a full disk, out of memory), stop at once with
  `CheckpointError` and move nothing: only damage may set a checkpoint aside.

A failed restore abandons Orbax's other reads: TensorStore's completion callbacks post to Orbax's
event loop after it has closed, asyncio reports each read it never awaited, and each read coroutine,
when the garbage collector closes it unfinished, raises from its `GeneratorExit`. All three print
tracebacks (hundreds for a real model, whenever the collector runs: possibly much later) that say
nothing the warning does not. Reading first installs filters that drop exactly those and pass
everything else on.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
import sys
import time
import traceback
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp


URLS_NOT_SUPPORTED = ("URLs (gs://, s3://, ...) are not supported; use a path on a filesystem every host "
                      "mounts (NFS, Filestore, or the bucket through gcsfuse)")
STATE, CONFIG, METADATA = "state", "config", "metadata"  # the items of a checkpoint
# Model fields that change how, not what, is computed (conv_weight_grad: conv_impl's name before it).
EXECUTION_ONLY = ("dtype", "remat", "conv_impl", "conv_weight_grad")

# TensorStore's status codes: the checkpoint's bytes are bad, or the machine is (retrying may work).
DAMAGE_STATUS = ("DATA_LOSS", "FAILED_PRECONDITION", "NOT_FOUND", "OUT_OF_RANGE", "INVALID_ARGUMENT")
ENVIRONMENT_STATUS = ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                      "ABORTED", "CANCELLED", "UNAUTHENTICATED", "INTERNAL", "UNKNOWN")
_STATUS = re.compile(r"\b(" + "|".join(DAMAGE_STATUS + ENVIRONMENT_STATUS) + r"):")


class CheckpointError(Exception):
  """Checkpoints that cannot be used as they are; the message names them and what to do."""


class ModelMismatchError(CheckpointError):
  """The checkpoints hold a different model than the one configured."""


class DamagedCheckpoint(Exception):
  """One checkpoint's own files do not read or decode (the message says which and how)."""


def is_url(path) -> bool:
  return "://" in str(path)


def local_path(path, what: str = "workdir") -> pathlib.Path:
  """`path` as a pathlib.Path, refusing URLs: pathlib would quietly turn gs://bucket/run into a local
  folder gs:/bucket/run on every host."""
  if is_url(path):
    raise ValueError(f"{what} {path}: {URLS_NOT_SUPPORTED}")
  return pathlib.Path(path).expanduser()


# ------------------------------------------------------------------------------ quiet failed reads
def is_orphaned_restore_callback(unraisable) -> bool:
  """Whether an unraisable exception is a completion callback of an abandoned restore posting to its
  closed event loop (raised in a TensorStore thread, so attached to no Python object)."""
  if unraisable.object is not None or not isinstance(unraisable.exc_value, RuntimeError):
    return False
  if str(unraisable.exc_value) != "Event loop is closed":
    return False
  return any(frame.name == "call_soon_threadsafe" for frame in traceback.extract_tb(unraisable.exc_traceback))


def is_orbax_file(filename: str) -> bool:
  """Whether a source file belongs to Orbax."""
  return "/orbax/" in filename.replace("\\", "/")


def raised_in_orbax(error: BaseException | None) -> bool:
  """Whether `error`, or an exception it was raised from, passed through Orbax's code."""
  return error is not None and any(is_orbax_file(frame.filename) for link in _chain(error)
                                   for frame in traceback.extract_tb(link.__traceback__))


# The checkpoint folders a restore has started reading and not finished reading successfully: a read
# abandoned by a failed restore may be reported while the failure unwinds, or much later.
_UNFINISHED_READS: set[str] = set()


def names_an_unfinished_read(text: str) -> bool:
  """Whether `text` (a TensorStore error) names a file inside a folder in `_UNFINISHED_READS`."""
  return any(folder + "/" in text for folder in _UNFINISHED_READS)


class AbandonedOrbaxReads(logging.Filter):
  """Drops asyncio's "exception was never retrieved" reports of Orbax reads abandoned by a failed
  restore (the failure itself is reported once, by the reader). The message alone may not name Orbax
  (a TensorStore error names the file), so the exception decides: its traceback passed through Orbax,
  or, for a TensorStore future failed outside Python (no traceback at all), it names a file of a
  checkpoint whose restore failed."""

  def filter(self, record):
    message = record.getMessage()
    if "exception was never retrieved" not in message:
      return True
    error = record.exc_info[1] if record.exc_info else None
    if "orbax" in message or raised_in_orbax(error):
      return False
    return not (error is not None and names_an_unfinished_read(str(error)))


def is_abandoned_read_coroutine(unraisable) -> bool:
  """Whether an unraisable exception is an Orbax read coroutine of a failed restore, closed unfinished
  by the garbage collector: Orbax re-raises the `GeneratorExit` closing it as an Exception."""
  code = getattr(unraisable.object, "cr_code", None)
  return (code is not None and is_orbax_file(code.co_filename)
          and isinstance(unraisable.exc_value.__cause__, GeneratorExit))


def drop_orphaned_restore_callbacks() -> None:
  """Wraps the current `sys.unraisablehook` so it ignores `is_orphaned_restore_callback` and
  `is_abandoned_read_coroutine` exceptions, and filters `AbandonedOrbaxReads` out of asyncio's log
  (idempotent)."""
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, AbandonedOrbaxReads) for f in asyncio_log.filters):
    asyncio_log.addFilter(AbandonedOrbaxReads())
  passed_on = sys.unraisablehook
  if getattr(passed_on, "drops_orphaned_restore_callbacks", False):
    return

  def hook(unraisable):
    if not (is_orphaned_restore_callback(unraisable) or is_abandoned_read_coroutine(unraisable)):
      passed_on(unraisable)

  hook.drops_orphaned_restore_callbacks = True
  sys.unraisablehook = hook


class QuietOrbaxInfo(logging.Filter):
  """Orbax narrates every save and restore at INFO (dozens of lines a run); keep its warnings and
  errors only. Entry points add it to their log handler."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or not is_orbax_file(record.pathname)


# -------------------------------------------------------------------------- what a failure means
def _chain(error: BaseException):
  """`error`, then its causes and contexts."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _first_line(error: BaseException, limit: int = 200) -> str:
  text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return text if len(text) <= limit else text[:limit] + "..."


def is_environment_error(error: BaseException) -> bool:
  """Whether reading failed because of the machine, not the bytes: memory, permissions, a full or
  failing disk, a service that did not answer. Such a checkpoint may read fine next time."""
  for e in _chain(error):
    if isinstance(e, MemoryError) or isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
      return True
    status = _STATUS.search(str(e))
    if status and status.group(1) in ENVIRONMENT_STATUS:
      return True
  return False


def damage_of(error: BaseException) -> str | None:
  """What `error`, raised while reading one checkpoint, says is wrong with that checkpoint's own files,
  or None when it is not such damage (the machine, another model, anything unknown)."""
  if is_environment_error(error):
    return None
  for e in _chain(error):
    if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
      return f"a JSON file of it does not decode ({_first_line(e)})"
    if isinstance(e, FileNotFoundError):
      return f"a file of it is missing ({e.filename or _first_line(e)})"
    if isinstance(e, KeyError) and "was not found in the checkpoint" in str(e):
      return f"a part of it is missing ({_first_line(e)})"
    status = _STATUS.search(str(e))
    if status and status.group(1) in DAMAGE_STATUS:
      return _first_line(e)[status.start():]
  return None


def is_shape_mismatch(error: BaseException) -> bool:
  return any("is not compatible with the stored shape" in str(e) for e in _chain(error))


def state_metadata_missing(step_dir: pathlib.Path) -> bool:
  """Whether the array metadata of a checkpoint's state is missing or empty (the state then cannot be
  matched to anything, which Orbax reports as a tree-structure error)."""
  try:
    meta = ocp.PyTreeCheckpointer().metadata(step_dir / STATE)
  except Exception as e:  # the metadata itself does not read
    return not is_environment_error(e)
  item = getattr(meta, "item_metadata", meta)
  return item is None or not jax.tree.leaves(getattr(item, "tree", item))


# ------------------------------------------------------------------------- same model or another
def model_differences(saved: dict, current: dict) -> list[str]:
  """'model.<field>: saved X, configured Y' for every field that changes what is computed."""
  fields = sorted((set(saved) | set(current)) - set(EXECUTION_ONLY))
  return [f"model.{k}: saved {saved.get(k)!r}, configured {current.get(k)!r}"
          for k in fields if saved.get(k) != current.get(k)]


def check_same_model(config_dict: dict, model: dict, directory: pathlib.Path) -> None:
  """Raises ModelMismatchError when a checkpoint's saved config holds another model than `model`."""
  saved = config_dict.get("model")
  if not isinstance(saved, dict):
    raise CheckpointError(f"{directory} holds a config without a model section: not a checkpoint of "
                          "this program; use another --workdir")
  differences = model_differences(saved, model)
  if differences:
    raise ModelMismatchError(f"{directory} holds checkpoints of a different model ("
                             + ", ".join(differences) + "); use another --workdir or the saved settings")


# ------------------------------------------------------------------------------------- reading
def list_steps(root: pathlib.Path) -> list[int]:
  """The complete checkpoints under a checkpoints folder, ascending (a save in progress is a
  temporary folder, not listed; nor are folders set aside as unreadable)."""
  if not root.is_dir():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def read_step(step_dir: pathlib.Path, state_args: Callable[[dict], Any] | None = None) -> tuple[dict, Any]:
  """(config dict, state) of one checkpoint folder; the state is restored with `state_args(config)`
  (Orbax restore args, from the saved config; None: the config only).

  Raises DamagedCheckpoint when the checkpoint's own files do not read or decode, and CheckpointError
  (ModelMismatchError) for anything else, naming the folder; `state_args` may raise CheckpointError too.
  """
  drop_orphaned_restore_callbacks()  # before the first attempt: the callbacks can beat the except
  step_dir = step_dir.absolute()  # Orbax wants absolute paths
  _UNFINISHED_READS.add(str(step_dir))  # kept if the read fails: its abandoned reads report later
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  try:
    config = checkpointer.restore(step_dir, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
    config = config[CONFIG]
    if not isinstance(config, dict):
      raise DamagedCheckpoint(f"its config is a JSON {type(config).__name__}, not an object")
    state = None
    if state_args is not None:
      state = checkpointer.restore(step_dir, args=ocp.args.Composite(**{STATE: state_args(config)}))[STATE]
      missing = unrestored_fields(state)
      if missing:  # a partial restore leaves what the checkpoint lacks as its placeholder: never train on it
        raise CheckpointError(f"the checkpoint {step_dir} holds no {', '.join(missing)} (not written by "
                              "this program, or by a version with another state); nothing was moved: use "
                              "another --workdir")
  except (CheckpointError, DamagedCheckpoint):
    raise
  except Exception as e:
    if is_shape_mismatch(e):
      raise ModelMismatchError(f"{step_dir} holds arrays of other shapes than the model its config "
                               f"describes ({_first_line(e)}); use another --workdir") from None
    reason = damage_of(e)
    if reason is None and not is_environment_error(e) and state_metadata_missing(step_dir):
      reason = "its state's array metadata is missing"
    if reason:
      raise DamagedCheckpoint(reason) from None
    raise CheckpointError(f"cannot read the checkpoint {step_dir} ({type(e).__name__}: {_first_line(e)}); "
                          "nothing was moved: fix the cause and run again") from e
  finally:
    checkpointer.close()
  _UNFINISHED_READS.discard(str(step_dir))
  return config, state


def restore_newest(root: pathlib.Path, state_args: Callable[[dict], Any], *,
                   set_aside_damaged: bool) -> tuple[dict | None, Any, int | None]:
  """(config dict, state, step) of the newest checkpoint under `root` that restores, or (None, None,
  None) when there is none. Damaged newer ones are skipped with a warning (and, with
  `set_aside_damaged`, renamed once an older one restored); CheckpointError when checkpoints exist
  and every one is damaged, or on any failure that is not damage."""
  damaged = []
  for step in reversed(list_steps(root)):
    try:
      config, state = read_step(root / str(step), state_args)
    except DamagedCheckpoint as e:
      logging.warning("The checkpoint at step %d in %s is damaged: %s; trying the one before it.",
                      step, root, e)
      damaged.append((step, str(e)))
      continue
    if damaged and set_aside_damaged:
      set_aside(root, [s for s, _ in damaged])
    return config, state, step
  if damaged:
    raise CheckpointError(
        f"none of the checkpoints in {root} can be restored (" +
        "; ".join(f"step {s}: {why}" for s, why in damaged) + "); nothing was moved. To start over on "
        f"purpose, move {root} away (or use another --workdir)")
  return None, None, None


def set_aside(root: pathlib.Path, steps: list[int]) -> None:
  """Renames damaged checkpoints (kept for inspection, never deleted) so training can go on."""
  stamp = time.strftime("%Y%m%d-%H%M%S")
  for step in steps:
    src = root / str(step)
    if src.exists():
      dst = root / f"unreadable-{step}-{stamp}"
      src.rename(dst)
      logging.warning("Moved the damaged checkpoint %s to %s", src, dst)


def checkpoints_root(path: pathlib.Path) -> pathlib.Path:
  """A workdir or its checkpoints/ folder -> the checkpoints folder."""
  return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def is_checkpoint_folder(path: pathlib.Path) -> bool:
  return (path / STATE).is_dir()


def unrestored_fields(state) -> list[str]:
  """The state's fields (its top-level names) with leaves still `jax.ShapeDtypeStruct` placeholders after
  a partial restore: what the checkpoint did not hold."""
  first = lambda path: str(getattr(path[0], "name", getattr(path[0], "key", path[0])))
  return sorted({first(path) for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
                 if isinstance(leaf, jax.ShapeDtypeStruct)})


def first_local_device() -> jax.sharding.SingleDeviceSharding:
  """This process's first device, where restores put what nothing else places."""
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def restore_args_of(abstract) -> ocp.args.PyTreeRestore:
  """Orbax's arguments to restore `abstract` (ShapeDtypeStructs carrying their shardings) out of a saved
  state that may hold more: a part of it, or the whole state of a version with fields since dropped.
  A leaf without a sharding (plain `jax.eval_shape` output) goes to this process's first device, as a new
  array would, never to the placement recorded in the checkpoint (another machine's, perhaps)."""
  default = first_local_device()
  restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(restore_type=jax.Array, dtype=x.dtype,
                                     sharding=default if x.sharding is None else x.sharding), abstract)
  return ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)


def restore_for_inference(path, wanted: Callable[[dict], Any]) -> tuple[dict, Any, int]:
  """(config dict, restored part of the state, step) for translation: from a workdir (its newest
  readable checkpoint; damaged newer ones are skipped with a warning, and nothing is moved), its
  checkpoints/ folder, or one checkpoint folder (that one, or CheckpointError).

  `wanted(config)`: a pytree of jax.ShapeDtypeStructs, a part of the TrainState's fields (e.g.
  gen_params only); it is restored onto this process's first device whatever topology saved it.
  """
  path = local_path(path, "checkpoint path").absolute()

  def state_args(config):
    return restore_args_of(abstract_like(wanted(config), first_local_device()))

  if is_checkpoint_folder(path):
    try:
      config, state = read_step(path, state_args)
    except DamagedCheckpoint as e:
      raise CheckpointError(f"the checkpoint {path} is damaged: {e}; give its workdir instead to use the "
                            "newest readable checkpoint") from None
    return config, state, int(path.name) if path.name.isdigit() else -1
  root = checkpoints_root(path)
  config, state, step = restore_newest(root, state_args, set_aside_damaged=False)
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {path} (expected a workdir with checkpoints/<step>/)")
  return config, state, step


# ------------------------------------------------------------------------------------ training
class Checkpointer:
  """Saves and restores `TrainState`s under `directory` (usually `<workdir>/checkpoints`)."""

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE, CONFIG, METADATA))

  def save(self, step: int, state, config_dict: dict, metadata: dict | None = None) -> None:
    """Starts an async save of `state` at `step` (returns before the write is complete)."""
    items = {STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(config_dict)}
    if metadata is not None:
      items[METADATA] = ocp.args.JsonSave(metadata)
    self._manager.save(step, args=ocp.args.Composite(**items))

  def steps(self) -> list[int]:
    """The steps saved or being saved (an async save in flight counts: it completes before close)."""
    return sorted(self._manager.all_steps())

  def restore_latest(self, abstract_state, model: dict | None = None):
    """(state, step) from the newest readable checkpoint, or (None, None) when there is none.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s carrying the target shardings, so a
    checkpoint written on any device topology is restored onto the current one. With `model` (the
    configured `config.model` as a dict), a checkpoint of another model raises ModelMismatchError
    before anything is restored. Damaged newer checkpoints are set aside (see the module docstring).
    """
    def state_args(config):
      if model is not None:
        check_same_model(config, model, self.directory)
      return restore_args_of(abstract_state)

    _, state, step = restore_newest(self.directory, state_args, set_aside_damaged=jax.process_index() == 0)
    self._manager.reload()
    return state, step

  def restore_config(self, step: int | None = None) -> dict:
    """The config saved with the checkpoint at `step` (default: the newest)."""
    step = self.steps()[-1] if step is None else step
    try:
      return read_step(self.directory / str(step))[0]
    except DamagedCheckpoint as e:
      raise CheckpointError(f"the checkpoint {self.directory / str(step)} is damaged: {e}") from None

  def restore_metadata(self, step: int | None = None) -> dict | None:
    """The JSON metadata saved with a checkpoint (e.g. the best checkpoint's scores), if any."""
    step = self._manager.latest_step() if step is None else step
    if step is None:
      return None
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()}))
      return restored[METADATA]
    except Exception as e:  # saved without metadata, or its metadata does not decode
      if is_environment_error(e):
        raise
      return None

  def reached_preemption(self, step: int) -> bool:
    """Whether all processes have agreed to stop at `step` (JAX's preemption sync point)."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(state_shapes, sharding) -> object:
  """ShapeDtypeStructs of `state_shapes` (from jax.eval_shape) placed with `sharding`: one sharding
  for every leaf, or a pytree of shardings matching `state_shapes`."""
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, state_shapes)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_shapes,
                      sharding)
