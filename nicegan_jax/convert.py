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

from nicegan_jax import checkpoints, torch_pickle
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
  """The checkpoint dict with numpy tensors; profiler entries removed from the four state_dicts."""
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise ConversionError(f"no such file {path}")
  try:
    ckpt = torch_pickle.load(path.read_bytes())
  except torch_pickle.TorchFileError as e:
    raise ConversionError(f"{path} is not a readable PyTorch file: {e}") from None
  if not isinstance(ckpt, dict):
    raise ConversionError(f"{path} holds a {type(ckpt).__name__}, not the original's checkpoint dict")
  missing = [k for k in NETWORKS if not isinstance(ckpt.get(k), dict)]
  if missing:
    raise ConversionError(f"{path} is not an original NICE-GAN checkpoint: missing {', '.join(missing)} "
                          f"(found keys: {', '.join(map(str, ckpt)) or 'none'})")
  for name in NETWORKS:
    ckpt[name] = {k: v for k, v in ckpt[name].items() if k.rsplit(".", 1)[-1] not in PROFILER_ENTRIES}
  return ckpt


def _shape(state_dict: dict, key: str, network: str) -> tuple[int, ...]:
  if key not in state_dict:
    raise ConversionError(f"{network}: missing {key}; cannot infer the model")
  return tuple(np.shape(state_dict[key]))


def infer_model(ckpt: dict, img_size: int = 256) -> dict:
  """{ch, n_res, n_dis, light, img_size} from the tensor shapes (`img_size` used for light models)."""
  dis, gen = ckpt["disA"], ckpt["gen2B"]
  ch = _shape(dis, "model.1.weight_orig", "disA")[0]
  n_dis = 6 + sum(1 for k in dis if k.startswith("Dis0_0.") and k.endswith(".weight_orig"))
  n_res = sum(1 for k in gen if k.startswith("UpBlock1_") and k.endswith(".conv1.weight"))
  fc_out, fc_in = _shape(gen, "FC.0.weight", "gen2B")
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
  state = opt_state_dict.get("state", {})
  groups = opt_state_dict.get("param_groups", [])
  indices = [i for g in groups for i in g.get("params", [])]
  if len(indices) != len(order):
    raise ConversionError(f"the optimiser of {' + '.join(owners)} holds {len(indices)} parameters; the "
                          f"networks have {len(order)}")
  mu = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), params_template)
  nu = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), params_template)
  count, bad = 0, []
  for index, (name, key) in zip(indices, order):
    entry = state.get(index)
    if entry is None:  # a parameter that never had a gradient: zero moments, as torch would start
      continue
    _, path, kind = key_map(name, model)[key]
    for moments, field in ((mu, "exp_avg"), (nu, "exp_avg_sq")):
      value = np.asarray(entry[field])
      if value.shape != np.shape(ckpt[name][key]):
        bad.append(f"{name}.{key} {field} {value.shape}")
        continue
      _set_path(moments[name], path, to_ours(kind, value))
    count = max(count, int(np.asarray(entry["step"])))
  if bad:
    raise ConversionError(f"optimiser state does not match the parameters: {'; '.join(bad)}")
  return mu, nu, count


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
    step = int(ckpt.get("start_iter", g_count))
  rng = jax.random.split(jax.random.PRNGKey(config.train.seed))[1]  # as create_train_state
  return train_state_lib.TrainState(
      step=jnp.asarray(step, jnp.int32), gen_params=_as_jax(gen_params), disc_params=_as_jax(disc_params),
      spectral=_as_jax(spectral), g_opt_state=g_opt, d_opt_state=d_opt, rng=rng)


def import_config(ckpt: dict, base_config: ml_collections.ConfigDict | None = None):
  """The base config (default: configs/default.py's values) with the model read from the weights."""
  config = ml_collections.ConfigDict(base_config.to_dict()) if base_config is not None else None
  if config is None:
    from configs import default  # the repository's defaults: the original's hyper-parameters
    config = default.get_config()
  model = infer_model(ckpt, img_size=config.model.img_size)
  for key, value in model.items():
    config.model[key] = value
  return config


def import_checkpoint(torch_file: str | pathlib.Path, workdir: str | pathlib.Path,
                      base_config: ml_collections.ConfigDict | None = None, *,
                      with_optimizer: bool = True) -> tuple[int, ml_collections.ConfigDict]:
  """Converts `torch_file` into <workdir>/checkpoints/<step>/; returns (step, config).

  The workdir must not hold checkpoints yet (nothing is overwritten). The written checkpoint is an
  ordinary one: translate, evaluate and training resume accept it.
  """
  ckpt = read_checkpoint(torch_file)
  config = import_config(ckpt, base_config)
  try:
    models_lib.discriminator_feature_sizes(config.model.img_size, config.model.n_dis)
  except ValueError as e:
    raise ConversionError(f"model.img_size={config.model.img_size}: {e}") from None
  workdir = pathlib.Path(workdir).expanduser()
  ckpt_dir = workdir / "checkpoints"
  if ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
    raise ConversionError(f"{ckpt_dir} already holds checkpoints; import into a new --workdir")
  models = models_lib.create_models(config.model)
  state = build_train_state(ckpt, config, models, with_optimizer=with_optimizer)
  if int(state.step) >= config.train.num_steps:
    config.train.num_steps = int(state.step)  # nothing left to train, but a valid config
  workdir.mkdir(parents=True, exist_ok=True)
  writer = checkpoints.Checkpointer(ckpt_dir, async_save=False)
  try:
    writer.save(int(state.step), state, config.to_dict(), metadata={"imported_from": str(torch_file)})
  finally:
    writer.close()
  return int(state.step), config


def describe(model: dict) -> str:
  return (f"{'light' if model['light'] else 'full'}, ch {model['ch']}, n_res {model['n_res']}, "
          f"n_dis {model['n_dis']}, img_size {model['img_size']}")

