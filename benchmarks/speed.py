"""Training and translation speed, memory and FLOPs of one configuration, measured in one process.

Owns the speed benchmark: for a config (light/full, image size, batch, dtype, remat, steps per
dispatch, device count) it reports the compile time of the train step, median and min seconds per
train step over N timed steps after warm-up (each waited for), the mean over N steps dispatched back to
back as the training loop runs them ("pipelined"), train images/s (one A plus one B image per batch
element), translate images/s at batch 1 and 32, peak device memory (peak RSS on CPU), XLA's memory plan
of the step, the FLOPs of one step from XLA's cost analysis and, on GPU/TPU, the fraction of the chip's
peak FLOP/s it reaches, and how many operations the compiled step launches one by one
(`hlo_ops.launched_ops`: about one kernel each on a GPU). `--profile DIR` then traces a few more steps
with jax.profiler, for TensorBoard's profile plugin or xprof.
`--torch` also times the PyTorch reference (tests/torch_reference.py, eager, same sizes, CPU) in the
same process, and reports our speed-up over it. `--loop N` also times the training loop itself over
about N steps (main.py's loop on Animal-MNIST: the input pipeline, `train.prefetch`, metrics and logging)
and reports what it adds per step to the same step fed one fixed batch. `--flops_only` only traces the
step and reports XLA's FLOP count of it (nothing compiled or run), for sizes this machine cannot run.

  python -m benchmarks.speed --img_size=64 --ch=32 --batch=1 [--dtype=bfloat16] [--json] [--torch]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import hlo_ops
from benchmarks.speed_report import markdown_table
from nicegan_jax.convolutions import CPU_PATHS

# Peak dense bf16 FLOP/s per chip (vendor figures, without sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12}


def chip_peak_flops(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None


def make_config(args):
  from configs import default
  config = default.get_config()
  m, t = config.model, config.train
  m.img_size, m.ch, m.n_res, m.n_dis, m.light = args.img_size, args.ch, args.n_res, args.n_dis, not args.full
  m.dtype, m.remat, m.conv_impl = args.dtype, args.remat, args.conv_impl
  t.batch_size, t.steps_per_dispatch = args.batch, args.steps_per_dispatch
  if args.prefetch is not None:
    t.prefetch = args.prefetch
  t.num_steps = 1_000_000
  # A constant learning rate: the schedule is a few scalar operations whatever its shape, and without the
  # decay the step does not depend on num_steps, so --loop's short run reuses the timed step's program.
  config.optimizer.decay_flag = False
  config.mesh.data = args.devices
  return config


def peak_memory_bytes() -> tuple[int, str]:
  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def step_buffer_bytes(compiled) -> dict:
  """XLA's memory plan of the compiled step on this backend: its temporary buffers (the activations kept
  for the backward pass, and scratch) and all its buffers (arguments, outputs and temporaries, less the
  outputs that reuse donated arguments). On a CPU the process's peak RSS also counts the compiler and
  the runtime."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # not every backend or version plans memory ahead
    return {}
  if stats is None:
    return {}
  temp = int(stats.temp_size_in_bytes)
  total = stats.argument_size_in_bytes + stats.output_size_in_bytes + temp - stats.alias_size_in_bytes
  return {"step_temp_bytes": temp, "step_buffer_bytes": int(total)}


def random_batch(rng, config, stacked: int):
  size, b = config.model.img_size, config.train.batch_size
  shape = (stacked, b, size, size, 3) if stacked > 1 else (b, size, size, 3)
  return {d: rng.uniform(-1, 1, shape).astype(np.float32) for d in "AB"}


def flops_of(compiled) -> float | None:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


def traced_flops(config, models, mesh, shardings, state) -> float | None:
  """XLA's FLOP count of one train step as traced, before XLA's optimisations: nothing is compiled, so it
  is cheap at any size (~3% below the compiled step's count on the tiny config). `state` may be shapes."""
  from nicegan_jax import sharding, step as step_lib
  one = config.copy_and_resolve_references()
  one.train.steps_per_dispatch = 1
  step_fn = sharding.jit_train_step(step_lib.make_train_step(one, models), mesh, shardings)
  size, b = config.model.img_size, config.train.batch_size
  batch = {d: jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32) for d in "AB"}
  return flops_of(step_fn.lower(state, batch))


def abstract_setup(config, conv=None) -> tuple:
  """(models, mesh, state shapes, state shardings) of a config, its convolutions replaced by `conv` if
  given; nothing is allocated."""
  from nicegan_jax import models as models_lib, sharding, train_state
  models = models_lib.create_models(config.model, conv)
  mesh = sharding.create_mesh(config.mesh)
  shapes = jax.eval_shape(lambda: train_state.create_train_state(config, jax.random.PRNGKey(0), models))
  return models, mesh, shapes, sharding.state_shardings(shapes, mesh, config.mesh.shard_min_size)


PROFILED_STEPS = 3  # steps traced by --profile, after the timed ones


def time_train(config, *, steps: int, warmup: int, profile_dir: str | None = None, conv=None) -> dict:
  """Times the train step; with `profile_dir`, then traces PROFILED_STEPS more steps into it."""
  from nicegan_jax import sharding, step as step_lib, train_state
  models, mesh, _, shardings = abstract_setup(config, conv)
  k = config.train.steps_per_dispatch
  state = train_state.create_train_state(config, jax.random.PRNGKey(0), models, out_shardings=shardings)
  step_fn = sharding.jit_train_step(step_lib.make_train_step(config, models), mesh, shardings,
                                    stacked=k > 1)
  rng = np.random.default_rng(0)
  batch = sharding.global_batch(random_batch(rng, config, k), mesh, stacked=k > 1)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  flops = flops_of(compiled)
  buffer_bytes = step_buffer_bytes(compiled)
  launched = hlo_ops.summary(compiled.as_text())
  if k > 1:  # XLA's cost analysis counts a loop's body once: count one unstacked step
    flops = traced_flops(config, models, mesh, shardings, state)
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    if i >= warmup:
      times.append((time.perf_counter() - start) / k)
  # As the training loop runs: dispatches queue up behind the running step, the host never waits.
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  pipelined = (time.perf_counter() - start) / (steps * k)
  if profile_dir:
    with jax.profiler.trace(profile_dir):
      for _ in range(PROFILED_STEPS):
        state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
  return {"hlo_ops": launched, "compile_s": compile_s, "step_s_median": statistics.median(times),
          "step_s_min": min(times), "step_s_pipelined": pipelined, "flops_per_step": flops,
          "memory_plan": buffer_bytes, "models": models, "state": state}


def time_translate(config, models, state, batch: int, repeats: int, *, one_call: bool = False) -> float:
  """Translate images/s (A2B, at the training size, float input) for one batch size.

  As `inference.translate` runs it (on a CPU, 8 images per call), or with `one_call` the whole batch
  in a single call.
  """
  from nicegan_jax import inference
  translator = inference.translator_from_state(config, models, state)
  size = config.model.img_size
  images = np.random.default_rng(1).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  if one_call:
    run = lambda: jax.block_until_ready(inference.translate_at_work_size(
        translator.encoders["A2B"], translator.generators["A2B"], jnp.asarray(images), models=models,
        direction="A2B"))
  else:
    run = lambda: inference.translate(translator, images, "A2B")
  run()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return batch / statistics.median(times)


def time_torch(config, *, steps: int, warmup: int) -> float:
  """Median seconds per training iteration of the eager PyTorch reference at the same sizes."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
  import torch
  import torch_reference
  torch.manual_seed(0)
  m = config.model
  nice = torch_reference.NICE(ch=m.ch, n_res=m.n_res, n_dis=m.n_dis, img_size=m.img_size, light=m.light)
  b, s = config.train.batch_size, m.img_size
  a, bb = torch.rand(b, 3, s, s) * 2 - 1, torch.rand(b, 3, s, s) * 2 - 1
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    nice.train_iteration(i + 1, a, bb)
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return statistics.median(times)


LOOP_INTERVALS = 5  # log intervals of a --loop run; the first (warm-up) is not counted


def time_loop(config, steps: int) -> dict:
  """Steps/s of the training loop itself, as main.py runs it (`train.train_and_evaluate`: the grain input
  pipeline, `train.prefetch`, metrics, logging), over `steps` steps on Animal-MNIST horse -> zebra at the
  config's sizes, in a scratch workdir: the median rate of its log intervals after the first."""
  import shutil
  import tempfile
  from nicegan_jax import train as train_lib
  loop = config.copy_and_resolve_references()
  t, k = loop.train, loop.train.steps_per_dispatch
  every = max(k, steps // LOOP_INTERVALS // k * k)
  t.num_steps, t.log_every_steps = every * LOOP_INTERVALS, every
  t.checkpoint_every_steps = t.sample_every_steps = t.eval_every_steps = 0  # only at the end, after timing
  loop.data.dataset = "animal_mnist/horse2zebra"
  rates = []
  workdir = tempfile.mkdtemp(prefix="speed_loop_")
  try:
    train_lib.train_and_evaluate(loop, workdir, on_log=lambda step, s: rates.append(s["steps_per_sec"]))
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  return {"loop_steps": t.num_steps, "loop_step_s": 1.0 / statistics.median(rates[1:])}


def convolutions_of(args):
  """The CPU convolutions with the `--without` paths switched off, or None (the config's own)."""
  from nicegan_jax import convolutions
  if not args.without:
    return None
  return convolutions.CpuConvolutions(convolutions.CpuPolicy().without(*args.without))


def settings_of(args, config) -> dict:
  """The measured configuration and where it ran, as the JSON line's first fields."""
  from nicegan_jax import convolutions
  device = jax.devices()[0]
  return {
      "backend": jax.default_backend(), "device": getattr(device, "device_kind", str(device)),
      "devices": config.mesh.data if config.mesh.data > 0 else jax.device_count(),
      "img_size": args.img_size, "ch": args.ch, "n_res": args.n_res, "n_dis": args.n_dis,
      "light": not args.full, "batch": args.batch, "dtype": args.dtype, "remat": args.remat,
      "conv_impl": convolutions.resolve(args.conv_impl), "cpu_paths_off": sorted(args.without),
      "steps_per_dispatch": args.steps_per_dispatch,
      "prefetch": config.train.prefetch,
  }


def count_flops(args, config) -> dict:
  """`--flops_only`: the step traced, never compiled or run, and XLA's FLOP count of it."""
  models, mesh, shapes, shardings = abstract_setup(config, convolutions_of(args))
  return {**settings_of(args, config),
          "flops_per_step_traced": traced_flops(config, models, mesh, shardings, shapes)}


def measure(args) -> dict:
  config = make_config(args)
  if args.flops_only:
    return count_flops(args, config)
  train = time_train(config, steps=args.steps, warmup=args.warmup, profile_dir=args.profile,
                     conv=convolutions_of(args))
  device = jax.devices()[0]
  result = {
      **settings_of(args, config),
      "compile_s": train["compile_s"], "step_s_median": train["step_s_median"],
      "step_s_min": train["step_s_min"], "train_iter_per_s": 1.0 / train["step_s_median"],
      "step_s_pipelined": train["step_s_pipelined"],
      "train_iter_per_s_pipelined": 1.0 / train["step_s_pipelined"],
      "train_img_per_s": 2 * args.batch / train["step_s_median"],
      "flops_per_step": train["flops_per_step"],
      **train["memory_plan"],
      "hlo_ops_per_dispatch": train["hlo_ops"]["total"], "hlo_ops_by_opcode": train["hlo_ops"]["by_opcode"],
  }
  if args.profile:
    result["profile_dir"] = args.profile
  peak = chip_peak_flops(device)
  if peak and train["flops_per_step"]:
    result["peak_fraction"] = train["flops_per_step"] / train["step_s_median"] / (peak * result["devices"])
    result["peak_fraction_pipelined"] = (train["flops_per_step"] / train["step_s_pipelined"]
                                         / (peak * result["devices"]))
  if not args.no_translate:
    result["translate_img_per_s"] = {str(b): time_translate(config, train["models"], train["state"], b,
                                                            args.translate_repeats)
                                     for b in (1, 32)}
    result["translate_img_per_s_one_call"] = time_translate(config, train["models"], train["state"], 32,
                                                            args.translate_repeats, one_call=True)
  if args.loop:
    result.update(time_loop(config, args.loop))
    # The loop against the same step fed one fixed device batch, dispatched back to back: what the
    # input pipeline, metrics and logging cost per step.
    result["loop_overhead_fraction"] = 1.0 - train["step_s_pipelined"] / result["loop_step_s"]
  result["peak_mem_bytes"], result["peak_mem_kind"] = peak_memory_bytes()
  if args.torch:
    torch_s = time_torch(config, steps=args.torch_steps, warmup=1)
    result["torch_step_s_median"] = torch_s
    result["speedup_vs_torch"] = torch_s / train["step_s_median"]
  return result


class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
  """--help names each option's default, except where there is none to name (flags, computed ones)."""

  def _get_help_string(self, action):
    return action.help if action.default in (None, False) else super()._get_help_string(action)


def add_model_flags(p: argparse.ArgumentParser, *, img_size: int = 64, ch: int = 64) -> None:
  """--img_size, --ch, --n_res, --n_dis, --full: the model's size, as every benchmark here takes it."""
  p.add_argument("--img_size", type=int, default=img_size, help="training image size (square)")
  p.add_argument("--ch", type=int, default=ch, help="base channel count (the original's --ch)")
  p.add_argument("--n_res", type=int, default=6, help="residual blocks per generator")
  p.add_argument("--n_dis", type=int, default=None, help="discriminator layers (default: 7 at >= 128 px, "
                 "else 6)")
  p.add_argument("--full", action="store_true", help="the full model (default: light)")


def default_n_dis(args) -> None:
  """--n_dis left unset: 7 at 128 px and above, else 6 (what the configs use)."""
  if args.n_dis is None:
    args.n_dis = 7 if args.img_size >= 128 else 6


def check_model_flags(p: argparse.ArgumentParser, model_config) -> None:
  """The config's model check on the model the flags built; a failure is a usage error naming the flag."""
  from nicegan_jax import config_lib
  try:
    config_lib.validate_model(model_config)
  except config_lib.ConfigError as e:
    p.error(str(e).replace("config.model.", "--"))  # the flags carry the model fields' names


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsShown)
  add_model_flags(p)
  p.add_argument("--batch", type=int, default=1, help="images per domain and step (over all devices)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                 help="compute dtype (parameters and optimizer state stay float32)")
  p.add_argument("--remat", action="store_true", help="rematerialise the generators' residual blocks")
  p.add_argument("--conv_impl", default="auto", choices=["auto", "xla", "cpu"],
                 help="how convolutions are computed (auto: cpu on a CPU, xla on GPU/TPU)")
  p.add_argument("--steps_per_dispatch", type=int, default=1, help="train steps per jitted call (lax.scan)")
  p.add_argument("--without", type=lambda s: [p for p in s.split(",") if p], default=[], metavar="PATHS",
                 help="CPU convolutions: switch off these paths (comma-separated, some of "
                      f"{', '.join(CPU_PATHS)}), to measure what they gain; the train and translate "
                      "timings, not --loop")
  p.add_argument("--devices", type=int, default=1, help="data-parallel devices (-1 = all)")
  p.add_argument("--prefetch", type=int, default=None,
                 help="train.prefetch for --loop: batches put on the device ahead "
                      "(0 = off; default: the config's)")
  p.add_argument("--loop", type=int, default=0, metavar="N",
                 help="also time the training loop itself (input pipeline, prefetch, logging) over about N "
                      "steps on Animal-MNIST")
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  p.add_argument("--translate_repeats", type=int, default=5, help="timed translate calls per batch size")
  p.add_argument("--no_translate", action="store_true", help="skip the translate timings (two compiles)")
  p.add_argument("--torch", action="store_true", help="also time the eager PyTorch reference (CPU)")
  p.add_argument("--torch_steps", type=int, default=5, help="timed PyTorch iterations")
  p.add_argument("--flops_only", action="store_true",
                 help="only count the step's FLOPs as traced, before XLA's optimisations (nothing compiled "
                      "or run: any size, in seconds); on a CPU add --conv_impl=xla for the convolutions a "
                      "GPU or TPU runs")
  p.add_argument("--profile", metavar="DIR", default=None,
                 help=f"after the timings, trace {PROFILED_STEPS} more steps with jax.profiler into DIR "
                      "(open with TensorBoard's profile plugin or xprof)")
  p.add_argument("--json", action="store_true", help="print one JSON line")
  p.add_argument("--table", metavar="JSONL", help="only print the markdown table of a file of JSON lines")
  args = p.parse_args(argv)
  default_n_dis(args)
  if args.table:
    return args
  for name, least in (("batch", 1), ("steps_per_dispatch", 1), ("steps", 1), ("warmup", 0),
                      ("translate_repeats", 1), ("torch_steps", 1), ("loop", 0), ("prefetch", 0)):
    value = getattr(args, name)
    if value is not None and value < least:
      p.error(f"--{name}={value}: must be >= {least}")
  if args.devices == 0 or args.devices < -1:
    p.error(f"--devices={args.devices}: use -1 (all devices) or a positive count")
  unknown = sorted(set(args.without) - set(CPU_PATHS))
  if unknown:
    p.error(f"--without={','.join(args.without)}: unknown path(s) {', '.join(unknown)}; use some of "
            f"{', '.join(CPU_PATHS)}")
  if args.without and args.conv_impl == "xla":
    p.error("--without switches off CPU convolution paths; --conv_impl=xla takes none")
  check_model_flags(p, make_config(args).model)
  return args


def conv_words(result: dict) -> str:
  off = result["cpu_paths_off"]
  return f"{result['conv_impl']} convolutions" + (f" without {', '.join(off)}" if off else "")


def main(argv=None) -> int:
  args = parse(argv)
  if args.table:
    with open(args.table) as f:
      print(markdown_table([json.loads(line) for line in f if line.strip()]))
    return 0
  result = measure(args)
  if args.json:
    print(json.dumps(result))
    return 0
  model = (f"{'light' if result['light'] else 'full'} {args.img_size}px ch {args.ch} n_res {args.n_res} "
           f"n_dis {args.n_dis} batch {args.batch} {args.dtype}")
  if args.flops_only:
    print(f"{model}, {conv_words(result)}: {result['flops_per_step_traced'] / 1e12:.3f} TFLOP per step as "
          "traced")
    return 0
  print(f"{result['device']} x{result['devices']}  {model}{' remat' if args.remat else ''} steps/dispatch "
        f"{args.steps_per_dispatch} {conv_words(result)}")
  print(f"compile {result['compile_s']:.1f} s   step median {result['step_s_median'] * 1e3:.1f} ms "
        f"(min {result['step_s_min'] * 1e3:.1f})   {result['train_iter_per_s']:.2f} it/s   "
        f"{result['train_img_per_s']:.2f} img/s   pipelined (no wait between steps) "
        f"{result['train_iter_per_s_pipelined']:.2f} it/s")
  print(f"operations launched per dispatch (XLA's compiled step): {result['hlo_ops_per_dispatch']} "
        f"({', '.join(f'{op} {n}' for op, n in result['hlo_ops_by_opcode'].items())})")
  if "profile_dir" in result:
    print(f"profile of {PROFILED_STEPS} steps: {result['profile_dir']}")
  if result.get("flops_per_step"):
    print(f"FLOPs/step {result['flops_per_step'] / 1e9:.1f} G" +
          (f"   {100 * result['peak_fraction']:.1f}% of peak" if "peak_fraction" in result else ""))
  if "translate_img_per_s" in result:
    print("translate img/s: " + "  ".join(f"batch {b}: {v:.1f}" for b, v in
                                          result["translate_img_per_s"].items()) +
          f"  (batch 32 in one call: {result['translate_img_per_s_one_call']:.1f})")
  if "loop_step_s" in result:
    print(f"training loop (prefetch {result['prefetch']}): {result['loop_step_s'] * 1e3:.1f} ms/step over "
          f"{result['loop_steps']} steps, against {result['step_s_pipelined'] * 1e3:.1f} ms fed one fixed "
          f"batch ({100 * result['loop_overhead_fraction']:+.1f}%)")
  print(f"{result['peak_mem_kind']}: {result['peak_mem_bytes'] / 2**20:.0f} MiB" +
        (f"   XLA's step buffers: {result['step_buffer_bytes'] / 2**20:.0f} MiB, of them temporaries "
         f"{result['step_temp_bytes'] / 2**20:.0f} MiB" if "step_buffer_bytes" in result else ""))
  if "speedup_vs_torch" in result:
    print(f"PyTorch reference (eager): {result['torch_step_s_median'] * 1e3:.1f} ms/step -> "
          f"{result['speedup_vs_torch']:.2f}x")
  return 0


if __name__ == "__main__":
  sys.exit(main())
