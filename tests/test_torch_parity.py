"""Parity with a PyTorch reference of the original, through the checkpoint importer.

The reference (`tests/torch_reference.py`) is written from the original's code. Each test saves it in the
original's checkpoint format (with thop's profiler entries), imports that with `nicegan_jax.convert`
(which never imports torch) and compares: forward passes of all four networks (eval mode), one training
iteration (every parameter, the spectral-norm vectors and both Adam states), and a continued run from an
imported mid-training checkpoint (the loss sequence, across the start of the lr decay).
"""

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch reference needs torch (requirements-test.txt)")

import torch_reference  # noqa: E402  (after the skip)
from configs import test as test_config  # noqa: E402
from nicegan_jax import convert, models as models_lib, step as step_lib, torch_pickle  # noqa: E402

IMG = 64  # the smallest size the original's discriminator accepts (n_dis 6)
LR = 1e-4


def make_reference(*, light: bool, seed: int = 0, iteration: int = 10) -> torch_reference.NICE:
  """A reference with every parameter moved off its constant init (rho, ILN gamma/beta, lamda) and the
  power iterations run a few times, so that eval-mode sigmas are meaningful and every layout is tested."""
  torch.manual_seed(seed)
  nice = torch_reference.NICE(ch=4, n_res=2, n_dis=6, img_size=IMG, light=light, iteration=iteration)
  with torch.no_grad():
    for net in nice.networks().values():
      for p in net.parameters():
        p.add_(0.05 * torch.randn_like(p))
    nice.disA.lamda.fill_(0.7)  # the CAM branch is off at lamda = 0; switch it on
    nice.disB.lamda.fill_(-0.4)
    nice.set_mode(True)
    for _ in range(5):
      for dis in (nice.disA, nice.disB):
        dis(torch.rand(1, 3, IMG, IMG) * 2 - 1)
  return nice


def save(ckpt: dict, path: pathlib.Path, *, zip_format: bool = True) -> pathlib.Path:
  torch.save(ckpt, path, _use_new_zipfile_serialization=zip_format)
  return path


def import_state(nice, tmp_path, step: int = 0, **config_overrides):
  path = save(nice.checkpoint(step, profiler_entries=True), tmp_path / f"x_params_{step:07d}.pt")
  base = test_config.get_config()
  base.train.batch_size = 1
  base.model.conv_impl = "cpu"  # the CPU default, which the tests' own config leaves out
  base.optimizer.decay_flag = True  # the original's schedule, which the tests' own config leaves out
  for key, value in config_overrides.items():
    base.train[key] = value
  ckpt = convert.read_checkpoint(path)
  config = convert.import_config(ckpt, base)
  models = models_lib.create_models(config.model)
  return convert.build_train_state(ckpt, config, models), config, models


def nhwc(x: torch.Tensor) -> np.ndarray:
  x = x.detach().numpy()
  return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x


# ------------------------------------------------------------------------------------- file reading
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reader_reads_both_torch_formats(tmp_path, zip_format):
  obj = {"w": torch.randn(3, 4, 2, 2), "t": torch.arange(6, dtype=torch.float16).reshape(2, 3).t(),
         "i": torch.tensor(7), "b": torch.tensor([True, False]), "bf": torch.ones(3, dtype=torch.bfloat16),
         "nested": [{"step": 3, "betas": (0.5, 0.999)}]}
  data = save(obj, tmp_path / "f.pt", zip_format=zip_format).read_bytes()
  out = torch_pickle.load(data)
  np.testing.assert_array_equal(out["w"], obj["w"].numpy())
  np.testing.assert_array_equal(out["t"], obj["t"].numpy())  # a transposed (strided) view
  assert out["i"] == 7 and out["b"].tolist() == [True, False]
  np.testing.assert_array_equal(out["bf"].astype(np.float32), np.ones(3, np.float32))
  assert out["nested"] == [{"step": 3, "betas": (0.5, 0.999)}]


def test_reader_refuses_code_and_garbage(tmp_path):
  class Evil:
    def __reduce__(self):
      return (print, ("pwned",))
  data = save({"x": Evil()}, tmp_path / "evil.pt").read_bytes()
  with pytest.raises(torch_pickle.TorchFileError, match=r"refusing to build (__builtin__|builtins)\.print"):
    torch_pickle.load(data)
  with pytest.raises(torch_pickle.TorchFileError, match="not a"):
    torch_pickle.load(b"certainly not a checkpoint")


# ------------------------------------------------------------------------------ checkpoint validation
def test_import_errors_name_the_keys(tmp_path):
  nice = make_reference(light=True)
  ckpt = nice.checkpoint(0)
  del ckpt["gen2A"]["UpBlock1_1.norm1.rho"]
  ckpt["disB"]["conv1x1.bias"] = torch.zeros(5)
  ckpt["disB"]["stray.weight"] = torch.zeros(1)
  path = save(ckpt, tmp_path / "bad.pt")
  with pytest.raises(convert.ConversionError) as error:
    convert.import_checkpoint(path, tmp_path / "run")
  lines = str(error.value).splitlines()[1:]
  assert [line.strip() for line in lines] == [
      "gen2A missing: UpBlock1_1.norm1.rho",
      "disB mis-shaped: conv1x1.bias (5,) (expected (8,))",
      "disB unexpected: stray.weight"]
  del ckpt["gen2A"]
  with pytest.raises(convert.ConversionError, match="missing gen2A"):
    convert.import_checkpoint(save(ckpt, tmp_path / "bad2.pt"), tmp_path / "run")
  (tmp_path / "notes.pt").write_text("hello")
  with pytest.raises(convert.ConversionError, match="not a readable PyTorch file"):
    convert.import_checkpoint(tmp_path / "notes.pt", tmp_path / "run")
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_infers_the_model_from_shapes():
  light = {"disA": {"model.1.weight_orig": np.zeros((4, 3, 4, 4)), "Dis0_0.1.weight_orig": 0},
           "gen2B": {"FC.0.weight": np.zeros((16, 16)), "UpBlock1_1.conv1.weight": 0,
                     "UpBlock1_2.conv1.weight": 0, "UpBlock1_3.conv1.weight": 0}}
  assert convert.infer_model(light, img_size=128) == {"ch": 4, "n_res": 3, "n_dis": 7, "light": True,
                                                      "img_size": 128}
  full = {"disA": light["disA"], "gen2B": {**light["gen2B"], "FC.0.weight": np.zeros((16, 16 * 32 * 32))}}
  assert convert.infer_model(full, img_size=256)["img_size"] == 128
  assert not convert.infer_model(full)["light"]


# ------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("light", [True, False], ids=["light", "full"])
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_forward_equals_reference(tmp_path, light, zip_format):
  nice = make_reference(light=light, seed=int(light))
  path = save(nice.checkpoint(0, profiler_entries=True), tmp_path / "x.pt", zip_format=zip_format)
  ckpt = convert.read_checkpoint(path)
  config = convert.import_config(ckpt, test_config.get_config())
  assert (config.model.ch, config.model.n_res, config.model.n_dis, config.model.light,
          config.model.img_size) == (4, 2, 6, light, IMG)
  models = models_lib.create_models(config.model)
  state = convert.build_train_state(ckpt, config, models)
  nice.set_mode(False)  # eval: sigma from the stored u, v, no power iteration
  x = torch.rand(2, 3, IMG, IMG) * 2 - 1
  with torch.no_grad():
    for name in ("disA", "disB"):
      ref = nice.networks()[name](x)
      ours = models.disA.apply(state.disc_variables(name), jnp.asarray(nhwc(x)))
      for r, o, field in zip(ref, ours, ours._fields):
        np.testing.assert_allclose(np.asarray(o), nhwc(r), atol=1e-4 * max(1.0, float(r.abs().max())),
                                   err_msg=f"{name}.{field}")
    z = nice.disA(x)[4]
    for name in ("gen2A", "gen2B"):
      ref = nhwc(nice.networks()[name](z))
      ours = models.gen2A.apply({"params": state.gen_params[name]}, jnp.asarray(nhwc(z)))
      np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, err_msg=name)


# ------------------------------------------------------------------------------------------ training
def assert_states_close(ours, ref, *, steps: int, what: str, param_tol: float = 1e-6,
                        moment_tol: float = 1e-5, moment_max: float | None = None):
  """Params: 99.9% of entries within `param_tol` and all within 2 * lr * steps.

  Float32 reductions run in a different order in XLA and in PyTorch, so gradients differ by ~1e-7
  relative; Adam divides by sqrt(v), so an element whose gradient is near zero can take a different
  step of up to lr (|m_hat / sqrt(v_hat)| <= ~1 for these steps) — never more than lr per step each way.
  Spectral vectors are unit vectors, compared to 1e-5. Adam moments, relative to each leaf's largest
  entry: 99.9% within `moment_tol` and all within `moment_max` (default 100x that) — after one
  iteration 1e-5 (a gradient summed in another order, with cancellation); after several, looser,
  because by then the parameters themselves differ by the Adam effect above and every later gradient
  feels it. How much looser depends on the CPU's summation order: on an AVX-512 machine, four steps
  on, 99.9% of the generator's entries were within 4e-6 (99% within 1.5e-6, hence `param_tol` 1e-5
  there) and its first moments within 1.5e-2 of their leaf's largest entry (5.5% beyond 1e-3), where an
  AVX2 machine had kept 99.9% of them within 1e-3; the losses still agree to 1e-5 at every step.
  """
  for collection in ("gen_params", "disc_params"):
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(getattr(ours, collection))])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(getattr(ref, collection))])
    diff = np.abs(a - b)
    assert np.mean(diff <= param_tol) >= 0.999, (what, collection, np.mean(diff <= param_tol))
    assert diff.max() <= 2 * LR * steps, (what, collection, diff.max())
  for x, y in zip(jax.tree.leaves(ours.spectral), jax.tree.leaves(ref.spectral)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, err_msg=f"{what} spectral")
  assert int(ours.step) == int(ref.step)
  for opt in ("g_opt_state", "d_opt_state"):
    rel = []
    for x, y in zip(jax.tree.leaves(getattr(ours, opt)), jax.tree.leaves(getattr(ref, opt))):
      x, y = np.asarray(x), np.asarray(y)
      if x.ndim == 0:
        assert int(x) == int(y), (what, opt, "count")
      else:
        rel.append(np.ravel(np.abs(x - y) / max(np.abs(y).max(), 1e-30)))
    rel = np.concatenate(rel)
    moment_max = 100 * moment_tol if moment_max is None else moment_max
    assert np.mean(rel <= moment_tol) >= 0.999 and rel.max() <= moment_max, (
        what, opt, np.mean(rel <= moment_tol), rel.max())


def test_training_matches_reference_and_resumes_from_imported_optimizer(tmp_path):
  num_steps = 6  # lr decays linearly after step 3: steps 4..6 check the schedule too
  nice = make_reference(light=True, seed=2, iteration=num_steps)
  state, config, models = import_state(nice, tmp_path, num_steps=num_steps)
  train_step = jax.jit(step_lib.make_train_step(config, models))
  rng = np.random.default_rng(0)
  batches = [rng.uniform(-1, 1, (2, 1, 3, IMG, IMG)).astype(np.float32) for _ in range(num_steps)]
  as_batch = lambda ab: {"A": jnp.asarray(ab[0].transpose(0, 2, 3, 1)),
                         "B": jnp.asarray(ab[1].transpose(0, 2, 3, 1))}

  # One iteration from the same weights and batch: every variable, the Adam states and the step.
  ref_losses = [nice.train_iteration(1, *map(torch.from_numpy, batches[0]))]
  state, metrics = train_step(state, as_batch(batches[0]))
  for key in ("D/loss", "G/loss"):
    assert float(metrics[key]) == pytest.approx(ref_losses[0][key], rel=1e-5)
  after_one, _, _ = import_state(nice, tmp_path, step=1, num_steps=num_steps)
  assert_states_close(state, after_one, steps=1, what="after one iteration")

  # The reference trains one more step, saves with its optimizers; we import that and both continue.
  ref_losses.append(nice.train_iteration(2, *map(torch.from_numpy, batches[1])))
  state, _, _ = import_state(nice, tmp_path, step=2, num_steps=num_steps)
  assert int(state.step) == 2 and int(state.g_opt_state[1].count) == 2
  for step in range(3, num_steps + 1):
    ref = nice.train_iteration(step, *map(torch.from_numpy, batches[step - 1]))
    state, metrics = train_step(state, as_batch(batches[step - 1]))
    for key in ("D/loss", "G/loss"):
      assert float(metrics[key]) == pytest.approx(ref[key], rel=1e-5), (step, key)
    assert float(metrics["lr/G"]) == pytest.approx(nice.learning_rate(step), rel=1e-6)
  final, _, _ = import_state(nice, tmp_path, step=num_steps, num_steps=num_steps)
  assert_states_close(state, final, steps=num_steps - 2, what="after the continued run", param_tol=1e-5,
                      moment_tol=2e-2, moment_max=1e-1)


def test_import_checkpoint_writes_a_resumable_workdir(tmp_path):
  from nicegan_jax import checkpoints, inference
  nice = make_reference(light=True, seed=3)
  nice.train_iteration(1, torch.rand(1, 3, IMG, IMG) * 2 - 1, torch.rand(1, 3, IMG, IMG) * 2 - 1)
  path = save(nice.checkpoint(1, profiler_entries=True), tmp_path / "x_params_latest.pt")
  step, config = convert.import_checkpoint(path, tmp_path / "run", test_config.get_config())
  assert step == 1 and config.model.ch == 4
  translator = inference.load_translator(tmp_path / "run")
  x = np.random.default_rng(0).uniform(-1, 1, (IMG, IMG, 3)).astype(np.float32)
  nice.set_mode(False)
  with torch.no_grad():
    ref = nhwc(nice.gen2B(nice.disA(torch.from_numpy(x.transpose(2, 0, 1)[None]))[4]))[0]
  np.testing.assert_allclose(inference.translate(translator, x, "A2B"), ref, atol=1e-4)
  # Resume accepts it: the training loop's restore returns exactly the imported state.
  from nicegan_jax import sharding, train
  ckpt = checkpoints.Checkpointer(tmp_path / "run" / "checkpoints")
  saved_config = ml_collections.ConfigDict(ckpt.restore_config())
  assert saved_config.model.light is True and saved_config.model.ch == 4
  models = models_lib.create_models(saved_config.model)
  restored, _ = train.initial_state(saved_config, models, sharding.create_mesh(saved_config.mesh), ckpt)
  expected = convert.build_train_state(convert.read_checkpoint(path), saved_config, models)
  assert int(restored.step) == 1
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ckpt.close()
  with pytest.raises(convert.ConversionError, match="already holds checkpoints"):
    convert.import_checkpoint(path, tmp_path / "run")


def test_import_torch_command(tmp_path):
  import subprocess
  import sys
  from conftest import ROOT
  nice = make_reference(light=False, seed=4)
  path = save(nice.checkpoint(0, profiler_entries=True), tmp_path / "x_params_latest.pt", zip_format=False)
  run = lambda *args: subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT,
                                     capture_output=True, text=True, timeout=300)
  result = run("--mode=import_torch", f"--torch_checkpoint={path}", f"--workdir={tmp_path / 'run'}",
               f"--config={ROOT / 'configs' / 'test.py'}", "--notorch_optimizer")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "(full, ch 4, n_res 2, n_dis 6, img_size 64) at step 0" in result.stdout
  assert (tmp_path / "run" / "checkpoints" / "0" / "state").is_dir()
  result = run("--mode=import_torch", f"--torch_checkpoint={tmp_path / 'missing.pt'}",
               f"--workdir={tmp_path / 'run2'}")
  assert result.returncode != 0 and "error: no such file" in result.stderr
