"""The markdown table of the speed benchmark's JSON lines (`python -m benchmarks.speed --table FILE`).

Owns `markdown_table(rows)`: one row per JSON line of `benchmarks/speed.py --json`, its columns and how
each cell is written (three significant digits, ms or s, GiB, the options that differ from the defaults).
"""

from __future__ import annotations

from typing import Callable


def _options(r: dict) -> str:
  """The row's settings that differ from the defaults, as words."""
  default_impl = "cpu" if r.get("backend") == "cpu" else "xla"
  options = [name for name, on in (
      ("remat", r["remat"]),
      (f"{r.get('conv_impl')} convolutions", r.get("conv_impl", default_impl) != default_impl),
      (f"without {', '.join(r.get('cpu_paths_off', []))}", bool(r.get("cpu_paths_off"))),
      (f"{r['steps_per_dispatch']} steps/dispatch", r["steps_per_dispatch"] > 1),
      (f"{r['devices']} devices", r.get("devices", 1) > 1)) if on]
  return ", ".join(options) or "-"


def _three_digits(x: float) -> str:
  """Three significant digits, trailing zeros kept (2.10, 0.0596, 51.3, 214)."""
  return f"{x:.0f}" if x >= 100 else f"{x:#.3g}"


def _versus_torch(r: dict) -> str:
  if "speedup_vs_torch" not in r:
    return ""
  ratio = r["speedup_vs_torch"]
  return f"**{ratio:.2f}x faster**" if ratio > 1 else f"{ratio:.2f}x (slower)"


def _translate_rates(r: dict) -> str:
  rates = r["translate_img_per_s"]
  return f"{rates['1']:.1f} / {rates['32']:.1f}"


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def _seconds(x: float) -> str:
  return f"{x:.2f} s" if x >= 1 else f"{x * 1e3:.1f} ms"


def _table_columns(rows: list[dict]) -> list[tuple[str, Callable[[dict], str]]]:
  """(header, cell) of every column of the table. A cell whose data a row lacks is blank; the columns
  marked with a key are left out unless some row has it."""
  def optional(key: str, cell: Callable[[dict], str]) -> Callable[[dict], str]:
    return lambda r: cell(r) if key in r else ""
  loop, plan = "loop_step_s", "step_buffer_bytes"
  columns = [  # (header, cell, key some row must have for the column to be shown, or None)
      ("device", lambda r: r["device"], None),
      ("model", lambda r: f"{'light' if r['light'] else 'full'} ch {r['ch']}", None),
      ("size", lambda r: str(r["img_size"]), None), ("batch", lambda r: str(r["batch"]), None),
      ("dtype", lambda r: r["dtype"], None), ("options", _options, None),
      ("train it/s", lambda r: _three_digits(r["train_iter_per_s"]), None),
      ("train img/s", lambda r: _three_digits(r["train_img_per_s"]), None),
      ("step (median)", lambda r: _seconds(r["step_s_median"]), None),
      ("step, back to back", lambda r: _seconds(r["step_s_pipelined"]), loop),
      ("training loop step (prefetch)",
       optional(loop, lambda r: f"{_seconds(r['loop_step_s'])} ({r['prefetch']})"), loop),
      ("compile", lambda r: f"{r['compile_s']:.0f} s", None),
      ("peak memory", lambda r: f"{r['peak_mem_bytes'] / 2**30:.1f} GiB ({r['peak_mem_kind']})", None),
      ("XLA's step buffers (temporaries)",
       optional(plan, lambda r: f"{_gib(r['step_buffer_bytes'])} ({_gib(r['step_temp_bytes'])})"), plan),
      ("translate img/s (1 / 32)", optional("translate_img_per_s", _translate_rates), None),
      ("% of chip peak", optional("peak_fraction", lambda r: f"{100 * r['peak_fraction']:.1f}%"), None),
      ("eager PyTorch step", optional("torch_step_s_median", lambda r: _seconds(r["torch_step_s_median"])),
       None),
      ("vs eager PyTorch", _versus_torch, None),
  ]
  return [(header, cell) for header, cell, shown_if in columns
          if shown_if is None or any(shown_if in r for r in rows)]


def markdown_table(rows: list[dict]) -> str:
  """docs/speed.md's table from JSON lines of this command: the training-loop columns only when a row has
  `--loop`, XLA's memory plan only when a row has it."""
  columns = _table_columns(rows)
  lines = ["| " + " | ".join(header for header, _ in columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
  return "\n".join(lines)
