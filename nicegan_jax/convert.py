"""Importing the original PyTorch NICE-GAN checkpoints (`<dataset>_params_latest.pt`, `_params_<step>.pt`).

Owns: reading such a file without torch (`read_checkpoint`, both serialisation formats, profiler
entries dropped), inferring the model from its tensor shapes (`infer_model`), converting every tensor to
our layout (`convert_networks`; NCHW kernels -> HWIO, (out, in) -> (in, out), spectral-norm
`weight_orig` / `weight_u` / `weight_v` kept as kernel and power-iteration vectors, so inference uses the
sigma = u . (W v) that PyTorch's eval mode computes from the stored u and v), converting both Adam states
and the step (`convert_optimizer`), and `import_checkpoint`, which writes a normal Orbax checkpoint.

  python main.py --mode=import_torch --torch_checkpoint=results/cat2dog_params_latest.pt --workdir=RUN

The original's Adam optimisers own chain(gen2B, gen2A) and chain(disA, disB) parameters in
`parameters()` order, which is the state_dict order without buffers (`weight_u`, `weight_v`). For a
light model the image size is not in the weights (every layer is size-agnostic): it comes from the
config (the original's 256 by default); a full model's size is read from its `FC.0` weight.
"""

from __future__ import annotations

import math
import pathlib
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from nicegan_jax import checkpoints, config_lib, torch_pickle
from nicegan_jax import models as models_lib
from nicegan_jax import train_state as train_state_lib
from nicegan_jax.param_map import discriminator_key_map, generator_key_map

NETWORKS = ("gen2B", "gen2A", "disA", "disB")  # G_optim owns the first two, D_optim the last two
PROFILER_ENTRIES = ("total_ops", "total_params")  # buffers left behind by thop.profile
BUFFERS = ("weight_u", "weight_v") + PROFILER_ENTRIES  # state_dict entries that are not parameters


class ConversionError(ValueError):
  """The file is not an original NICE-GAN checkpoint, or its tensors do not fit the model."""


# --------------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | pathlib.Path) -> dict:
  """The checkpoint dict with numpy tensors; profiler entries removed from the four state_dicts.

  The file is read by `torch_pickle` (no code runs; memory bounded by the file's size) and its shape
  checked: four state_dicts of named floating-point tensors. Anything else is a ConversionError.
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise ConversionError(f"no such file {path}")
  try:
    data = path.read_bytes()
  except OSError as e:
    raise ConversionError(f"cannot read {path}: {e.strerror or e}") from None
  try:
    ckpt = torch_pickle.load(data)
  except torch_pickle.TorchFileError as e:
    raise ConversionError(f"{path} is not a readable PyTorch file: {e}") from None
  if not isinstance(ckpt, dict):
    raise ConversionError(f"{path} holds a {type(ckpt).__name__}, not the original's checkpoint dict")
  missing = [k for k in NETWORKS if not isinstance(ckpt.get(k), dict)]
  if missing:
    found = ", ".join(sorted(repr(k)[:40] for k in ckpt)[:20]) or "none"
    raise ConversionError(f"{path} is not an original NICE-GAN checkpoint: missing {', '.join(missing)} "
                          f"(found keys: {found})")
  for name in NETWORKS:
    bad = [repr(k)[:60] for k, v in ckpt[name].items()
           if not isinstance(k, str) or not (isinstance(v, np.ndarray) and v.dtype.kind in "fiub")]
    if bad:
      raise ConversionError(f"{path}: {name} holds entries that are not named tensors: {', '.join(bad[:5])}")
    ckpt[name] = {k: v for k, v in ckpt[name].items() if k.rsplit(".", 1)[-1] not in PROFILER_ENTRIES}
  return ckpt


def _shape(state_dict: dict, key: str, network: str, ndim: int) -> tuple[int, ...]:
  if key not in state_dict:
    raise ConversionError(f"{network}: missing {key}; cannot infer the model")
  shape = tuple(np.shape(state_dict[key]))
  if len(shape) != ndim or min(shape, default=0) < 1:
    raise ConversionError(f"{network}: {key} has shape {shape}; expected {ndim} non-zero dimensions")
  return shape


def infer_model(ckpt: dict, img_size: int = 256) -> dict:
  """{ch, n_res, n_dis, light, img_size} from the tensor shapes (`img_size` used for light models)."""
  dis, gen = ckpt["disA"], ckpt["gen2B"]
  ch = _shape(dis, "model.1.weight_orig", "disA", 4)[0]
  n_dis = 6 + sum(1 for k in dis if k.startswith("Dis0_0.") and k.endswith(".weight_orig"))
  n_res = sum(1 for k in gen if k.startswith("UpBlock1_") and k.endswith(".conv1.weight"))
  fc_out, fc_in = _shape(gen, "FC.0.weight", "gen2B", 2)
  light = fc_in == 4 * ch
  if not light:
    side = math.isqrt(fc_in // (4 * ch))
    if 4 * ch * side * side != fc_in:
      raise ConversionError(f"gen2B: FC.0.weight has shape {(fc_out, fc_in)}, neither light "
                            f"({4 * ch} inputs) nor full (4*ch*(img_size/4)^2 inputs) for ch={ch}")
    img_size = 4 * side
  return {"ch": ch, "n_res": n_res, "n_dis": n_dis, "light": light, "img_size": img_size}


# ------------------------------------------------------------------------------------------ converting
def to_ours(kind: str, tensor: np.ndarray) -> np.ndarray:
  """One PyTorch tensor in our layout (see param_map's table)."""
  t = np.asarray(tensor, np.float32)
  if kind == "conv":
    return t.transpose(2, 3, 1, 0)
  if kind == "linear":
    return t.T
  if kind == "rho":
    return t.reshape(t.shape[-2], 2)
  if kind == "affine":
    return t.reshape(-1)
  return t


def _torch_shape(kind: str, ours: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape whose conversion has our shape `ours`."""
  if kind == "conv":
    kh, kw, i, o = ours
    return (o, i, kh, kw)
  if kind == "linear":
    return tuple(reversed(ours))
  if kind == "rho":
    return (1, *ours)
  if kind == "affine":
    return (1, ours[0], 1, 1)
  return tuple(ours)


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get_path(tree, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def key_map(name: str, model: dict) -> dict:
  return discriminator_key_map(model["n_dis"]) if name.startswith("dis") else generator_key_map(model["n_res"])


def convert_network(state_dict: dict, table: dict, template: dict) -> tuple[dict, list[str]]:
  """({"params": ..., "spectral": ...} of one network, problems: missing / mis-shaped / unexpected keys)."""
  missing, misshaped, out = [], [], {}
  for key, (collection, path, kind) in table.items():
    if key not in state_dict:
      missing.append(key)
      continue
    want = _torch_shape(kind, tuple(_get_path(template[collection], path).shape))
    got = tuple(np.shape(state_dict[key]))
    if got != want:
      misshaped.append(f"{key} {got} (expected {want})")
      continue
    _set_path(out.setdefault(collection, {}), path, to_ours(kind, state_dict[key]))
  unexpected = sorted(set(state_dict) - set(table))
  problems = [f"missing: {', '.join(missing)}" if missing else "",
              f"mis-shaped: {'; '.join(misshaped)}" if misshaped else "",
              f"unexpected: {', '.join(unexpected)}" if unexpected else ""]
  return out, [p for p in problems if p]


def network_templates(models: models_lib.Models, img_size: int) -> dict:
  """Shapes of our variables per network, without computing anything."""
  gen, disc, spectral = jax.eval_shape(
      lambda: train_state_lib.init_network_variables(models, img_size, jax.random.PRNGKey(0)))
  return {"gen2A": {"params": gen["gen2A"]}, "gen2B": {"params": gen["gen2B"]},
          "disA": {"params": disc["disA"], "spectral": spectral["disA"]},
          "disB": {"params": disc["disB"], "spectral": spectral["disB"]}}


def convert_networks(ckpt: dict, model: dict, models: models_lib.Models) -> dict:
  """name -> {"params", "spectral"?} for the four networks, in our layout."""
  templates = network_templates(models, model["img_size"])
  converted, problems = {}, []
  for name in NETWORKS:
    converted[name], bad = convert_network(ckpt[name], key_map(name, model), templates[name])
    problems += [f"{name} {line}" for line in bad]
  if problems:
    raise ConversionError(f"the checkpoint does not fit the model inferred from it ({describe(model)}):\n  "
                          + "\n  ".join(problems))
  return converted


def parameter_keys(state_dict: dict) -> list[str]:
  """The keys of `parameters()`, in order: the state_dict's order without the buffers."""
  return [k for k in state_dict if k.rsplit(".", 1)[-1] not in BUFFERS]


def convert_optimizer(opt_state_dict: dict, ckpt: dict, owners: tuple[str, str], model: dict,
                      params_template: dict) -> tuple[dict, dict, int]:
  """(mu, nu, count) of one original Adam optimiser, mu/nu shaped like our {owner: params}."""
  order = [(name, key) for name in owners for key in parameter_keys(ckpt[name])]
  what = f"the optimiser of {' + '.join(owners)}"
  state = opt_state_dict.get("state", {}) if isinstance(opt_state_dict, dict) else None
  groups = opt_state_dict.get("param_groups", []) if isinstance(opt_state_dict, dict) else None
  if not isinstance(state, dict) or not isinstance(groups, list) or not all(
      isinstance(g, dict) and isinstance(g.get("params", []), list) for g in groups):
    raise ConversionError(f"{what} is not a torch optimiser state_dict (state, param_groups)")
  indices = [i for g in groups for i in g.get("params", [])]
  if len(indices) != len(order):
    raise ConversionError(f"the optimiser of {' + '.join(owners)} holds {len(indices)} parameters; the "
                          f"networks have {len(order)}")
  mu = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), params_template)
  nu = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), params_template)
  count, bad = 0, []
  for index, (name, key) in zip(indices, order):
    entry = state.get(index) if _is_index(index) else None
    if entry is None:  # a parameter that never had a gradient: zero moments, as torch would start
      continue
    if not isinstance(entry, dict) or not all(isinstance(entry.get(f), np.ndarray)
                                              for f in ("exp_avg", "exp_avg_sq")):
      raise ConversionError(f"{what}: the state of {name}.{key} lacks the exp_avg and exp_avg_sq tensors")
    _, path, kind = key_map(name, model)[key]
    for moments, field in ((mu, "exp_avg"), (nu, "exp_avg_sq")):
      value = np.asarray(entry[field])
      if value.shape != np.shape(ckpt[name][key]):
        bad.append(f"{name}.{key} {field} {value.shape}")
        continue
      _set_path(moments[name], path, to_ours(kind, value))
    count = max(count, step_number(entry.get("step"), f"{what}: the step of {name}.{key}"))
  if bad:
    raise ConversionError(f"optimiser state does not match the parameters: {'; '.join(bad)}")
  return mu, nu, count


MAX_STEP = 2**31 - 1  # steps are int32


def _is_index(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def step_number(value, what: str) -> int:
  """A training step stored as a number or a one-element tensor, as an int in [0, 2^31)."""
  array = np.asarray(value) if isinstance(value, (int, float, np.ndarray, np.generic)) else None
  if array is None or array.size != 1 or array.dtype.kind not in "iuf" or not np.isfinite(array).all():
    raise ConversionError(f"{what} is {repr(value)[:60]}, not a step number")
  step = float(array.reshape(()))
  if step != int(step) or not 0 <= step <= MAX_STEP:
    raise ConversionError(f"{what} is {step}, not a step number in [0, {MAX_STEP}]")
  return int(step)


def _as_jax(tree):
  return jax.tree.map(jnp.asarray, tree)


def _with_adam(opt_state, mu, nu, count: int):
  """Our optimiser state (add_decayed_weights, scale_by_adam, schedule) with the given moments/count."""
  opt_state = optax.tree_utils.tree_set(opt_state, count=jnp.asarray(count, jnp.int32))
  return optax.tree_utils.tree_set(opt_state, mu=_as_jax(mu), nu=_as_jax(nu))


def build_train_state(ckpt: dict, config, models: models_lib.Models, *,
                      with_optimizer: bool = True) -> train_state_lib.TrainState:
  """A TrainState holding the checkpoint's weights (and, if asked and present, Adam states and step)."""
  model = {k: config.model[k] for k in ("ch", "n_res", "n_dis", "light", "img_size")}
  nets = convert_networks(ckpt, model, models)
  gen_params = {name: nets[name]["params"] for name in ("gen2A", "gen2B")}
  disc_params = {name: nets[name]["params"] for name in ("disA", "disB")}
  spectral = {name: nets[name]["spectral"] for name in ("disA", "disB")}
  g_tx, d_tx = train_state_lib.optimizers(config)
  g_opt, d_opt = g_tx.init(_as_jax(gen_params)), d_tx.init(_as_jax(disc_params))
  step = 0
  if with_optimizer and "G_optimizer" in ckpt and "D_optimizer" in ckpt:
    g_mu, g_nu, g_count = convert_optimizer(ckpt["G_optimizer"], ckpt, ("gen2B", "gen2A"), model,
                                            gen_params)
    d_mu, d_nu, d_count = convert_optimizer(ckpt["D_optimizer"], ckpt, ("disA", "disB"), model,
                                            disc_params)
    g_opt, d_opt = _with_adam(g_opt, g_mu, g_nu, g_count), _with_adam(d_opt, d_mu, d_nu, d_count)
    step = step_number(ckpt.get("start_iter", g_count), "start_iter")
  return train_state_lib.TrainState(
      step=jnp.asarray(step, jnp.int32), gen_params=_as_jax(gen_params), disc_params=_as_jax(disc_params),
      spectral=_as_jax(spectral), g_opt_state=g_opt, d_opt_state=d_opt)


def import_config(ckpt: dict, base_config: ml_collections.ConfigDict | None = None):
  """The base config (default: configs/default.py's values) with the model read from the weights."""
  config = config_lib.with_defaults(base_config if base_config is not None else {})
  model = infer_model(ckpt, img_size=config.model.img_size)
  for key, value in model.items():
    config.model[key] = value
  return config


def load_torch_checkpoint(torch_file: str | pathlib.Path, base_config: ml_collections.ConfigDict | None = None,
                          *, with_optimizer: bool = True) -> tuple[train_state_lib.TrainState,
                                                                    ml_collections.ConfigDict]:
  """(TrainState, config) of an original checkpoint file, without writing anything.

  Every way the file can fail to be such a checkpoint raises ConversionError, whatever its bytes.
  """
  ckpt = read_checkpoint(torch_file)
  config = import_config(ckpt, base_config)
  try:
    config_lib.validate_model(config.model)
  except config_lib.ConfigError as e:
    raise ConversionError(f"{torch_file}: the model read from its shapes cannot work: {e}") from None
  try:
    state = build_train_state(ckpt, config, models_lib.create_models(config.model),
                              with_optimizer=with_optimizer)
  except ConversionError:
    raise
  except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError,
          OverflowError) as e:  # a structure the checks above did not foresee: still the file's fault
    raise ConversionError(f"{torch_file} does not hold a NICE-GAN checkpoint this importer understands "
                          f"({type(e).__name__}: {str(e)[:200]})") from None
  if int(state.step) >= config.train.num_steps:
    config.train.num_steps = int(state.step)  # nothing left to train, but a valid config
  return state, config


def import_checkpoint(torch_file: str | pathlib.Path, workdir: str | pathlib.Path,
                      base_config: ml_collections.ConfigDict | None = None, *, with_optimizer: bool = True,
                      progress: bool = False) -> tuple[int, ml_collections.ConfigDict]:
  """Converts `torch_file` into <workdir>/checkpoints/<step>/; returns (step, config).

  The workdir must not hold checkpoints yet (nothing is overwritten), and nothing is written unless
  the whole file converts. The written checkpoint is an ordinary one: translate, evaluate and training
  resume accept it.
  """
  workdir = pathlib.Path(workdir).expanduser()
  ckpt_dir = workdir / "checkpoints"
  if checkpoints.list_steps(ckpt_dir):
    raise ConversionError(f"{ckpt_dir} already holds checkpoints; import into a new --workdir")
  with tqdm(total=2, desc="import_torch", unit="stage", disable=not progress) as bar:
    bar.set_postfix_str("reading and converting")
    state, config = load_torch_checkpoint(torch_file, base_config, with_optimizer=with_optimizer)
    bar.update()
    bar.set_postfix_str("writing the checkpoint")
    workdir.mkdir(parents=True, exist_ok=True)
    writer = checkpoints.Checkpointer(ckpt_dir, async_save=False)
    try:
      writer.save(int(state.step), state, config.to_dict(), metadata={"imported_from": str(torch_file)})
    finally:
      writer.close()
    bar.update()
  return int(state.step), config


def describe(model: dict) -> str:
  return (f"{'light' if model['light'] else 'full'}, ch {model['ch']}, n_res {model['n_res']}, "
          f"n_dis {model['n_dis']}, img_size {model['img_size']}")

