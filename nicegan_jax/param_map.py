"""The map from the original PyTorch state_dict keys to our parameter paths.

Owns: `discriminator_key_map` and `generator_key_map`, which list, for one network, every tensor of the
original's state_dict (`Discriminator` and `ResnetGenerator` modules) with our (collection, path) and the layout change:

| kind       | PyTorch                         | ours                                  |
|------------|---------------------------------|---------------------------------------|
| conv       | weight / weight_orig (O,I,kh,kw)| params/<module>/kernel (kh,kw,I,O)    |
| linear     | weight / weight_orig (O,I)      | params/<module>/kernel (I,O)          |
| vector     | bias (O,), lamda (1,)           | params/<module>/bias, params/lamda    |
| rho        | rho (1,C,2)                     | params/<module>/rho (C,2)             |
| affine     | ILN gamma / beta (1,C,1,1)      | params/<module>/gamma, beta (C,)      |
| spectral   | weight_u (O,), weight_v (I*k*k,)| spectral/<module>/u, v (same layout)  |

Module names are the PyTorch module paths with '.' replaced by '_' (`Dis1_0.4` -> `Dis1_0_4`,
`UpBlock2.12` -> `UpBlock2_12`, `UpBlock1_3.norm2` -> `UpBlock1_3/norm2`). The full generator's `FC.0`
ports without permutation because our generator flattens its features in PyTorch's (C, H, W) order.
Profiler entries (`*.total_ops`, `*.total_params`) and spectral-norm's derived `weight` are not
parameters and have no entry.
"""

from __future__ import annotations

Entry = tuple[str, tuple[str, ...], str]  # (collection, path inside it, kind)


def _sn_layer(table: dict, torch_prefix: str, module: str, bias: bool, kind: str = "conv") -> None:
  table[f"{torch_prefix}.weight_orig"] = ("params", (module, "kernel"), kind)
  table[f"{torch_prefix}.weight_u"] = ("spectral", (module, "u"), "spectral")
  table[f"{torch_prefix}.weight_v"] = ("spectral", (module, "v"), "spectral")
  if bias:
    table[f"{torch_prefix}.bias"] = ("params", (module, "bias"), "vector")


def discriminator_key_map(n_dis: int = 7) -> dict[str, Entry]:
  """Every state_dict key of one original `Discriminator(n_layers=n_dis)`."""
  table: dict[str, Entry] = {"lamda": ("params", ("lamda",), "vector")}
  _sn_layer(table, "fc", "fc", bias=False, kind="linear")
  table["conv1x1.weight"] = ("params", ("conv1x1", "kernel"), "conv")
  table["conv1x1.bias"] = ("params", ("conv1x1", "bias"), "vector")
  for torch_prefix in ("model.1", "model.4", "Dis0_1.1", "Dis1_1.1"):
    _sn_layer(table, torch_prefix, torch_prefix.replace(".", "_"), bias=True)
  for i in range(2, n_dis - 4):
    idx = 3 * (i - 2) + 1
    _sn_layer(table, f"Dis0_0.{idx}", f"Dis0_0_{idx}", bias=True)
  for i in range(n_dis - 4, n_dis - 2):
    idx = 3 * (i - n_dis + 4) + 1
    _sn_layer(table, f"Dis1_0.{idx}", f"Dis1_0_{idx}", bias=True)
  _sn_layer(table, "conv0", "conv0", bias=False)
  _sn_layer(table, "conv1", "conv1", bias=False)
  return table


def _iln(table: dict, torch_prefix: str, module: str) -> None:
  table[f"{torch_prefix}.rho"] = ("params", (module, "rho"), "rho")
  table[f"{torch_prefix}.gamma"] = ("params", (module, "gamma"), "affine")
  table[f"{torch_prefix}.beta"] = ("params", (module, "beta"), "affine")


def generator_key_map(n_res: int = 6) -> dict[str, Entry]:
  """Every state_dict key of one original `ResnetGenerator(n_blocks=n_res)` (light or full)."""
  table: dict[str, Entry] = {}
  table["UpBlock0.1.weight"] = ("params", ("UpBlock0_1", "kernel"), "conv")
  table["UpBlock0.1.bias"] = ("params", ("UpBlock0_1", "bias"), "vector")
  _iln(table, "UpBlock0.2", "UpBlock0_2")
  for name in ("FC.0", "FC.2", "gamma", "beta"):
    table[f"{name}.weight"] = ("params", (name.replace(".", "_"), "kernel"), "linear")
  for k in range(1, n_res + 1):
    for j in (1, 2):
      table[f"UpBlock1_{k}.conv{j}.weight"] = ("params", (f"UpBlock1_{k}", f"conv{j}", "kernel"), "conv")
      table[f"UpBlock1_{k}.norm{j}.rho"] = ("params", (f"UpBlock1_{k}", f"norm{j}", "rho"), "rho")
  for base in (0, 8):
    table[f"UpBlock2.{base + 1}.weight"] = ("params", (f"UpBlock2_{base + 1}", "kernel"), "conv")
    _iln(table, f"UpBlock2.{base + 2}", f"UpBlock2_{base + 2}")
    table[f"UpBlock2.{base + 4}.weight"] = ("params", (f"UpBlock2_{base + 4}", "kernel"), "conv")
    table[f"UpBlock2.{base + 4}.bias"] = ("params", (f"UpBlock2_{base + 4}", "bias"), "vector")
    _iln(table, f"UpBlock2.{base + 6}", f"UpBlock2_{base + 6}")
  table["UpBlock2.17.weight"] = ("params", ("UpBlock2_17", "kernel"), "conv")
  return table
