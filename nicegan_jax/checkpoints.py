"""Checkpoints with Orbax: async saves, keep the last K, restore the newest complete one.

Owns: `Checkpointer` and `local_path` (run folders are local paths). Each checkpoint holds the whole
`TrainState` (step, params, spectral-norm vectors, both optimiser states, rng) and the resolved config
as JSON. Orbax writes a checkpoint under a temporary name and renames it when complete, so a run killed
while saving leaves nothing that looks like a checkpoint; a checkpoint that is present but unreadable
(damaged on disk) is skipped with a warning and the next older one is restored.
"""

from __future__ import annotations

import logging
import pathlib
import time

import jax
import orbax.checkpoint as ocp


URLS_NOT_SUPPORTED = ("URLs (gs://, s3://, ...) are not supported; use a path on a filesystem every host "
                      "mounts (NFS, Filestore, or the bucket through gcsfuse)")


def is_url(path) -> bool:
  return "://" in str(path)


def local_path(path, what: str = "workdir") -> pathlib.Path:
  """`path` as a pathlib.Path, refusing URLs: pathlib would quietly turn gs://bucket/run into a local
  folder gs:/bucket/run on every host."""
  if is_url(path):
    raise ValueError(f"{what} {path}: {URLS_NOT_SUPPORTED}")
  return pathlib.Path(path).expanduser()


class QuietOrbaxInfo(logging.Filter):
  """Orbax narrates every save and restore at INFO (dozens of lines a run); keep its warnings and
  errors only. Entry points add it to their log handler."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


class Checkpointer:
  """Saves and restores `TrainState`s under `directory` (usually `<workdir>/checkpoints`)."""

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "config", "metadata"))

  def save(self, step: int, state, config_dict: dict, metadata: dict | None = None) -> None:
    """Starts an async save of `state` at `step` (returns before the write is complete)."""
    items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_dict))
    if metadata is not None:
      items["metadata"] = ocp.args.JsonSave(metadata)
    self._manager.save(step, args=ocp.args.Composite(**items))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore_latest(self, abstract_state):
    """(state, step) from the newest readable checkpoint, or (None, None) when there is none.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s carrying the target shardings, so a
    checkpoint written on any device topology is restored onto the current one.
    """
    unreadable = []
    restored = step = None
    for candidate in reversed(self.steps()):
      try:
        restored = self._manager.restore(candidate, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]
        step = candidate
        break
      except Exception as e:  # a damaged checkpoint: fall back to the previous one
        logging.warning("Checkpoint at step %d in %s is unreadable (%s: %s); trying an older one.",
                        candidate, self.directory, type(e).__name__, e)
        unreadable.append(candidate)
    if unreadable and jax.process_index() == 0:
      self._set_aside(unreadable)
    return restored, step

  def _set_aside(self, steps: list[int]) -> None:
    """Renames unreadable checkpoints (kept for inspection, never deleted) so training can go on."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for step in steps:
      src = self.directory / str(step)
      if src.exists():
        dst = self.directory / f"unreadable-{step}-{stamp}"
        src.rename(dst)
        logging.warning("Moved the unreadable checkpoint %s to %s", src, dst)
    self._manager.reload()

  def restore_config(self, step: int | None = None) -> dict:
    step = self._manager.latest_step() if step is None else step
    return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def restore_metadata(self, step: int | None = None) -> dict | None:
    """The JSON metadata saved with a checkpoint (e.g. the best checkpoint's scores), if any."""
    step = self._manager.latest_step() if step is None else step
    if step is None:
      return None
    try:
      return self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
    except Exception:  # saved without metadata
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
