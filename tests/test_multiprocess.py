"""Two processes on 127.0.0.1 (2 CPU devices each) train with the real main.py. A SIGTERM to one of them
(a preemption notice) stops both at the same step, with a checkpoint there; it equals the same steps of
one 4-device process, and restores on 1 device, trains on and translates.

Bounded: each process is killed after PROCESS_TIMEOUT_S, and the test fails with its log.
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from conftest import QUICK_COMPILES_ENV, ROOT, four_image_step_config
from nicegan_jax import checkpoints, datasets, load_translator, sharding, train, translate
from nicegan_jax.models import create_models
from test_train import make_dataset

PROCESS_TIMEOUT_S = 480
STEPS = 4  # the SIGTERM comes once process 1 has reported this step


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def config_flags(config) -> list[str]:
  return ["--config=configs/test.py", f"--config.data.path={config.data.path}",
          f"--config.data.data_dir={config.data.data_dir}", f"--config.train.batch_size={config.train.batch_size}",
          f"--config.optimizer.disc_lr_scale={config.optimizer.disc_lr_scale}",
          "--config.mesh.data=-1"]


def start_two_processes(flags: list[str], workdir, outputs) -> list[subprocess.Popen]:
  """main.py as processes 0 and 1 of two, their stdout and stderr into outputs[0] and outputs[1]."""
  port = free_port()
  # Their programs are their own (a two-process mesh), compiled quickly (conftest.quick_compiles): what
  # is compared with one process below agrees to 1e-5, far above what the compiler's optimisations change.
  # Process 1 compiles them at every run, warm cache or not: only process 0 writes the cache, and on CPUs
  # process 1's programs have other cache keys (JAX hashes XLA's topology fingerprint, which differs per
  # process there), so the first step waits for its compile.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", **QUICK_COMPILES_ENV)
  return [subprocess.Popen(
      [sys.executable, "main.py", *flags, f"--workdir={workdir}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=env, stdout=outputs[i], stderr=subprocess.STDOUT, text=True) for i in range(2)]


def restore_on_one_device(config, workdir):
  mesh = sharding.create_mesh(type("M", (), {"data": 1, "model": 1})(), jax.devices()[:1])
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints", max_to_keep=10)
  state, _ = train.initial_state(config, create_models(config.model), mesh, ckpt)
  ckpt.close()
  return jax.device_get(state)


def flat_params(state) -> np.ndarray:
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves((state.gen_params, state.disc_params))])


def wait_for_progress(log: pathlib.Path, step: int, procs, deadline: float) -> None:
  """Until the progress line of `step` is in `log` (or a process ends, or the deadline passes)."""
  while (f"({step}/" not in log.read_text() and time.time() < deadline
         and all(p.poll() is None for p in procs)):
    time.sleep(0.5)


def test_two_processes_equal_one_stop_together_on_a_sigterm_and_restore_on_one_device(tmp_path):
  """One two-process run: its periodic checkpoints, a SIGTERM to process 1 alone (a preemption notice)
  that stops both at one step with a checkpoint there, that checkpoint equal to the same steps of one
  4-device process, then restored on 1 device, trained on and translated."""
  config = four_image_step_config()  # its steps on 1 and on 4 devices are test_step.py's compiled ones
  config.data.path, config.data.data_dir = str(make_dataset(tmp_path / "data")), str(tmp_path / "cache")
  datasets.load_domains(config.data, config.model.img_size)  # prepared once, not by two processes at once
  flags = [*config_flags(config), "--config.train.num_steps=1000", "--config.train.log_every_steps=1",
           "--config.train.checkpoint_every_steps=2"]
  two_processes = tmp_path / "two_processes"
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  with open(logs[0], "w") as log0, open(logs[1], "w") as log1:  # files: pipes left unread would fill
    procs = start_two_processes(flags, two_processes, [log0, log1])
  try:
    wait_for_progress(logs[1], STEPS, procs, time.time() + PROCESS_TIMEOUT_S)
    procs[1].send_signal(signal.SIGTERM)  # not the chief: any host's notice stops them all
    codes = [p.wait(timeout=PROCESS_TIMEOUT_S) for p in procs]
  finally:
    for p in procs:
      p.kill()
  texts = [log.read_text() for log in logs]
  assert codes == [128 + signal.SIGTERM] * 2, "\n".join(t[-3000:] for t in texts)
  assert "JAX process 1 of 2, 2 local / 4 global devices" in texts[1]
  steps = checkpoints.Checkpointer(two_processes / "checkpoints").steps()
  saved = max(steps)
  assert STEPS <= saved < 1000 and all(f"stopped by SIGTERM at step {saved}," in t for t in texts)
  assert len(steps) >= 2 and all(s % 2 == 0 for s in steps if s != saved), steps  # periodic ones too

  one_process = tmp_path / "one_process"
  reference = config.copy_and_resolve_references()
  reference.mesh.data = 4  # the same 4-way data parallelism, in one process (devices 0-3 of this one)
  reference.train.num_steps = saved
  train.train_and_evaluate(reference, str(one_process))

  single = config.copy_and_resolve_references()
  single.mesh.data = 1
  a, b = restore_on_one_device(single, one_process), restore_on_one_device(single, two_processes)
  assert int(a.step) == int(b.step) == saved
  # The same global batches on the same 4-way data parallelism: only the order of the cross-device sums
  # differs (in-process vs gloo across processes). As in test_sharding.py, that leaves a weight whose
  # gradient is within rounding of zero free to take an Adam step (~lr) the other way; all other weights
  # agree to 1e-5. Different data would move most weights apart by ~lr per step.
  pa, pb = flat_params(a), flat_params(b)
  assert np.mean(np.abs(pa - pb) <= 1e-5) > 0.999
  assert np.abs(pa - pb).max() <= 2 * saved * config.optimizer.lr

  single.train.num_steps = saved + 2  # the two-process checkpoint trains on, on one device
  state, _ = train.train_and_evaluate(single, str(two_processes))
  assert int(state.step) == saved + 2 and (two_processes / "checkpoints" / str(saved + 2)).is_dir()
  translator = load_translator(two_processes)
  images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  out = translate(translator, images)
  assert out.shape == images.shape and out.dtype == np.uint8
