"""Scale-out: the sharding rules, the per-device memory they give, data+model-sharded steps vs one device.

The data+model test lowers `mesh.shard_min_size` so the tiny test models have tensors split over the
`model` axis (at real sizes only the full generator's FC_0 and the largest discriminator convs are).
"""

import contextlib

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import full as full_config
from configs import test as test_config
from conftest import four_image_step_config, quick_compiles
from nicegan_jax import models as models_lib, sharding, step, train_state


def test_leaf_rule_splits_only_large_tensors_along_a_divisible_dimension():
  assert sharding.leaf_spec((1 << 20, 256), 4) == P("model")  # the full generator's FC_0 (in, out)
  assert sharding.leaf_spec((4, 4, 1024, 2048), 2) == P(None, None, None, "model")
  assert sharding.leaf_spec((3, 3, 256, 256), 2) == P()  # 590K elements: replicated
  assert sharding.leaf_spec((1 << 20, 256), 1) == P()
  assert sharding.leaf_spec((1_000_003, 3), 2) == P()  # nothing divisible: replicated
  assert sharding.leaf_spec((6, 10), 2, min_size=8) == P(None, "model")


def test_model_axis_lets_the_full_model_state_fit():
  """Per-device bytes of the full 256x256 model's train state (params + Adam moments), shapes only."""
  config = full_config.get_config()
  nets = models_lib.create_models(config.model)
  shapes = jax.eval_shape(lambda: train_state.create_train_state(config, jax.random.PRNGKey(0), nets))
  sizes = {}
  for model in (1, 2, 4, 8):
    mesh = sharding.create_mesh(type("M", (), {"data": 1, "model": model})(), jax.devices()[:model])
    sizes[model] = sharding.bytes_per_device(shapes, sharding.state_shardings(shapes, mesh))
  gib = {m: b / 2**30 for m, b in sizes.items()}
  assert 7.0 < gib[1] < 7.5, gib  # 647M params x 3 copies (param, mu, nu) x 4 bytes
  assert gib[2] < 0.55 * gib[1] and gib[8] < 0.2 * gib[1], gib


def test_mesh_errors_say_what_is_wrong():
  config = test_config.get_config().mesh
  config.data, config.model = -1, 3
  with pytest.raises(ValueError, match="config.mesh.model=3: must be >= 1 and divide the 8"):
    sharding.create_mesh(config)
  config.data, config.model = 8, 2
  with pytest.raises(ValueError, match="needs 16 devices but only 8"):
    sharding.create_mesh(config)


def test_a_state_copied_to_each_device_is_the_one_device_state_placed_as_asked():
  """Data parallelism (a whole copy per device, all in this process) takes the one-device init program and
  a copy; shardings that split a tensor are not taken for copies (they compile the init for themselves)."""
  config = test_config.get_config()
  nets = models_lib.create_models(config.model)
  one_device = train_state.create_train_state(config, jax.random.PRNGKey(0), nets)
  shapes = jax.eval_shape(lambda: one_device)
  data = sharding.create_mesh(type("M", (), {"data": 4, "model": 1})(), jax.devices()[:4])
  copies = sharding.state_shardings(shapes, data)
  assert sharding.copies_on_this_process(copies)
  placed = train_state.create_train_state(config, jax.random.PRNGKey(0), nets, out_shardings=copies)
  for got, want, asked in zip(jax.tree.leaves(placed), jax.tree.leaves(one_device), jax.tree.leaves(copies)):
    assert got.sharding == asked and np.array_equal(got, want)
  split = sharding.create_mesh(type("M", (), {"data": 2, "model": 2})(), jax.devices()[:4])
  assert not sharding.copies_on_this_process(sharding.state_shardings(shapes, split, min_size=1024))
  # At the default threshold nothing of the tiny model is split: whole copies again, model axis or not.
  assert sharding.copies_on_this_process(sharding.state_shardings(shapes, split))


def random_batch(seed: int, batch: int, size: int):
  rng = np.random.default_rng(seed)
  return {d: rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32) for d in "AB"}


def run_steps(config, mesh, state, batches):
  """The training loop's placement: the rule's shardings for the state, batches split on `data`."""
  nets = models_lib.create_models(config.model)
  shapes = jax.eval_shape(lambda: state)
  shardings = sharding.state_shardings(shapes, mesh, config.mesh.shard_min_size)
  train_step = sharding.jit_train_step(step.make_train_step(config, nets), mesh, shardings)
  state = jax.device_put(jax.tree.map(np.asarray, state), shardings)
  losses = []
  for b in batches:
    state, metrics = train_step(state, sharding.global_batch(b, mesh))
    losses.append({k: float(v) for k, v in metrics.items()})
  return state, losses, shardings


@pytest.mark.parametrize("light", [True, False], ids=["light", "full"])
def test_data_and_model_sharded_steps_equal_one_device(light):
  config = four_image_step_config()  # the light single-device run is test_step.py's compiled step
  config.model.light = light
  config.mesh.shard_min_size = 1024  # split the tiny model's tensors too
  nets = models_lib.create_models(config.model)
  state0 = train_state.create_train_state(config, jax.random.PRNGKey(0), nets)
  batches = [random_batch(i, config.train.batch_size, config.model.img_size) for i in range(2)]
  one = sharding.create_mesh(type("M", (), {"data": 1, "model": 1})(), jax.devices()[:1])
  mesh = sharding.create_mesh(type("M", (), {"data": 4, "model": 2})(), jax.devices()[:8])
  # The 8-device steps and the full model's one-device step are this test's own programs: compiled
  # quickly (conftest.quick_compiles). The light one-device step is test_step.py's, shared through the
  # cache and so compiled as usual. Either way the two sides differ in the last bits of float rounding,
  # as the reduction orders already make them differ, and far less than the tolerances below.
  with contextlib.nullcontext() if light else quick_compiles():
    single, single_losses, _ = run_steps(config, one, state0, batches)
  with quick_compiles():
    multi, multi_losses, shardings = run_steps(config, mesh, state0, batches)
  split = [s.spec for s in jax.tree.leaves(shardings) if s.spec != P()]
  assert len(split) >= 10, "the test must exercise model-sharded tensors"
  if not light:  # the full generator's FC_0 is among them, split along its 4096 inputs
    assert shardings.gen_params["gen2A"]["FC_0"]["kernel"].spec == P("model")
  # Step 1 starts from identical parameters: only the reduction order differs (1e-5). Step 2 starts from
  # parameters that already differ by the Adam effect described below, which the losses feel (1e-3).
  # G's gradient norm feels it in step 1 already (G's half runs after D's update; observed 1e-4 for
  # the full model), so the gradient norms get 1e-3 in both steps.
  for i, (a, b) in enumerate(zip(single_losses, multi_losses)):
    for k in a:
      rel = 1e-5 if i == 0 and k not in step.GRAD_NORMS else 1e-3
      assert b[k] == pytest.approx(a[k], rel=rel, abs=1e-6), (i, k)
  # Same tolerance argument as the data-parallel test in test_step.py: reductions in another order
  # change gradients by ~1e-7 relative; Adam's first steps move each weight by about lr * sign(g), so a
  # weight whose gradient is within rounding of zero can step the other way (up to 2 lr per step). The
  # bound that must hold is "within 2 Adam steps each way"; how many weights sit near zero gradient
  # depends on the model: ~0.1% for light, ~3% for full, whose FC_0 contraction over 4096 inputs is
  # split across devices (and whose gamma/beta feed every AdaILN layer).
  a = np.concatenate([np.ravel(x) for x in jax.tree.leaves((single.gen_params, single.disc_params))])
  b = np.concatenate([np.ravel(x) for x in jax.tree.leaves((multi.gen_params, multi.disc_params))])
  assert np.mean(np.abs(a - b) <= 1e-5) > (0.999 if light else 0.95)
  assert np.abs(a - b).max() <= 2 * 2 * config.optimizer.lr
