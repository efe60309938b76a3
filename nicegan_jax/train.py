"""The training loop: the only place with side effects (data, checkpoints, writers, grids, progress).

Owns: `train_and_evaluate(config, workdir)`, which validates the config, restores the newest
checkpoint in `workdir` (or initialises), then runs the jitted, sharded train step to
`config.train.num_steps`, with metrics, sample grids and checkpoints at their cadences.

A first SIGINT or SIGTERM (or, with several processes, a preemption notice) ends the run after the step
in flight with a checkpoint at it and `preemption.TrainingInterrupted`; the same command resumes there.

Metrics stay on the device between log steps (summed by a small jitted accumulator that also notes the
first step at which each term became non-finite); a non-finite term (a loss, or a gradient norm: an
overflow can leave the loss finite) stops the run before the next checkpoint, so the last checkpoint on
disk is always a good one.
"""

from __future__ import annotations

import itertools
import json
import logging
import pathlib
import time
from typing import TYPE_CHECKING, Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import parameter_overview
from PIL import Image

from nicegan_jax import checkpoints, config_lib, datasets, input_pipeline, sharding, step as step_lib
from nicegan_jax import preemption, tf_host
from nicegan_jax import train_state as train_state_lib
from nicegan_jax import visualize
from nicegan_jax.models import Models, create_models

if TYPE_CHECKING:
  from clu import metric_writers


COMPILE_BARRIER_TIMEOUT_S = 3600  # how long processes wait for each other to compile the step
PROFILE_AFTER_DISPATCHES = 2  # a profile (train.profile_steps) skips the run's first dispatches: warm-up


class NonFiniteLossError(FloatingPointError):
  """A loss term or gradient norm became NaN or infinite."""


class MetricAccumulator(flax.struct.PyTreeNode):
  sums: dict[str, jax.Array]
  count: jax.Array
  first_nonfinite_step: dict[str, jax.Array]  # -1 while the term has stayed finite


@jax.jit
def accumulate(acc: MetricAccumulator | None, metrics: dict, first_step: jax.Array) -> MetricAccumulator:
  """Adds the metrics of the steps from `first_step` on: scalars (one step) or stacked (k, ) values."""
  metrics = {k: jnp.atleast_1d(v).astype(jnp.float32) for k, v in metrics.items()}
  steps = next(iter(metrics.values())).shape[0]
  if acc is None:
    acc = MetricAccumulator(sums={k: jnp.zeros((), jnp.float32) for k in metrics},
                            count=jnp.zeros((), jnp.int32),
                            first_nonfinite_step={k: jnp.full((), -1, jnp.int32) for k in metrics})

  def first_bad(seen, values):
    bad = ~jnp.isfinite(values)
    return jnp.where((seen < 0) & bad.any(), first_step + jnp.argmax(bad).astype(jnp.int32), seen)

  return MetricAccumulator(sums={k: acc.sums[k] + v.sum() for k, v in metrics.items()},
                           count=acc.count + steps,
                           first_nonfinite_step={k: first_bad(acc.first_nonfinite_step[k], v)
                                                 for k, v in metrics.items()})


def summarize(acc: MetricAccumulator) -> dict[str, float]:
  """Means since the last summary; raises NonFiniteLossError naming the first bad step and term (a loss
  term before a gradient norm of the same step: a NaN loss makes its gradient NaN too)."""
  host = jax.device_get(acc)
  bad = {k: int(s) for k, s in host.first_nonfinite_step.items() if s >= 0}
  if bad:
    term = min(bad, key=lambda name: (bad[name], name in step_lib.GRAD_NORMS))  # a loss term first
    kind = "gradient" if term in step_lib.GRAD_NORMS else "loss term"
    raise NonFiniteLossError(f"non-finite {kind} {term} at step {bad[term]} "
                             f"(also: {', '.join(sorted(set(bad) - {term})) or 'none'})")
  return {k: float(v) / int(host.count) for k, v in host.sums.items()}


def slow_dispatch_warning(steps_per_dispatch: int, backend: str) -> str | None:
  """Why `train.steps_per_dispatch` > 1 slows a CPU down, or None where it does not apply.

  XLA:CPU runs the convolutions of a loop body far slower than the same ones outside a loop
  (jax-ml/jax#12868): `benchmarks/speed_table.sh`'s options rows measured the ch 32 model's step
  8.3-9.2x slower as ten steps in one `lax.scan`, and a CPU has no host overhead for the scan to hide."""
  if steps_per_dispatch <= 1 or backend != "cpu":
    return None
  return (f"config.train.steps_per_dispatch={steps_per_dispatch} on a CPU: XLA:CPU runs a train step inside "
          "lax.scan several times slower than one dispatched step (8-9x measured); use 1 on a CPU")


def is_due(step: int, every: int, last_step: int) -> bool:
  """One rule for every cadence: every `every` steps (0 = never) and always at the last step."""
  return step == last_step or (every > 0 and step % every == 0)


def sample_images(sources: dict, config, step: int) -> dict[str, np.ndarray]:
  """Fixed test images and step-seeded augmented train images for the grid columns."""
  n, size = config.train.sample_columns, config.model.img_size
  rng = np.random.default_rng([config.train.seed, step])
  out = {}
  for d in "AB":
    train_src, test_src = sources[f"train{d}"], sources[f"test{d}"]
    train = [input_pipeline.train_transform(train_src[int(i)], rng, img_size=size,
                                            margin=config.data.resize_margin, flip=config.data.flip)
             for i in rng.integers(0, len(train_src), n)]
    test = input_pipeline.test_images(test_src, range(min(n, len(test_src))), img_size=size)
    out[d] = np.concatenate([np.stack(train), test])
  return out


def write_sample_grids(state, models: Models, sample_fn, sources, config, workdir: pathlib.Path,
                       writer, step: int) -> None:
  images = sample_images(sources, config, step)
  disc_vars = {name: state.disc_variables(name) for name in ("disA", "disB")}
  rows = sample_fn(state.gen_params, disc_vars, images["A"], images["B"])
  grids = {name: visualize.direction_grid(r) for name, r in rows.items()}
  if jax.process_index() == 0:
    out_dir = workdir / "samples"
    out_dir.mkdir(exist_ok=True)
    for name, grid in grids.items():
      Image.fromarray(grid).save(out_dir / f"{name}_{step:07d}.png")
  writer.write_images(step, {f"samples/{name}": grid[None] for name, grid in grids.items()})


def evaluate_and_keep_best(state, models: Models, config, evaluator, best: checkpoints.Checkpointer,
                           workdir: pathlib.Path, writer, step: int) -> None:
  """FID/KIDx100 both ways; saves a 'best' checkpoint when the mean KIDx100 improves."""
  from nicegan_jax import inference
  result = evaluator(inference.translator_from_state(config, models, state))
  kid = (result["A2B"]["kid_x100"] + result["B2A"]["kid_x100"]) / 2
  writer.write_scalars(step, {**{f"eval/{d}/{k}": result[d][k] for d in ("A2B", "B2A")
                                 for k in ("fid", "kid_x100")}, "eval/kid_x100_mean": kid})
  logging.info("eval at step %d: A2B FID %.2f KIDx100 %.3f | B2A FID %.2f KIDx100 %.3f", step,
               result["A2B"]["fid"], result["A2B"]["kid_x100"], result["B2A"]["fid"],
               result["B2A"]["kid_x100"])
  if jax.process_index() == 0:
    with open(workdir / "eval.jsonl", "a") as f:
      f.write(json.dumps({"step": step, **result, "kid_x100_mean": kid}) + "\n")
  previous = best.restore_metadata()
  if previous is None or kid < previous["kid_x100_mean"]:
    best.save(step, state, config.to_dict(), metadata={"step": step, "kid_x100_mean": kid, **result})
    logging.info("New best checkpoint (mean KIDx100 %.3f) at step %d", kid, step)


def initial_state(config, models: Models, mesh, ckpt: checkpoints.Checkpointer):
  """(state, its shardings): the newest checkpoint's state restored onto `mesh` (whatever topology
  wrote it), or a fresh one, placed by the sharding rules. Checkpoints of another model, or none that
  restores, raise `checkpoints.CheckpointError` (see `checkpoints.restore_latest`)."""
  init = train_state_lib.fresh_state_fn(config, models)
  rng = jax.random.PRNGKey(config.train.seed)
  shapes = jax.eval_shape(jax.jit(init), rng)  # traces `init`; a fresh state below reuses the trace
  shardings = sharding.state_shardings(shapes, mesh, config.mesh.shard_min_size)
  state, step = ckpt.restore_latest(checkpoints.abstract_like(shapes, shardings),
                                    model=config.model.to_dict())
  if state is None:
    return train_state_lib.place_fresh_state(init, rng, shardings), shardings
  logging.info("Resuming from the checkpoint at step %d in %s", step, ckpt.directory)
  return state, shardings


def compile_everywhere(train_step, state, batch):
  """The jitted step compiled ahead of its first call; with several processes, none starts the first
  step before all have compiled it.

  Compile times differ between hosts, and CPU collectives (gloo) give up after 30 s of waiting for a
  peer; the barrier here waits on the coordinator instead, for as long as compiling takes.
  """
  start = time.time()
  compiled = train_step.lower(state, batch).compile()
  logging.info("Compiled the train step in %.1f s", time.time() - start)
  if jax.process_count() > 1:
    from orbax.checkpoint import multihost
    multihost.sync_global_processes("nicegan_jax_train_step_compiled", timeout=COMPILE_BARRIER_TIMEOUT_S,
                                    processes=set(range(jax.process_count())))
  return compiled


def profile_window(start: int, num_steps: int, per_dispatch: int,
                   profile_steps: int) -> tuple[int, int] | None:
  """(first, last) step that a run from `start` traces with jax.profiler: `profile_steps` steps after its
  first PROFILE_AFTER_DISPATCHES dispatches, within num_steps; None when off or nothing is left."""
  if profile_steps <= 0:
    return None
  first = start + PROFILE_AFTER_DISPATCHES * per_dispatch + 1
  last = min(first + profile_steps - 1, num_steps)
  return (first, last) if first <= last else None


def create_writer(workdir) -> metric_writers.MetricWriter:
  """TensorBoard events, written by process 0 only. The console gets one progress line per log step
  (`progress_actions`), not every scalar."""
  # clu's writers and periodic actions import TensorFlow (seconds): only commands that write events
  # load them, not a translate, an export or a config error.
  from clu import metric_writers
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  tf_host.keep_tensorflow_on_host()  # clu writes the events with TensorFlow
  return metric_writers.AsyncWriter(metric_writers.SummaryWriter(str(workdir)))


def progress_actions(config, start: int, writer, workdir: pathlib.Path):
  """clu's periodic actions of a run from `start`: (ReportProgress, a profile hook or None).

  ReportProgress logs the console's progress line (steps/s, step, ETA, the share of time spent on grids,
  checkpoints and evaluation) and writes steps/s to TensorBoard at every log step. The profile hook,
  `hook(step, state)` after every dispatch, runs clu's Profile over the `train.profile_steps` steps of
  `profile_window`, waiting for the last traced step's work before the trace ends.
  """
  from clu import periodic_actions  # with TensorFlow, as create_writer's
  t = config.train
  log_steps = [s for s in range(start + 1, t.num_steps + 1) if is_due(s, t.log_every_steps, t.num_steps)]
  report = periodic_actions.ReportProgress(num_train_steps=t.num_steps, writer=writer, every_secs=None,
                                           on_steps=log_steps)
  window = profile_window(start, t.num_steps, t.steps_per_dispatch, t.profile_steps)
  if window is None:
    return report, None
  logging.info("Profiling steps %d..%d into %s (TensorBoard's Profile tab)", *window,
               workdir / "plugins" / "profile")
  profile = periodic_actions.Profile(logdir=str(workdir), num_profile_steps=window[1] - window[0] + 1,
                                     profile_duration_ms=None, first_profile=window[0] - 1,
                                     every_steps=None, every_secs=None)

  def profile_hook(step: int, state) -> None:
    if step == window[1]:
      jax.block_until_ready(state)
    profile(step)

  return report, profile_hook


def stop_profile_if_running() -> None:
  """Ends a jax.profiler trace that a run left open (it stopped inside the profiled steps)."""
  try:
    jax.profiler.stop_trace()
  except RuntimeError:  # no trace running: the Profile action ended it
    pass


def log_parameter_overview(state) -> None:
  for name, params in {**state.gen_params, **state.disc_params}.items():
    logging.info("Parameters of %s:\n%s", name,
                 parameter_overview.get_parameter_overview(jax.device_get(params), include_stats=False))


def train_and_evaluate(config, workdir: str, *,
                       on_log: Callable[[int, dict[str, float]], None] | None = None
                       ) -> tuple[Any, dict[str, float]]:
  """Trains (or resumes) to config.train.num_steps. Returns (final state, last metric summary).

  `on_log(step, scalars)`, if given, is called on process 0 every `train.log_every_steps` with the
  logged scalars (every loss term, `steps_per_sec`, `eta_s`): live progress for notebooks and tools.
  """
  workdir = checkpoints.local_path(workdir)
  config = config_lib.with_defaults(config)
  config_lib.validate(config)
  t = config.train
  try:
    mesh = sharding.create_mesh(config.mesh)
    sharding.check_batch_size(t.batch_size, mesh)
  except ValueError as e:  # a mesh or batch size this machine cannot take: a config error
    raise config_lib.ConfigError(str(e)) from None
  models = create_models(config.model)
  sources = datasets.load_domains(config.data, config.model.img_size)

  workdir.mkdir(parents=True, exist_ok=True)  # only once the config and the data are known to work
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
  writer = create_writer(workdir)
  ckpt = checkpoints.Checkpointer(workdir / "checkpoints", max_to_keep=t.keep_checkpoints)
  state, state_sharding = initial_state(config, models, mesh, ckpt)
  start = int(state.step)
  if start == 0:
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
    log_parameter_overview(state)

  per_dispatch = t.steps_per_dispatch
  if start % per_dispatch:
    raise config_lib.ConfigError(f"config.train.steps_per_dispatch={per_dispatch}: the run resumes at step "
                                 f"{start}, which is not a multiple of it")
  stacked = per_dispatch > 1
  warning = slow_dispatch_warning(per_dispatch, jax.default_backend())
  if warning:
    logging.warning(warning)
  train_step = sharding.jit_train_step(step_lib.make_train_step(config, models), mesh, state_sharding,
                                       stacked=stacked)
  sample_fn = jax.jit(lambda g, d, a, b: visualize.sample_rows(models, g, d, a, b))
  batches = input_pipeline.train_batches(
      sources, config.data, img_size=config.model.img_size, global_batch_size=t.batch_size,
      seed=t.seed, start_step=start, process_index=jax.process_index(),
      process_count=jax.process_count())
  if stacked:
    batches = input_pipeline.stacked(batches, per_dispatch)
  batches = input_pipeline.device_batches(
      batches, lambda b: sharding.global_batch(b, mesh, stacked), t.prefetch)

  evaluator = best = None
  if t.eval_every_steps > 0:
    from nicegan_jax import evaluation  # Inception weights load only when evaluation is on
    evaluator = evaluation.TrainingEvaluator(sources, workdir, seed=t.seed)
    best = checkpoints.Checkpointer(workdir / "checkpoints_best", max_to_keep=1, async_save=False)

  acc, summary = None, {}
  report_progress, profiler = progress_actions(config, start, writer, workdir)
  stop = preemption.StopRequests().install()
  logging.info("Training steps %d..%d, global batch %d on %d device(s) (mesh %s) in %d process(es)",
               start + 1, t.num_steps, t.batch_size, mesh.size, dict(mesh.shape), jax.process_count())
  try:
    steps_batches = batches
    if start < t.num_steps:
      first_batch = next(batches)
      train_step = compile_everywhere(train_step, state, first_batch)
      steps_batches = itertools.chain([first_batch], batches)
    last_time, last_step = time.time(), start
    for step in range(start + per_dispatch, t.num_steps + 1, per_dispatch):  # step: the last one done
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = train_step(state, next(steps_batches))
        acc = accumulate(acc, metrics, step - per_dispatch + 1)
      if profiler is not None:
        profiler(step, state)
      report_progress(step)
      stop_signal = stop.stop_signal(step, ckpt) if step < t.num_steps else None  # logs, saves, raises
      log_due = is_due(step, t.log_every_steps, t.num_steps) or stop_signal is not None
      ckpt_due = is_due(step, t.checkpoint_every_steps, t.num_steps) or stop_signal is not None
      eval_due = (evaluator is not None and stop_signal is None  # a stop should be prompt
                  and is_due(step, t.eval_every_steps, t.num_steps))
      if log_due or ckpt_due or eval_due:  # checkpoints are only written after a finiteness check
        summary = summarize(acc)
        acc = None
        writer.write_scalars(step, summary)
        if on_log is not None and jax.process_index() == 0:  # a caller's own progress display
          now = time.time()
          steps_per_s = (step - last_step) / max(now - last_time, 1e-9)
          last_time, last_step = now, step
          on_log(step, {**summary, "steps_per_sec": steps_per_s,
                        "eta_s": (t.num_steps - step) / max(steps_per_s, 1e-9)})
      if is_due(step, t.sample_every_steps, t.num_steps):
        with report_progress.timed("sample grids"):
          write_sample_grids(state, models, sample_fn, sources, config, workdir, writer, step)
      if ckpt_due:
        with report_progress.timed("checkpoints"):
          ckpt.save(step, state, config.to_dict())
      if eval_due:
        with report_progress.timed("evaluation"):
          evaluate_and_keep_best(state, models, config, evaluator, best, workdir, writer, step)
      if stop_signal is not None:
        ckpt.wait()
        raise preemption.TrainingInterrupted(step, stop_signal, ckpt.directory)
  except NonFiniteLossError as e:
    steps = ckpt.steps()
    raise NonFiniteLossError(f"{e}; stopped. The last good checkpoint is step "
                             f"{steps[-1] if steps else 'none'} in {ckpt.directory}") from None
  finally:
    if profiler is not None:
      stop_profile_if_running()
    stop.restore()
    if isinstance(batches, input_pipeline.Prefetcher):
      batches.close()
    ckpt.close()
    if best is not None:
      best.close()
    writer.flush()
  return state, summary


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
