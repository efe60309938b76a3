"""The train step: decoupling (bit-exact), power iterations, metrics, and sharded == single device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import four_image_step_config, quick_compiles, uniform
from nicegan_jax import models as models_lib
from nicegan_jax import sharding, step, train_state


def random_batch(seed, batch_size, img_size):
  shape = (batch_size, img_size, img_size, 3)
  return {"A": uniform(2 * seed, shape), "B": uniform(2 * seed + 1, shape)}


@pytest.fixture(scope="module")
def setup():
  config = four_image_step_config()
  models = models_lib.create_models(config.model)
  # Placed as the jitted step wants it: a differently-placed argument would compile the step again.
  mesh = sharding.create_mesh(devices=jax.devices()[:1])
  state = train_state.create_train_state(config, jax.random.PRNGKey(0), models,
                                         out_shardings=sharding.replicated(mesh))
  batch = jax.device_put(random_batch(1, config.train.batch_size, config.model.img_size),
                         sharding.batch_sharding(mesh))
  return config, models, state, batch


def leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def d_loss_grads(setup):
  """The D loss's gradients w.r.t. (the discriminators, the generators), from one compiled program."""
  config, models, state, batch = setup
  grad = jax.jit(jax.grad(step.discriminator_loss, argnums=(0, 2), has_aux=True),
                 static_argnames=("models", "adv_weight"))
  with quick_compiles():  # what is asserted of it is exact zeros, and a norm to 1e-5
    grads, _ = grad(state.disc_params, state.spectral, state.gen_params, batch, models=models,
                    adv_weight=1.0)
  return grads


def test_d_loss_gives_the_generators_exactly_zero_gradient(setup, d_loss_grads):
  _, _, state, _ = setup
  _, g = d_loss_grads
  assert jax.tree.structure(g) == jax.tree.structure(state.gen_params)
  assert all(not np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(g))


def test_g_loss_gives_the_discriminators_exactly_zero_gradient_but_reaches_gen_through_z(setup):
  config, models, state, batch = setup

  def cycle_A_and_full(gen_params, disc_params):
    loss, (_, metrics, _) = step.generator_loss(
        gen_params, disc_params, state.spectral, batch, models=models, adv_weight=1.0,
        cycle_weight=10.0, recon_weight=10.0)
    return loss, metrics["G/cycle_A"]

  @jax.jit
  def grads(gen_params, disc_params):
    full = jax.grad(lambda g, d: cycle_A_and_full(g, d)[0], argnums=(0, 1))(gen_params, disc_params)
    # L1(gen2A(E_B(gen2B(E_A(A)))), A): gen2B enters only through disB's frozen encoder.
    cycle = jax.grad(lambda g: cycle_A_and_full(g, disc_params)[1])(gen_params)
    return full, cycle

  with quick_compiles():  # exact zeros and non-zeros: no rounding enters what is asserted
    (g_gen, g_disc), g_cycle = grads(state.gen_params, state.disc_params)
  assert all(not np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(g_disc))
  assert all(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(g_gen["gen2A"]))
  gen2B_norm = sum(float(jnp.sum(leaf ** 2)) for leaf in jax.tree.leaves(g_cycle["gen2B"]))
  assert gen2B_norm > 0


def test_each_update_touches_only_its_owners_parameters(setup, d_loss_grads):
  config, models, state, batch = setup
  g_tx, d_tx = train_state.optimizers(config)
  d_update = jax.jit(functools.partial(step.discriminator_update, models=models, d_tx=d_tx,
                                       adv_weight=1.0))
  g_update = jax.jit(functools.partial(step.generator_update, models=models, g_tx=g_tx,
                                       adv_weight=1.0, cycle_weight=10.0, recon_weight=10.0))
  with quick_compiles():  # untouched parameters stay bit-identical however the programs are compiled
    after_d, d_metrics = d_update(state, batch)
    after_g, _ = g_update(after_d, batch)
  # The reported norm is that of the D loss's gradient w.r.t. the discriminators, before weight decay.
  d_grads, _ = d_loss_grads
  norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(d_grads)))
  assert float(d_metrics["D/grad_norm"]) == pytest.approx(norm, rel=1e-5)
  assert leaves_equal(after_d.gen_params, state.gen_params)
  assert leaves_equal(after_d.g_opt_state, state.g_opt_state)
  assert not leaves_equal(after_d.disc_params["disA"], state.disc_params["disA"])
  assert not leaves_equal(after_d.disc_params["disB"], state.disc_params["disB"])
  assert leaves_equal(after_g.disc_params, after_d.disc_params)  # encoders included
  assert leaves_equal(after_g.d_opt_state, after_d.d_opt_state)
  for name in ("gen2A", "gen2B"):
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after_g.gen_params[name]),
                                                         jax.tree.leaves(after_d.gen_params[name]))]
    assert all(changed), name


@pytest.fixture(scope="module")
def one_step(setup):
  config, models, state, batch = setup
  mesh = sharding.create_mesh(devices=jax.devices()[:1])
  train_step = sharding.jit_train_step(step.make_train_step(config, models), mesh)
  before = jax.tree.map(np.asarray, state)
  after, metrics = train_step(jax.tree.map(jnp.copy, state), batch)
  return train_step, before, after, metrics


def test_metrics_name_every_term_and_are_finite(one_step):
  _, _, _, metrics = one_step
  expected = {f"D/adv_{d}_{h}" for d in "AB" for h in step.HEADS}
  expected |= {f"G/adv_{d}_{h}" for d in "AB" for h in step.HEADS}
  expected |= {"G/cycle_A", "G/cycle_B", "G/recon_A", "G/recon_B", "D/loss", "G/loss", "lr/G", "lr/D"}
  expected |= {"D/grad_norm", "G/grad_norm"}
  assert set(metrics) == expected
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert float(metrics["D/grad_norm"]) > 0 and float(metrics["G/grad_norm"]) > 0
  d_sum = sum(float(metrics[f"D/adv_{d}_{h}"]) for d in "AB" for h in step.HEADS)
  assert float(metrics["D/loss"]) == pytest.approx(d_sum, rel=1e-6)
  g_sum = sum(float(metrics[f"G/adv_{d}_{h}"]) for d in "AB" for h in step.HEADS)
  g_sum += 10 * sum(float(metrics[f"G/{t}_{d}"]) for t in ("cycle", "recon") for d in "AB")
  assert float(metrics["G/loss"]) == pytest.approx(g_sum, rel=1e-6)
  assert float(metrics["lr/G"]) == pytest.approx(1e-4)
  assert float(metrics["lr/D"]) == pytest.approx(2e-4)


def test_power_iteration_advances_four_times_per_step(one_step):
  _, before, after, _ = one_step
  for name in ("model_1", "Dis1_1_1"):
    kernel_before = before.disc_params["disA"][name]["kernel"].astype(np.float64)
    kernel_after = np.asarray(after.disc_params["disA"][name]["kernel"], np.float64)
    u = before.spectral["disA"][name]["u"].astype(np.float64)
    v = before.spectral["disA"][name]["v"].astype(np.float64)
    norm = lambda a: a / max(np.linalg.norm(a), 1e-12)
    # Real and fake with the old weights (D step), real and fake with the new ones (G step).
    for kernel in (kernel_before, kernel_before, kernel_after, kernel_after):
      w = kernel.transpose(3, 2, 0, 1).reshape(kernel.shape[-1], -1)
      v = norm(w.T @ u)
      u = norm(w @ v)
    np.testing.assert_allclose(after.spectral["disA"][name]["u"], u, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(after.spectral["disA"][name]["v"], v, rtol=1e-4, atol=1e-5)


def test_a_few_steps_stay_finite_and_move_every_owned_parameter(setup, one_step):
  config, _, _, _ = setup
  train_step, before, state, _ = one_step
  state = jax.tree.map(jnp.copy, state)
  mesh = sharding.create_mesh(devices=jax.devices()[:1])
  for i in range(2):
    batch = jax.device_put(random_batch(10 + i, config.train.batch_size, config.model.img_size),
                           sharding.batch_sharding(mesh))
    state, metrics = train_step(state, batch)
    assert all(np.isfinite(float(v)) for v in metrics.values())
  assert int(state.step) == 3
  for tree in ("gen_params", "disc_params"):
    for a, b in zip(jax.tree.leaves(getattr(before, tree)), jax.tree.leaves(getattr(state, tree))):
      assert not np.array_equal(a, b)


def test_sharded_step_equals_single_device(setup, one_step):
  config, models, state, batch = setup
  single_step, _, _, _ = one_step
  mesh = sharding.create_mesh(devices=jax.devices()[:4])
  assert mesh.shape["data"] == 4
  sharded_step = sharding.jit_train_step(step.make_train_step(config, models), mesh)
  mesh1 = sharding.create_mesh(devices=jax.devices()[:1])
  single = jax.tree.map(jnp.copy, state)
  multi = jax.device_put(jax.tree.map(np.asarray, state), sharding.replicated(mesh))
  for i in range(2):
    b = random_batch(20 + i, config.train.batch_size, config.model.img_size)
    single, m1 = single_step(single, sharding.global_batch(jax.tree.map(np.asarray, b), mesh1))
    multi, m2 = sharded_step(multi, sharding.global_batch(jax.tree.map(np.asarray, b), mesh))
    np.testing.assert_allclose(float(m1["G/loss"]), float(m2["G/loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m1["D/loss"]), float(m2["D/loss"]), rtol=1e-5)
  assert multi.gen_params["gen2A"]["UpBlock0_1"]["kernel"].sharding.is_fully_replicated
  # Each Adam step moves a weight by about lr = 1e-4 whatever the gradient's size. A different reduction
  # order across devices changes gradients in the last bits; where a gradient is ~0 that can flip the
  # sign of an update. So: nearly every weight agrees to 10% of one update (observed max ~3e-6), and
  # no weight differs by more than the two updates it received could (2 steps x 2 lr).
  for a, b in zip(jax.tree.leaves((single.gen_params, single.disc_params)),
                  jax.tree.leaves((multi.gen_params, multi.disc_params))):
    diff = np.abs(np.asarray(a) - np.asarray(b))
    assert diff.max() <= 4e-4
    assert np.mean(diff > 1e-5) < 1e-3
  for a, b in zip(jax.tree.leaves(single.spectral), jax.tree.leaves(multi.spectral)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def test_batch_size_must_divide_over_the_data_axis():
  mesh = sharding.create_mesh(devices=jax.devices()[:4])
  with pytest.raises(ValueError, match="multiple of the 4 devices"):
    sharding.check_batch_size(6, mesh)
  with pytest.raises(ValueError, match="only 4 devices"):
    sharding.create_mesh(type("M", (), {"data": 8})(), devices=jax.devices()[:4])
