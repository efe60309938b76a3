"""The training state pytree, the two optimisers and the learning-rate schedule.

Owns: `TrainState` (step, the four networks' params, the discriminators' spectral-norm vectors, the G and
D optimiser states), `learning_rate` (a pure function of the step), `create_optimizer` (coupled L2
weight decay then Adam, as PyTorch's `Adam(weight_decay=...)`, not AdamW) and `create_train_state`
(with its parts `fresh_state_fn` and `place_fresh_state`).

Ownership is the decoupled-training rule: the G optimiser owns gen2A and gen2B; the D optimiser owns
disA and disB, encoders included. Nothing else updates a parameter.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from nicegan_jax import models as models_lib
from nicegan_jax import sharding

GENERATORS = ("gen2A", "gen2B")
DISCRIMINATORS = ("disA", "disB")


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training; a plain pytree that Orbax saves and restores whole."""
  step: jax.Array  # number of completed iterations (int32 scalar)
  gen_params: dict[str, Any]  # {"gen2A": ..., "gen2B": ...}
  disc_params: dict[str, Any]  # {"disA": ..., "disB": ...}, encoders included
  spectral: dict[str, Any]  # {"disA": ..., "disB": ...}: power-iteration vectors u, v
  g_opt_state: optax.OptState
  d_opt_state: optax.OptState

  def disc_variables(self, name: str) -> dict[str, Any]:
    """Variables of one discriminator as `Discriminator.apply` wants them."""
    return {"params": self.disc_params[name], "spectral": self.spectral[name]}


def learning_rate(step: jax.Array, *, base_lr: float, num_steps: int, decay: bool,
                  decay_start_step: int) -> jax.Array:
  """Learning rate of the iteration numbered `step` (1-based, as the original counts).

  Constant up to `decay_start_step`, then linear to 0 at `num_steps`: lr = base * (T - s) / (T - start).
  With start = T // 2 this is the original's schedule; computed from the step alone, so a resume can
  never apply the decay twice (the original's resume bug).
  """
  step = jnp.asarray(step, jnp.float32)
  if not decay:
    return jnp.full_like(step, base_lr)
  span = max(num_steps - decay_start_step, 1)
  frac = jnp.clip((num_steps - step) / span, 0.0, 1.0)
  return base_lr * jnp.where(step > decay_start_step, frac, 1.0)


def learning_rate_fn(opt_config, num_steps: int, lr_scale: float = 1.0):
  """The schedule of `config.optimizer` (its lr times `lr_scale`) as a function of the 1-based step."""
  start = opt_config.decay_start_step
  if start < 0:
    start = num_steps // 2
  return lambda step: learning_rate(step, base_lr=opt_config.lr * lr_scale, num_steps=num_steps,
                                    decay=opt_config.decay_flag, decay_start_step=start)


def disc_lr_scale(opt_config) -> float:
  """D's learning rate over G's (1 in the original)."""
  return float(opt_config.disc_lr_scale)


def create_optimizer(opt_config, num_steps: int, lr_scale: float = 1.0) -> optax.GradientTransformation:
  """grad + wd * param (coupled L2), then Adam(b1, b2, eps), then the scheduled learning rate.

  optax's schedule receives the number of updates already made (0-based), the original's iteration
  number is that plus one.
  """
  lr_fn = learning_rate_fn(opt_config, num_steps, lr_scale)
  return optax.chain(
      optax.add_decayed_weights(opt_config.weight_decay),
      optax.scale_by_adam(b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps),
      optax.scale_by_learning_rate(lambda count: lr_fn(count + 1)),
  )


def init_network_variables(models: models_lib.Models, img_size: int, rng: jax.Array):
  """Initial params of all four networks and the discriminators' spectral vectors."""
  keys = jax.random.split(rng, 4)
  image = jnp.zeros((1, img_size, img_size, 3), jnp.float32)
  z = jnp.zeros((1, img_size // 4, img_size // 4, models.gen2A.ch * 2), jnp.float32)
  disA = models.disA.init(keys[0], image)
  disB = models.disB.init(keys[1], image)
  gen2A = models.gen2A.init(keys[2], z)["params"]
  gen2B = models.gen2B.init(keys[3], z)["params"]
  return ({"gen2A": gen2A, "gen2B": gen2B},
          {"disA": disA["params"], "disB": disB["params"]},
          {"disA": disA["spectral"], "disB": disB["spectral"]})


def create_train_state(config, rng: jax.Array, models: models_lib.Models | None = None,
                       out_shardings=None) -> TrainState:
  """Fresh state for `config`: PyTorch-default init, zeroed Adam moments, step 0, placed with
  `out_shardings` when given (see `place_fresh_state`)."""
  return place_fresh_state(fresh_state_fn(config, models), rng, out_shardings)


def fresh_state_fn(config, models: models_lib.Models | None = None):
  """The pure function rng -> fresh TrainState of `config` (PyTorch-default init, zeroed Adam moments,
  step 0), to be jitted: eager init would compile every op on its own.

  jax caches a trace per function object: a caller that wants the state's shapes before the state
  (`jax.eval_shape(jax.jit(fn), rng)`, then `place_fresh_state(fn, ...)`) holds on to one function and
  traces it once.
  """
  models = models or models_lib.create_models(config.model)
  g_tx, d_tx = optimizers(config)

  def init(rng):
    # The second key was once kept in the state, never read, and dropped; the split stays so that a seed
    # gives the same weights as it always has.
    init_rng, _ = jax.random.split(rng)
    gen_params, disc_params, spectral = init_network_variables(models, config.model.img_size, init_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), gen_params=gen_params, disc_params=disc_params,
                      spectral=spectral, g_opt_state=g_tx.init(gen_params),
                      d_opt_state=d_tx.init(disc_params))

  return init


def place_fresh_state(init, rng: jax.Array, out_shardings=None) -> TrainState:
  """`init(rng)` (a `fresh_state_fn`) run by one jitted program, placed with `out_shardings` when given.

  Shardings that copy the whole state to devices of this process (one device, or data parallelism) get
  the one-device program and a copy: the same numbers, and one compiled init for every such mesh instead
  of a program per mesh. Shardings that split a tensor, or span processes, compile the init for them, so
  that no device ever holds more than its share.
  """
  if out_shardings is not None and not sharding.copies_on_this_process(out_shardings):
    return jax.jit(init, out_shardings=out_shardings)(rng)
  state = jax.jit(init)(rng)
  return state if out_shardings is None else jax.device_put(state, out_shardings, donate=True)


def optimizers(config) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """(G optimiser, D optimiser): independent; the same hyper-parameters, as the original, unless
  `optimizer.disc_lr_scale` sets D's learning rate apart (the two time-scale update rule, TTUR)."""
  num_steps = config.train.num_steps
  scale = disc_lr_scale(config.optimizer)
  return (create_optimizer(config.optimizer, num_steps),
          create_optimizer(config.optimizer, num_steps, lr_scale=scale))
