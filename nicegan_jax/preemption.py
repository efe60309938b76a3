"""Stopping a run cleanly: Ctrl-C, SIGTERM or a preemption notice ends training with a checkpoint.

Owns: `StopRequests`, which the training loop asks after every dispatch whether to stop, and
`TrainingInterrupted`, which the loop raises once the stop's checkpoint is saved.

- One process: the first SIGINT or SIGTERM (Ctrl-C, `kill`, a scheduler's or a notebook's interrupt)
  is only noted, so the step in flight finishes and the loop saves a checkpoint at it before stopping;
  the signal's previous handler is put back at once, so a second one acts as it always does. A signal
  the process was started with ignored (SIGINT, for a job a script started with `cmd &`) stays
  ignored, as whoever started it asked.
- Several processes: every process has to stop at the same step, or the collective save would wait
  forever. JAX's preemption sync manager (started by `jax.distributed.initialize`) catches SIGTERM on
  any host — the notice that preemptible TPU and GPU VMs get — and agrees on a step with all the others
  through the coordination service; no handler is installed here then.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
  """Training stopped on a signal after saving a checkpoint at `step` (a KeyboardInterrupt, so that
  `except Exception` does not swallow the stop)."""

  def __init__(self, step: int, signum: int, checkpoint_dir):
    self.step, self.signum, self.checkpoint_dir = step, signum, checkpoint_dir
    super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}, with a checkpoint in "
                     f"{checkpoint_dir}; run the same command to resume")


class StopRequests:
  """`install()` before the loop, `stop_signal(step, ckpt)` after each dispatch, `restore()` after."""

  def __init__(self):
    self.received: list[int] = []
    self._previous: dict[int, object] = {}

  def install(self) -> "StopRequests":
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
      return self  # several processes: JAX's preemption sync; off the main thread signals cannot be caught
    for signum in SIGNALS:
      if signal.getsignal(signum) is not signal.SIG_IGN:
        self._previous[signum] = signal.signal(signum, self._note)
    return self

  def _note(self, signum, frame) -> None:
    del frame
    self.received.append(signum)
    self._put_back(signum)  # a second one acts at once
    logging.warning("%s: stopping after this step, with a checkpoint (send it again to stop at once)",
                    signal.Signals(signum).name)

  def stop_signal(self, step: int, ckpt) -> int | None:
    """The signal to stop for after `step`, or None to go on. Several processes call this at the
    same steps, and all get the same answer at the same step."""
    if jax.process_count() > 1:
      return signal.SIGTERM if ckpt.reached_preemption(step) else None
    return self.received[0] if self.received else None

  def restore(self) -> None:
    for signum in list(self._previous):
      self._put_back(signum)

  def _put_back(self, signum: int) -> None:
    previous = self._previous.pop(signum)
    signal.signal(signum, signal.SIG_DFL if previous is None else previous)  # None: set outside Python
