"""Speed and memory options: remat, several steps per dispatch, bfloat16 and float16 compute, prefetch;
the speed and precision benchmarks' reports. None of these may change what is computed beyond float
rounding. (The convolution algorithms have their own tests: test_convolutions.py.)"""

import json
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import test as test_config
from conftest import normal, quick_compiles
from nicegan_jax import convolutions, input_pipeline, models as models_lib, sharding, step, train_state


def random_batch(seed, batch_size, img_size):
  rng = np.random.default_rng(seed)
  return {d: rng.uniform(-1, 1, (batch_size, img_size, img_size, 3)).astype(np.float32) for d in "AB"}


def test_remat_changes_neither_outputs_nor_gradients():
  config = test_config.get_config()
  plain = models_lib.create_models(config.model).gen2A
  config.model.remat = True
  remat = models_lib.create_models(config.model).gen2A
  z = normal(0, (2, 16, 16, 2 * config.model.ch))
  params = jax.jit(plain.init)(jax.random.PRNGKey(1), z)["params"]
  loss = lambda gen: jax.jit(jax.value_and_grad(lambda p: jnp.mean(gen.apply({"params": p}, z) ** 2)))
  (v1, g1), (v2, g2) = loss(plain)(params), loss(remat)(params)
  assert v1 == pytest.approx(float(v2), rel=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def tiny_config(**train):
  config = test_config.get_config()
  for key, value in train.items():
    config.train[key] = value
  return config


BATCHES = [random_batch(i, 2, 64) for i in range(3)]


@pytest.fixture(scope="module")
def float32_run():
  """Three single steps of the tiny config in float32: the reference for scan and bfloat16. Placed and
  jitted as the training loop does, so this is the program main.py's runs of configs/test.py compile."""
  config = tiny_config()
  models = models_lib.create_models(config.model)
  mesh = sharding.create_mesh(config.mesh)
  shapes = jax.eval_shape(lambda: train_state.create_train_state(config, jax.random.PRNGKey(0), models))
  shardings = sharding.state_shardings(shapes, mesh, config.mesh.shard_min_size)
  state = train_state.create_train_state(config, jax.random.PRNGKey(0), models, out_shardings=shardings)
  state0 = jax.device_get(state)  # the step donates its input
  train = sharding.jit_train_step(step.make_train_step(config, models), mesh, shardings)
  states, losses = [], []
  for b in BATCHES:
    state, m = train(state, sharding.global_batch(b, mesh))
    states.append(jax.device_get(state))
    losses.append({k: float(v) for k, v in m.items()})
  return state0, states, losses


def test_steps_per_dispatch_equals_single_steps(float32_run):
  """Two steps in one lax.scan give the same state and metrics as two dispatched steps."""
  state0, states, losses = float32_run
  config = tiny_config(steps_per_dispatch=2)
  models = models_lib.create_models(config.model)
  scanned = jax.jit(step.make_train_step(config, models))
  stacked = {d: np.stack([b[d] for b in BATCHES[:2]]) for d in "AB"}
  # The scanned step is this test's own program: compiled quickly (conftest.quick_compiles). Its margins
  # are the same either way: metrics within 4.5e-6 of the single steps; weights within 1e-6 but for
  # 0.004%, and all within 6e-6.
  with quick_compiles():
    s2, metrics = scanned(state0, stacked)
  assert int(s2.step) == 2 and metrics["G/loss"].shape == (2,)
  for i, m in enumerate(losses[:2]):
    for k in m:
      assert float(metrics[k][i]) == pytest.approx(m[k], rel=1e-5, abs=1e-7), (i, k)
  s1 = states[1]
  a = np.concatenate([np.ravel(x) for x in jax.tree.leaves((s1.gen_params, s1.disc_params))])
  b = np.concatenate([np.ravel(x) for x in jax.tree.leaves((s2.gen_params, s2.disc_params))])
  assert np.mean(np.abs(a - b) <= 1e-6) > 0.999 and np.abs(a - b).max() <= 2 * 2 * config.optimizer.lr


def test_several_steps_per_dispatch_are_flagged_on_a_cpu_only():
  from nicegan_jax import train
  message = train.slow_dispatch_warning(10, "cpu")
  assert "steps_per_dispatch=10" in message and "use 1 on a CPU" in message
  assert train.slow_dispatch_warning(1, "cpu") is None
  assert train.slow_dispatch_warning(10, "gpu") is None and train.slow_dispatch_warning(10, "tpu") is None


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_losses_track_float32(float32_run, dtype):
  """bfloat16 or float16 compute (float32 params, optimizer state and normalisation statistics) vs
  float32.

  bfloat16 keeps 8 mantissa bits: each conv output carries ~0.4% relative error, and the losses are
  means of many such values, so they agree to about 1%; over 3 steps we allow 3% per loss term
  (a broken cast — e.g. statistics or the loss in reduced precision — shows as 10% or more, or a NaN).
  float16 keeps 11 bits, so the same bound holds with room to spare; its narrow range is what could
  break it (an overflow is a NaN here, an underflow a zero gradient: benchmarks/precision.py).
  """
  _, _, losses32 = float32_run
  config = tiny_config()
  config.model.dtype = dtype
  models = models_lib.create_models(config.model)
  state = train_state.create_train_state(config, jax.random.PRNGKey(0), models)
  train = jax.jit(step.make_train_step(config, models))
  losses16 = []
  with quick_compiles():  # 3% bounds, far above what the compiler's optimisations change
    for b in BATCHES:
      state, m = train(state, b)
      losses16.append({k: float(v) for k, v in m.items()})
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((state.gen_params, state.disc_params,
                                                              state.g_opt_state, state.d_opt_state))
             if jnp.issubdtype(x.dtype, jnp.floating))
  for step_i, (l32, l16) in enumerate(zip(losses32, losses16)):
    for k in ("D/loss", "G/loss", "G/cycle_A", "G/recon_B", "D/adv_A_local", "G/adv_B_global"):
      assert np.isfinite(l16[k]) and l16[k] == pytest.approx(l32[k], rel=0.03), (step_i, k, l32[k], l16[k])


def test_prefetcher_keeps_order_surfaces_errors_and_stops():
  put_threads = set()

  def put(x):
    put_threads.add(threading.current_thread().name)
    return x * 10

  assert list(input_pipeline.Prefetcher(iter(range(5)), put, 2)) == [0, 10, 20, 30, 40]
  assert threading.current_thread().name not in put_threads  # the copies ran in the thread

  def failing():
    yield 1
    raise OSError("disk gone")
  it = input_pipeline.Prefetcher(failing(), put, 2)
  assert next(it) == 10
  with pytest.raises(OSError, match="disk gone"):
    next(it)

  def endless():
    i = 0
    while True:
      yield i
      i += 1
  it = input_pipeline.Prefetcher(endless(), put, 2)
  next(it)
  it.close()
  time.sleep(0.3)
  assert not it._thread.is_alive()
  assert list(input_pipeline.device_batches(iter([1, 2]), put, 0)) == [10, 20]


def test_stacked_groups_consecutive_batches():
  batches = iter([{"A": np.full((2, 1), i)} for i in range(6)])
  out = next(input_pipeline.stacked(batches, 3))
  assert out["A"].shape == (3, 2, 1) and out["A"][:, 0, 0].tolist() == [0, 1, 2]


def test_speed_benchmark_reports_every_field(capsys, tmp_path):
  from benchmarks import speed
  argv = ["--img_size=64", "--ch=8", "--n_res=1", "--batch=2", "--steps=2", "--warmup=1",
          "--translate_repeats=1", "--conv_impl=xla", "--loop=12", "--prefetch=1",
          f"--profile={tmp_path / 'profile'}", "--json"]  # xla: compiles faster at ch 8
  args = speed.parse(argv)
  assert speed.main(argv) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  for key in ("train_img_per_s", "step_s_median", "step_s_min", "step_s_pipelined", "compile_s",
              "peak_mem_bytes", "flops_per_step", "translate_img_per_s", "step_temp_bytes",
              "step_buffer_bytes"):
    assert key in result, key
  assert result["train_img_per_s"] == pytest.approx(2 * args.batch / result["step_s_median"])
  assert result["train_iter_per_s_pipelined"] == pytest.approx(1 / result["step_s_pipelined"])
  assert 0 < result["step_s_min"] <= result["step_s_median"]
  assert result["flops_per_step"] > 1e8 and result["peak_mem_bytes"] > 1e8
  assert 0 < result["step_temp_bytes"] < result["step_buffer_bytes"] < result["peak_mem_bytes"]
  assert set(result["translate_img_per_s"]) == {"1", "32"}
  assert result["translate_img_per_s_one_call"] > 0
  assert result["n_dis"] == 6 and result["light"] is True and result["backend"] == "cpu"
  assert result["conv_impl"] == "xla" and result["cpu_paths_off"] == []
  # --loop: main.py's training loop on real data, 5 log intervals of 2 steps (12 // 5 rounded down)
  assert result["loop_steps"] == 10 and result["prefetch"] == 1 and result["loop_step_s"] > 0
  assert result["loop_overhead_fraction"] == pytest.approx(
      1 - result["step_s_pipelined"] / result["loop_step_s"])
  # The launched operations: the step's convolutions among them (XLA's own, with --conv_impl=xla).
  by_opcode = result["hlo_ops_by_opcode"]
  assert result["hlo_ops_per_dispatch"] >= sum(by_opcode.values()) > 0
  assert by_opcode.get("convolution", 0) > 0 and by_opcode.get("fusion", 0) > 0
  # --profile: a trace TensorBoard's profile plugin reads.
  assert result["profile_dir"] == str(tmp_path / "profile")
  assert list((tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb"))


def test_launched_ops_count_loop_bodies_once_and_skip_what_does_no_work():
  from benchmarks import hlo_ops

  def hlo_text(length: int) -> str:
    def program(x):
      def body(carry, _):
        return jnp.tanh(carry @ carry), None
      return jax.lax.scan(body, x, None, length=length)[0].sum()
    return jax.jit(program).lower(jnp.ones((8, 8))).compile().as_text()

  text = hlo_text(5)
  counts = hlo_ops.launched_ops(text)
  assert counts["while"] == 1 and counts == hlo_ops.launched_ops(hlo_text(50))  # a body counts once
  bodies, entry = hlo_ops.computations(text)
  entry_ops = [i for i in bodies[entry] if hlo_ops.opcode(i) not in hlo_ops.NO_WORK]
  assert sum(counts.values()) >= len(entry_ops) + 3  # the body's matmul, tanh and counter, the loop test
  assert not set(counts) & hlo_ops.NO_WORK
  assert hlo_ops.summary(text, top=2)["total"] == sum(counts.values())
  assert len(hlo_ops.summary(text, top=2)["by_opcode"]) == 2


def test_opcode_reads_plain_and_tuple_shaped_instructions():
  from benchmarks import hlo_ops
  assert hlo_ops.opcode("%a.1 = f32[2,3]{1,0} add(f32[2,3]{1,0} %x, f32[2,3]{1,0} %y)") == "add"
  assert hlo_ops.opcode("ROOT %w = (s32[], f32[4,4]{1,0}) while(%t), condition=%c, body=%b") == "while"
  assert hlo_ops.opcode("%c = f32[] constant(0)") == "constant"


def test_speed_benchmark_counts_flops_without_compiling(capsys):
  from benchmarks import speed
  tiny = ["--img_size=64", "--ch=8", "--n_res=1", "--conv_impl=xla", "--flops_only", "--json"]
  counts = {}
  for batch in (1, 4):
    assert speed.main([*tiny, f"--batch={batch}"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "compile_s" not in result and result["batch"] == batch and result["conv_impl"] == "xla"
    counts[batch] = result["flops_per_step_traced"]
  # Everything but the parameter updates and spectral norm's power iterations scales with the batch.
  assert 3.8 < counts[4] / counts[1] <= 4
  assert speed.main(tiny[:-1]) == 0
  assert f"{counts[1] / 1e12:.3f} TFLOP per step as traced" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--batch=0"], "--batch=0: must be >= 1"),
    (["--steps=0"], "--steps=0: must be >= 1"),
    (["--devices=-2"], "--devices=-2: use -1 (all devices) or a positive count"),
    (["--img_size=30"], "--img_size=30 / --n_dis=6: img_size=30 must be a multiple of 4"),
    (["--ch=0"], "--ch=0: must be >= 1"),
    (["--without=winograd,fast"], "unknown path(s) fast; use some of weight_grad_taps"),
    (["--conv_impl=xla", "--without=padded"], "--conv_impl=xla takes none"),
])
def test_speed_benchmark_refuses_bad_values_by_name(argv, message, capsys):
  from benchmarks import speed
  with pytest.raises(SystemExit) as exit_:
    speed.parse(argv)
  assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_speed_benchmark_passes_a_policy_without_the_named_paths():
  from benchmarks import speed
  conv = speed.convolutions_of(speed.parse(["--without=winograd,padded"]))
  assert conv == convolutions.CpuConvolutions(convolutions.CpuPolicy().without("winograd", "padded"))
  wide = (jnp.zeros((8, 18, 18, 256)), jnp.zeros((3, 3, 256, 256)), 1)
  assert convolutions._uses_winograd(*wide, convolutions.CpuPolicy())
  assert not convolutions._uses_winograd(*wide, conv.policy)  # nothing global was changed
  assert speed.convolutions_of(speed.parse([])) is None  # the config's own convolutions


def test_speed_table_shows_each_rows_measurements_and_non_default_options():
  from benchmarks import speed_report
  base = {"img_size": 64, "ch": 64, "light": True, "batch": 8, "dtype": "float32", "remat": False,
          "steps_per_dispatch": 1, "devices": 1, "cpu_paths_off": [], "compile_s": 96.4,
          "step_s_median": 4.97, "train_iter_per_s": 1 / 4.97, "train_img_per_s": 16 / 4.97,
          "step_s_pipelined": 4.9,
          "peak_mem_bytes": 5.2 * 2**30, "peak_mem_kind": "peak RSS"}
  cpu = dict(base, backend="cpu", device="cpu", conv_impl="cpu", torch_step_s_median=7.02,
             step_buffer_bytes=2.5 * 2**30, step_temp_bytes=2 * 2**30,
             speedup_vs_torch=7.02 / 4.97, translate_img_per_s={"1": 23.04, "32": 43.9})
  cpu_slow = dict(cpu, cpu_paths_off=["padded", "winograd"], speedup_vs_torch=0.74)
  gpu = dict(base, backend="gpu", device="NVIDIA H200", conv_impl="xla", remat=True,
             steps_per_dispatch=10, step_s_median=0.0125, peak_fraction=0.412)
  header, rule, *lines = speed_report.markdown_table([cpu, cpu_slow, gpu]).splitlines()
  assert header.count("|") == rule.count("|") == lines[0].count("|") == 17
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
  columns = [c.strip() for c in header.strip("|").split("|")]
  row = dict(zip(columns, cells[0]))
  assert row["options"] == "-" and row["step (median)"] == "4.97 s" and row["train img/s"] == "3.22"
  assert row["vs eager PyTorch"] == "**1.41x faster**" and row["eager PyTorch step"] == "7.02 s"
  assert row["translate img/s (1 / 32)"] == "23.0 / 43.9" and row["peak memory"] == "5.2 GiB (peak RSS)"
  assert row["XLA's step buffers (temporaries)"] == "2.50 GiB (2.00 GiB)"
  slow = dict(zip(columns, cells[1]))
  assert slow["options"] == "without padded, winograd" and slow["vs eager PyTorch"] == "0.74x (slower)"
  accel = dict(zip(columns, cells[2]))
  assert accel["options"] == "remat, 10 steps/dispatch" and accel["step (median)"] == "12.5 ms"
  assert accel["% of chip peak"] == "41.2%" and accel["vs eager PyTorch"] == ""
  assert accel["XLA's step buffers (temporaries)"] == ""
  assert "training loop step (prefetch)" not in columns  # only when a row timed the loop
  looped = dict(cpu, loop_step_s=5.31, prefetch=0)
  header, _, *lines = speed_report.markdown_table([cpu, looped]).splitlines()
  columns = [c.strip() for c in header.strip("|").split("|")]
  plain, loop = (dict(zip(columns, [c.strip() for c in line.strip("|").split("|")])) for line in lines)
  assert len(columns) == 18 and loop["training loop step (prefetch)"] == "5.31 s (0)"
  assert loop["step, back to back"] == "4.90 s" and plain["training loop step (prefetch)"] == ""


def test_precision_benchmark_compares_gradients_as_its_fields_say():
  from benchmarks import precision
  g32 = np.array([3.0, 4.0, 0.0, 1.0])
  row = precision.compare((2.0, g32), (2.1, np.array([3.0, 4.0, 0.0, 0.0])))
  assert row["rel_err"] == pytest.approx(1 / np.sqrt(26))
  assert row["cosine"] == pytest.approx(25 / (5 * np.sqrt(26)))
  assert row["underflow"] == 0.25  # the last weight; the third is zero in both, so not an underflow
  assert row["finite"] and row["loss_rel_err"] == pytest.approx(0.05)
  assert not precision.compare((2.0, g32), (2.0, np.array([3.0, np.inf, 0.0, 1.0])))["finite"]


def smooth_image_folder(root, size: int = 72) -> None:
  """testA/ and testB/ with two images each: smooth colour ramps and a disc, not noise."""
  yy, xx = np.mgrid[0:size, 0:size] / size
  for domain, phase in (("A", 0.0), ("B", 1.5)):
    (root / f"test{domain}").mkdir(parents=True)
    for i in range(2):
      disc = ((yy - 0.5) ** 2 + (xx - 0.3 - 0.2 * i) ** 2 < 0.05)
      rgb = np.stack([np.sin(3 * xx + phase + i), np.cos(2 * yy - phase), disc * 1.0], -1)
      image = Image.fromarray(((rgb + 1) * 100).clip(0, 255).astype(np.uint8))
      image.save(root / f"test{domain}" / f"{i}.png")


def test_precision_benchmark_finds_float16_closer_to_float32_than_bfloat16(capsys, tmp_path):
  """Both reduced dtypes give finite gradients close to float32's; float16's 11 mantissa bits against
  bfloat16's 8 make its gradients several times closer (the bound asserted is 2x; docs/speed.md quotes
  the command's numbers on real photos)."""
  from benchmarks import precision
  smooth_image_folder(tmp_path)
  with quick_compiles():  # its three gradient programs; the bounds below are far above float rounding
    assert precision.main([f"--data={tmp_path}", "--img_size=64", "--ch=8", "--n_res=1", "--batch=2",
                           "--json"]) == 0
  rows = {r["dtype"]: r for r in map(json.loads, capsys.readouterr().out.strip().splitlines()[-2:])}
  assert set(rows) == {"bfloat16", "float16"} and rows["float16"]["batch"] == 2
  for dtype, row in rows.items():
    for net in "GD":
      r = row[net]
      assert r["finite"] and r["cosine"] > 0.99 and 0 < r["rel_err"] < 0.2, (dtype, net, r)
      assert 0 <= r["underflow"] < 0.01 and r["loss_rel_err"] < 0.01, (dtype, net, r)
  for net in "GD":
    assert rows["float16"][net]["rel_err"] < rows["bfloat16"][net]["rel_err"] / 2, net


def test_precision_benchmark_refuses_bad_arguments(capsys, tmp_path):
  from benchmarks import precision
  for argv, message in ((["--dtypes=float8"], "--dtypes=float8: use some of bfloat16, float16"),
                        ([f"--data={tmp_path / 'nope'}"], "no such folder"),
                        (["--img_size=30"], "img_size=30 must be a multiple of 4")):
    with pytest.raises(SystemExit) as exit_:
      precision.parse([f"--data={tmp_path}", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err, argv
  smooth_image_folder(tmp_path)
  assert precision.main([f"--data={tmp_path}", "--img_size=64", "--batch=3"]) == 2
  assert "has 2 images, --batch=3" in capsys.readouterr().err
