"""main.py's start-up cost and the part Python's garbage collector takes of it.

Runs `main.py --config=configs/test.py` (4 steps of the tiny test model on a few random images) with a
warm compilation cache, `--rounds` times each way, alternating: with main.py's collector thresholds
(`main.GC_THRESHOLDS`) and with Python's defaults. Each run reports its wall time, the CPU seconds the
process used, and the seconds the collector ran (timed by a `gc.callbacks` hook, full collections
counted). A first run, not counted, fills a fresh compilation cache. Prints one JSON line with the
medians of each way and their ratios.

  python -m benchmarks.startup --rounds=5 --out=/tmp/startup      # about 8 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

from benchmarks.crash_soak import ROOT, make_dataset

# The child: main.py under a collector hook; with NICEGAN_GC_DEFAULTS=1, main.py's thresholds are ignored.
CHILD = """
import atexit, gc, json, os, runpy, sys, time
seconds, full, started = [0.0], [0], [0.0]
def hook(phase, info):
  if phase == "start":
    started[0] = time.perf_counter()
  else:
    seconds[0] += time.perf_counter() - started[0]
    full[0] += info["generation"] == 2
gc.callbacks.append(hook)
if os.environ.get("NICEGAN_GC_DEFAULTS") == "1":
  gc.set_threshold = lambda *thresholds: None
stats_file = sys.argv[1]
atexit.register(lambda: open(stats_file, "w").write(json.dumps({"gc_s": seconds[0], "full": full[0]})))
sys.path.insert(0, os.getcwd())
sys.argv = ["main.py"] + sys.argv[2:]
runpy.run_path("main.py", run_name="__main__")
"""


def run_main(out: pathlib.Path, name: str, args: list[str], python_defaults: bool,
             check: bool = True) -> dict:
  """Runs `main.py *args` under the collector hook: its wall and CPU seconds, the collector's seconds
  (`gc_s`) and full collections (`full`). `check`: a failed run raises."""
  stats = out / f"{name}.json"
  command = [sys.executable, "-c", CHILD, str(stats), *args]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(out / "xla_cache"),
         "NICEGAN_GC_DEFAULTS": "1" if python_defaults else "0"}
  before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
  wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
  if check and result.returncode != 0:
    raise RuntimeError(f"main.py failed:\n{result.stderr[-3000:]}")
  cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
  return {"wall_s": wall, "cpu_s": cpu, **json.loads(stats.read_text())}


def run_once(out: pathlib.Path, data: pathlib.Path, name: str, python_defaults: bool) -> dict:
  """One 4-step training run of configs/test.py in `out / name`."""
  return run_main(out, name, ["--config=configs/test.py", f"--workdir={out / name}",
                              f"--config.data.path={data}", f"--config.data.data_dir={out / 'tfds'}"],
                  python_defaults)


def summary(runs: list[dict]) -> dict:
  """Medians, and every run's wall seconds (the spread shows how noisy the machine was)."""
  median = lambda key: round(statistics.median(r[key] for r in runs), 2)
  return {"wall_s": median("wall_s"), "cpu_s": median("cpu_s"), "gc_s": median("gc_s"),
          "full_collections": median("full"), "wall_s_each": [round(r["wall_s"], 1) for r in runs]}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=5, help="runs each way (default 5)")
  parser.add_argument("--out", required=True, help="a new folder for the runs and their cache")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  if out.exists() and any(out.iterdir()):
    parser.error(f"--out {out} is not empty")
  if args.rounds < 1:
    parser.error("--rounds must be at least 1")
  data = make_dataset(out / "data")
  run_once(out, data, "warm_up", python_defaults=False)
  ours, defaults = [], []
  for i in range(args.rounds):
    ours.append(run_once(out, data, f"ours_{i}", python_defaults=False))
    defaults.append(run_once(out, data, f"defaults_{i}", python_defaults=True))
  report = {"rounds": args.rounds, "main_py_thresholds": summary(ours), "python_defaults": summary(defaults)}
  for key in ("wall_s", "cpu_s"):
    report[f"{key[:-2]}_ratio_defaults_to_ours"] = round(report["python_defaults"][key] /
                                                         report["main_py_thresholds"][key], 3)
  print(json.dumps(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
