"""Stopping on a signal: the handlers, and main.py stopped by SIGTERM saves the step it reached, exits
with 143, and resumes from there to the same parameters as a run that never stopped."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT
from nicegan_jax import checkpoints, preemption, train
from test_train import make_dataset, tiny_config

STOP_TIMEOUT_S = 480


@pytest.fixture
def quiet_handlers():
  """Starts a test from Python's own SIGINT and SIGTERM handlers, whatever the process inherited (one
  started in the background by a shell, `cmd &`, begins with SIGINT ignored, and Python keeps it so),
  and leaves both as they were before, whatever the test did to them."""
  before = {s: signal.getsignal(s) for s in preemption.SIGNALS}
  signal.signal(signal.SIGINT, signal.default_int_handler)
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  yield
  for s, handler in before.items():
    signal.signal(s, handler)


def test_a_first_signal_is_noted_and_a_second_acts_as_before(quiet_handlers):
  seen = []
  signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))  # "as before": this one
  stop = preemption.StopRequests().install()
  assert stop.stop_signal(1, ckpt=None) is None
  os.kill(os.getpid(), signal.SIGTERM)
  assert stop.stop_signal(2, ckpt=None) == signal.SIGTERM and seen == []
  os.kill(os.getpid(), signal.SIGTERM)  # the second goes to the handler that was there before
  assert seen == [signal.SIGTERM]
  os.kill(os.getpid(), signal.SIGINT)
  with pytest.raises(KeyboardInterrupt):  # Python's own SIGINT handler is back after the first
    os.kill(os.getpid(), signal.SIGINT)
  assert stop.received == [signal.SIGTERM, signal.SIGINT]
  stop.restore()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_restore_puts_back_the_handlers_of_an_uninterrupted_run(quiet_handlers):
  before = {s: signal.getsignal(s) for s in preemption.SIGNALS}
  stop = preemption.StopRequests().install()
  assert all(signal.getsignal(s) != before[s] for s in preemption.SIGNALS)
  stop.restore()
  assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == before


def test_a_signal_the_process_ignores_stays_ignored(quiet_handlers):
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a script's `cmd &` starts a process
  stop = preemption.StopRequests().install()
  assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  assert signal.getsignal(signal.SIGTERM) == stop._note
  os.kill(os.getpid(), signal.SIGINT)
  assert stop.stop_signal(1, ckpt=None) is None and stop.received == []
  stop.restore()
  assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_the_interruption_is_a_keyboard_interrupt_naming_step_and_checkpoints():
  e = preemption.TrainingInterrupted(17, signal.SIGTERM, "/runs/x/checkpoints")
  assert isinstance(e, KeyboardInterrupt) and not isinstance(e, Exception)
  assert str(e) == ("stopped by SIGTERM at step 17, with a checkpoint in /runs/x/checkpoints; run the "
                    "same command to resume")


def wait_for_line(proc, text: str, deadline: float) -> list[str]:
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if text in line or time.time() > deadline:
      return lines
  return lines


def test_sigterm_saves_the_step_reached_and_the_run_resumes_bit_identical(tmp_path):
  dataset = make_dataset(tmp_path / "data")
  workdir = tmp_path / "run"
  cmd = [sys.executable, "main.py", "--config=configs/test.py", f"--workdir={workdir}",
         f"--config.data.path={dataset}", f"--config.data.data_dir={tmp_path / 'cache'}",
         "--config.train.num_steps=1000", "--config.train.log_every_steps=1",
         "--config.train.checkpoint_every_steps=1000",
         "--config.optimizer.decay_flag=False"]  # the lr schedule then does not depend on num_steps
  proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    before = wait_for_line(proc, "(3/1000)", time.time() + STOP_TIMEOUT_S)  # the progress line
    proc.send_signal(signal.SIGTERM)
    after = proc.communicate(timeout=STOP_TIMEOUT_S)[1]
  finally:
    proc.kill()
  log = "".join(before) + after
  assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
  [saved] = checkpoints.Checkpointer(workdir / "checkpoints").steps()  # no cadence was due
  assert 3 <= saved < 1000
  assert f"Training stopped by SIGTERM at step {saved}, with a checkpoint in" in log

  config = tiny_config(dataset, tmp_path)
  config.train.num_steps = saved + 2
  config.optimizer.decay_flag = False
  resumed, _ = train.train_and_evaluate(config, str(workdir))
  never_stopped, _ = train.train_and_evaluate(config, str(tmp_path / "never_stopped"))
  assert int(resumed.step) == saved + 2
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed)), jax.tree.leaves(jax.device_get(never_stopped))):
    np.testing.assert_array_equal(a, b)
