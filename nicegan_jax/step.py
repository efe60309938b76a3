"""One NICE-GAN training iteration as a pure function: `train_step(state, batch) -> (state, metrics)`.

Owns: the discriminator and generator objectives (`discriminator_loss`, `generator_loss`), the
iteration (`train_step`: D update, then everything recomputed with the updated discriminators, then G
update) and `make_train_step`, which binds the models, optimisers and loss weights.

Decoupled training, structurally:
- The D loss is differentiated w.r.t. the discriminators (encoders included) only; the two fakes carry
  `stop_gradient`, so nothing reaches the generators, nor the encoders through the generator path.
- The G loss is differentiated w.r.t. the generators only, with `stop_gradient` on the discriminator
  parameters. The codes z and z' are *not* stopped: the cycle term reaches the first generator through
  the other domain's (frozen) encoder.
Every discriminator call runs in training mode and advances its spectral-norm power iteration, 4 times
per discriminator per iteration, as in the original.

Besides the loss terms, each update reports the global L2 norm of its gradient (`D/grad_norm`,
`G/grad_norm`, before weight decay): a gradient that overflowed while its loss stayed finite (float16)
is then a non-finite metric too, which the training loop catches before the next checkpoint.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import optax

from nicegan_jax import layers
from nicegan_jax import losses
from nicegan_jax import train_state as train_state_lib
from nicegan_jax.models import DiscriminatorOutput, Models
from nicegan_jax.train_state import TrainState

HEADS = ("local", "global", "cam")
D_GRAD_NORM, G_GRAD_NORM = "D/grad_norm", "G/grad_norm"  # metrics beside the loss terms
GRAD_NORMS = (D_GRAD_NORM, G_GRAD_NORM)


def _head_logits(out: DiscriminatorOutput) -> dict[str, jax.Array]:
  return {"local": out.local_logits, "global": out.global_logits, "cam": out.cam_logit}


def run_discriminator(models: Models, name: str, params, spectral, images):
  """A training-mode discriminator call: (output, spectral vectors after one power iteration)."""
  out, mutated = getattr(models, name).apply({"params": params, "spectral": spectral}, images,
                                             update_stats=True, mutable=[layers.SPECTRAL])
  return out, mutated[layers.SPECTRAL]


def discriminator_loss(disc_params, spectral, gen_params, batch, *, models: Models, adv_weight: float):
  """adv_weight * sum over domains and heads of MSE(real, 1) + MSE(fake, 0).

  Returns (loss, (spectral, metrics)). Fakes are made from this iteration's codes and detached.
  """
  real_A, real_B = batch["A"], batch["B"]
  real_out_A, spec_A = run_discriminator(models, "disA", disc_params["disA"], spectral["disA"], real_A)
  real_out_B, spec_B = run_discriminator(models, "disB", disc_params["disB"], spectral["disB"], real_B)
  fake_A2B = jax.lax.stop_gradient(models.gen2B.apply({"params": gen_params["gen2B"]}, real_out_A.z))
  fake_B2A = jax.lax.stop_gradient(models.gen2A.apply({"params": gen_params["gen2A"]}, real_out_B.z))
  fake_out_A, spec_A = run_discriminator(models, "disA", disc_params["disA"], spec_A, fake_B2A)
  fake_out_B, spec_B = run_discriminator(models, "disB", disc_params["disB"], spec_B, fake_A2B)

  metrics = {}
  for domain, real_out, fake_out in (("A", real_out_A, fake_out_A), ("B", real_out_B, fake_out_B)):
    real_logits, fake_logits = _head_logits(real_out), _head_logits(fake_out)
    for head in HEADS:
      metrics[f"D/adv_{domain}_{head}"] = losses.lsgan_discriminator_loss(
          real_logits=real_logits[head], fake_logits=fake_logits[head])
  loss = adv_weight * sum(metrics.values())
  metrics["D/loss"] = loss
  return loss, ({"disA": spec_A, "disB": spec_B}, metrics)


def generator_loss(gen_params, disc_params, spectral, batch, *, models: Models, adv_weight: float,
                   cycle_weight: float, recon_weight: float):
  """Sum over domains X of adv * sum_h MSE(D_X(G_X(z)), 1) + cycle * L1 + recon * L1.

  `disc_params` enter as constants (stop_gradient); z and z' stay differentiable. Returns
  (loss, (spectral, metrics, images)).
  """
  disc_params = jax.lax.stop_gradient(disc_params)
  real = {"A": batch["A"], "B": batch["B"]}
  other = {"A": "B", "B": "A"}
  gens = {"A": lambda z: models.gen2A.apply({"params": gen_params["gen2A"]}, z),
          "B": lambda z: models.gen2B.apply({"params": gen_params["gen2B"]}, z)}
  spectral = dict(spectral)
  z = {}
  for d in "AB":
    out, spectral[f"dis{d}"] = run_discriminator(models, f"dis{d}", disc_params[f"dis{d}"],
                                                 spectral[f"dis{d}"], real[d])
    z[d] = out.z
  fake = {d: gens[d](z[other[d]]) for d in "AB"}  # fake["B"] = fake_A2B
  metrics, images = {}, {}
  loss = 0.0
  for d in "AB":
    fake_out, spectral[f"dis{d}"] = run_discriminator(models, f"dis{d}", disc_params[f"dis{d}"],
                                                      spectral[f"dis{d}"], fake[d])
    cycle = gens[other[d]](fake_out.z)  # e.g. d="A": fake_B2A -> z'_A -> gen2B = fake_B2A2B
    recon = gens[d](z[d])  # e.g. fake_A2A
    logits = _head_logits(fake_out)
    for head in HEADS:
      metrics[f"G/adv_{d}_{head}"] = losses.lsgan_generator_loss(fake_logits=logits[head])
    # The cycle that ends in domain d is scored against real d.
    metrics[f"G/cycle_{other[d]}"] = losses.l1_loss(cycle, real[other[d]])
    metrics[f"G/recon_{d}"] = losses.l1_loss(recon, real[d])
    images[f"fake_{other[d]}2{d}"] = fake[d]
    images[f"fake_{other[d]}2{d}2{other[d]}"] = cycle
    images[f"fake_{d}2{d}"] = recon
  for d in "AB":
    loss += adv_weight * sum(metrics[f"G/adv_{d}_{h}"] for h in HEADS)
    loss += cycle_weight * metrics[f"G/cycle_{d}"] + recon_weight * metrics[f"G/recon_{d}"]
  metrics["G/loss"] = loss
  return loss, (spectral, metrics, images)


def discriminator_update(state: TrainState, batch: dict[str, jax.Array], *, models: Models,
                         d_tx: optax.GradientTransformation, adv_weight: float):
  """The D half of an iteration: only `disc_params`, `d_opt_state` and `spectral` change."""
  grad_fn = jax.value_and_grad(discriminator_loss, has_aux=True)
  (_, (spectral, metrics)), grads = grad_fn(state.disc_params, state.spectral, state.gen_params, batch,
                                            models=models, adv_weight=adv_weight)
  updates, d_opt_state = d_tx.update(grads, state.d_opt_state, state.disc_params)
  disc_params = optax.apply_updates(state.disc_params, updates)
  metrics = {**metrics, D_GRAD_NORM: optax.tree.norm(grads)}
  return state.replace(disc_params=disc_params, d_opt_state=d_opt_state, spectral=spectral), metrics


def generator_update(state: TrainState, batch: dict[str, jax.Array], *, models: Models,
                     g_tx: optax.GradientTransformation, adv_weight: float, cycle_weight: float,
                     recon_weight: float):
  """The G half of an iteration: only `gen_params`, `g_opt_state` and `spectral` change."""
  grad_fn = jax.value_and_grad(generator_loss, has_aux=True)
  (_, (spectral, metrics, _)), grads = grad_fn(
      state.gen_params, state.disc_params, state.spectral, batch, models=models, adv_weight=adv_weight,
      cycle_weight=cycle_weight, recon_weight=recon_weight)
  updates, g_opt_state = g_tx.update(grads, state.g_opt_state, state.gen_params)
  gen_params = optax.apply_updates(state.gen_params, updates)
  metrics = {**metrics, G_GRAD_NORM: optax.tree.norm(grads)}
  return state.replace(gen_params=gen_params, g_opt_state=g_opt_state, spectral=spectral), metrics


def train_step(state: TrainState, batch: dict[str, jax.Array], *, models: Models,
               g_tx: optax.GradientTransformation, d_tx: optax.GradientTransformation,
               lr_fn: Callable[[jax.Array], jax.Array], adv_weight: float, cycle_weight: float,
               recon_weight: float, disc_lr_scale: float = 1.0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One iteration: D update on detached fakes, then G update against the updated discriminators."""
  state, d_metrics = discriminator_update(state, batch, models=models, d_tx=d_tx, adv_weight=adv_weight)
  state, g_metrics = generator_update(state, batch, models=models, g_tx=g_tx, adv_weight=adv_weight,
                                      cycle_weight=cycle_weight, recon_weight=recon_weight)
  lr = lr_fn(state.step + 1)
  metrics = {**d_metrics, **g_metrics, "lr/G": lr, "lr/D": lr * disc_lr_scale}
  return state.replace(step=state.step + 1), metrics


def scan_steps(train_step: Callable, state: TrainState, batches: dict[str, jax.Array]):
  """`train_step` over batches stacked on a leading axis, in one `lax.scan`; metrics stacked likewise."""
  return jax.lax.scan(train_step, state, batches)


def make_train_step(config, models: Models) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """`train_step` with its dependencies bound from `config` (not jitted; see sharding.jit_train_step).

  With `config.train.steps_per_dispatch` k > 1 it is `scan_steps` of k steps: batches and metrics carry
  a leading axis of length k.
  """
  g_tx, d_tx = train_state_lib.optimizers(config)
  one_step = functools.partial(
      train_step, models=models, g_tx=g_tx, d_tx=d_tx,
      lr_fn=train_state_lib.learning_rate_fn(config.optimizer, config.train.num_steps),
      adv_weight=float(config.loss.adv_weight), cycle_weight=float(config.loss.cycle_weight),
      recon_weight=float(config.loss.recon_weight),
      disc_lr_scale=train_state_lib.disc_lr_scale(config.optimizer))
  if config.train.steps_per_dispatch > 1:
    return functools.partial(scan_steps, one_step)
  return one_step
