"""Crash consistency: SIGKILL main.py's training at random moments, restart it, compare with a clean run.

  python -m benchmarks.crash_soak --kills=20 --out=/tmp/soak     # about 8 minutes on 2 CPU cores

A reference run trains the tiny test model (configs/test.py, 64x64, random images, with the original's
learning rate decay over the second half) to `--num_steps` with a checkpoint after every step,
uninterrupted. The soak run is the same command, killed with SIGKILL `--kills` times and restarted after
each kill, then left to finish. Each kill lands at a random moment: once the run has reported a step
drawn at random at least two after the one it resumed from (within its share of the steps left), after a
further random fraction of a step's time, so it hits a step in flight or one of the asynchronous
checkpoint writes, and most restarts resume from a checkpoint the killed run wrote. It passes when the
soak run ends with every array of its final state bit-identical to the reference's, no restart found a
damaged checkpoint, and no run started over from step 0.

Prints one JSON line: kills, how many landed while a checkpoint was being written, the steps each
restart resumed from, and the verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOOP_STARTED = "Training steps"  # train.py logs it right before the loop (and the first compile)
STEP_DONE = re.compile(r"% \((\d+)/\d+\), ETA")  # the progress line (clu's ReportProgress), every log step


def make_dataset(root: pathlib.Path) -> pathlib.Path:
  rng = np.random.default_rng(0)
  for split in ("trainA", "trainB", "testA", "testB"):
    (root / split).mkdir(parents=True, exist_ok=True)
    for i in range(3):
      image = rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8)
      Image.fromarray(image).save(root / split / f"{i}.png")
  return root


def train_command(workdir: pathlib.Path, data: pathlib.Path, cache: pathlib.Path,
                  num_steps: int) -> list[str]:
  return [sys.executable, "main.py", "--config=configs/test.py", f"--workdir={workdir}",
          f"--config.data.path={data}", f"--config.data.data_dir={cache}",
          f"--config.train.num_steps={num_steps}", "--config.train.checkpoint_every_steps=1",
          "--config.train.log_every_steps=1", "--config.train.sample_every_steps=0",
          "--config.optimizer.decay_flag=True"]  # the lr decays over the second half: resumes must follow


class Run:
  """main.py in a child process whose stderr is collected by a thread, noting when the loop starts."""

  def __init__(self, command: list[str]):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    self.process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    text=True, env=env)
    self.lines: list[str] = []
    self.step_reached = 0
    self.step_times: list[float] = []  # when each progress line arrived
    self.loop_started = threading.Event()
    self.started_at = time.time()
    self.loop_at: float | None = None
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self) -> None:
    for line in self.process.stderr:
      self.lines.append(line)
      done = STEP_DONE.search(line)
      if done:
        self.step_reached = int(done.group(1))
        self.step_times.append(time.time())
      if LOOP_STARTED in line and not self.loop_started.is_set():
        self.loop_at = time.time()
        self.loop_started.set()

  def wait_for_step(self, step: int, timeout: float) -> bool:
    """Whether the run reported `step` (False: it ended first)."""
    deadline = time.time() + timeout
    while self.step_reached < step and self.process.poll() is None and time.time() < deadline:
      time.sleep(0.02)
    return self.step_reached >= step

  def wait(self, timeout: float) -> int:
    code = self.process.wait(timeout=timeout)
    self._reader.join(timeout=10)
    return code

  def stderr(self) -> str:
    return "".join(self.lines)


def resumed_from(stderr: str) -> int:
  """The step a run resumed from (0: it started a fresh model)."""
  marker = "Resuming from the checkpoint at step "
  for line in stderr.splitlines():
    if marker in line:
      return int(line.split(marker)[1].split()[0])
  return 0


def complete_checkpoints(workdir: pathlib.Path) -> list[str]:
  root = workdir / "checkpoints"
  return [p.name for p in root.iterdir() if p.name.isdigit()] if root.is_dir() else []


def writing_checkpoint(workdir: pathlib.Path) -> bool:
  """Whether an Orbax save is in flight: a temporary checkpoint folder of a step after the newest
  complete one (one a killed run left behind is of an older step, or is reused by the next save)."""
  root = workdir / "checkpoints"
  if not root.is_dir():
    return False
  newest = max(map(int, complete_checkpoints(workdir)), default=-1)
  return any(p.name.split(".")[0].isdigit() and int(p.name.split(".")[0]) > newest
             for p in root.iterdir() if "tmp" in p.name)


def final_state(workdir: pathlib.Path):
  import jax
  from configs import test as test_config
  from nicegan_jax import checkpoints, models, train_state
  config = test_config.get_config()
  nets = models.create_models(config.model)
  shapes = jax.eval_shape(lambda: train_state.create_train_state(config, jax.random.PRNGKey(0), nets))
  abstract = checkpoints.abstract_like(shapes, checkpoints.first_local_device())
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints")
  try:
    state, step = ckpt.restore_latest(abstract)
  finally:
    ckpt.close()
  return jax.device_get(state), step


def soak(out: pathlib.Path, *, kills: int, num_steps: int, seed: int = 0, timeout_s: float = 600) -> dict:
  """Runs the reference and the killed run under `out`; returns the report (see the module docstring)."""
  sys.path.insert(0, str(ROOT))
  rng = np.random.default_rng(seed)
  data, cache = make_dataset(out / "data"), out / "cache"
  start = time.time()
  reference = Run(train_command(out / "reference", data, cache, num_steps))
  if reference.wait(timeout_s) != 0:
    raise RuntimeError(f"the reference run failed:\n{reference.stderr()[-3000:]}")
  loop_s = time.time() - (reference.loop_at or reference.started_at)
  times = reference.step_times
  step_s = (times[-1] - times[0]) / max(len(times) - 1, 1)  # a step and its checkpoint, compiled

  workdir = out / "soak"
  report = {"kills": 0, "kills_while_writing_a_checkpoint": 0, "resumed_from": [], "restarts_from_zero": 0,
            "damaged_checkpoints_seen": 0, "num_steps": num_steps, "reference_loop_s": round(loop_s, 1),
            "reference_step_s": round(step_s, 2)}
  while report["kills"] < kills:
    had_checkpoints = bool(complete_checkpoints(workdir))
    run = Run(train_command(workdir, data, cache, num_steps))
    if not run.loop_started.wait(timeout_s):
      raise RuntimeError(f"the training loop did not start:\n{run.stderr()[-3000:]}")
    start_step = resumed_from(run.stderr())
    if start_step >= num_steps - 3:
      raise RuntimeError(f"the run reached step {start_step} of {num_steps} before {kills} kills: give "
                         "it more steps")
    # Two steps in, the run has saved a checkpoint of its own (a save waits for the one before it);
    # beyond that, a random step within this kill's share of the steps left.
    span = max(1, (num_steps - 3 - start_step) // (kills - report["kills"]))
    target = start_step + 2 + int(rng.integers(0, span))
    run.wait_for_step(target, timeout_s)
    time.sleep(rng.uniform(0, step_s))
    finished = run.process.poll() is not None
    if not finished:
      writing = writing_checkpoint(workdir)
      run.process.send_signal(signal.SIGKILL)
      report["kills"] += 1
      report["kills_while_writing_a_checkpoint"] += int(writing)
    code = run.wait(timeout_s)
    stderr = run.stderr()
    step = resumed_from(stderr)
    report["resumed_from"].append(step)
    report["restarts_from_zero"] += int(step == 0 and had_checkpoints)
    report["damaged_checkpoints_seen"] += stderr.count("is damaged")
    if finished:
      if code != 0:
        raise RuntimeError(f"a soak run failed:\n{stderr[-3000:]}")
      break  # it finished before the kill: the soak ends with fewer kills than asked
  had_checkpoints = bool(complete_checkpoints(workdir))
  last = Run(train_command(workdir, data, cache, num_steps))
  if last.wait(timeout_s) != 0:
    raise RuntimeError(f"the final soak run failed:\n{last.stderr()[-3000:]}")
  report["resumed_from"].append(resumed_from(last.stderr()))
  report["restarts_from_zero"] += int(report["resumed_from"][-1] == 0 and had_checkpoints)
  report["damaged_checkpoints_seen"] += last.stderr().count("is damaged")

  expected, expected_step = final_state(out / "reference")
  got, got_step = final_state(workdir)
  import jax
  report["final_step"] = got_step
  report["bit_identical"] = bool(got_step == expected_step == num_steps and all(
      np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected))))
  report["passed"] = (report["bit_identical"] and report["kills"] == kills
                      and report["damaged_checkpoints_seen"] == 0 and report["restarts_from_zero"] == 0)
  report["wall_s"] = round(time.time() - start, 1)
  return report


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to deliver (default 20)")
  parser.add_argument("--num_steps", type=int, default=0, help="steps of the run (default: 4 per kill, at "
                      "least 12)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
  parser.add_argument("--out", required=True, help="a new folder for the two runs")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  if out.exists() and any(out.iterdir()):
    parser.error(f"--out {out} is not empty")
  report = soak(out, kills=args.kills, num_steps=args.num_steps or max(12, 4 * args.kills), seed=args.seed)
  print(json.dumps(report))
  return 0 if report["passed"] else 1


if __name__ == "__main__":
  sys.exit(main())
