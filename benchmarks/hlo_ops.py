"""Counting the operations a compiled XLA program runs one by one, from its optimised HLO text.

Owns `launched_ops(hlo_text)`: the instructions of the entry computation, and of the loop bodies and
branches it runs, by opcode — each fusion counted once, whatever it fuses; parameters, constants, tuples
and bitcasts (no work of their own) left out. On a GPU each of them is about one kernel launch, so the
total says how much of a small step's time can be launch overhead (a few microseconds each); a loop
body is counted once, like XLA's cost analysis counts it.
"""

from __future__ import annotations

import collections
import re

NO_WORK = frozenset({"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
                     "partition-id", "replica-id", "opt-barrier"})
CONTROL_FLOW = frozenset({"while", "conditional", "call"})
_CALLED = re.compile(r"\b(?:body|condition|branch_computations|true_computation|false_computation|to_apply)"
                     r"=\{?(%[\w.\-]+(?:,\s*%[\w.\-]+)*)\}?")
_OPCODE = re.compile(r"\s*([\w-]+)\(")


def computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
  """{computation name: its instruction lines} and the entry computation's name."""
  bodies, name, entry = {}, None, None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      head = line.split("(", 1)[0].split()
      name = head[-1].lstrip("%")
      entry = name if head[0] == "ENTRY" else entry
      bodies[name] = []
    elif line.strip() == "}":
      name = None
    elif name is not None and " = " in line:
      bodies[name].append(line.strip())
  return bodies, entry


def opcode(instruction: str) -> str | None:
  """`%x = f32[2]{0} add(%a, %b), ...` -> "add"; tuple-shaped results `(f32[], s32[]) while(...)` too."""
  rest = instruction.split(" = ", 1)[1]
  if rest.startswith("("):  # a tuple shape: skip to its closing parenthesis
    depth = 0
    for i, c in enumerate(rest):
      depth += (c == "(") - (c == ")")
      if depth == 0:
        rest = rest[i + 1:]
        break
  else:
    rest = rest.split(" ", 1)[1] if " " in rest else ""
  match = _OPCODE.match(rest)
  return match.group(1) if match else None


def launched_ops(hlo_text: str) -> collections.Counter:
  """Opcode -> count of the operations the program runs one by one (see the module docstring)."""
  bodies, entry = computations(hlo_text)
  counts, todo, seen = collections.Counter(), [entry], set()
  while todo:
    name = todo.pop()
    if name in seen or name not in bodies:
      continue
    seen.add(name)
    for instruction in bodies[name]:
      op = opcode(instruction)
      if op is None or op in NO_WORK:
        continue
      counts[op] += 1
      if op in CONTROL_FLOW:
        for match in _CALLED.finditer(instruction):
          todo += [called.strip().lstrip("%") for called in match.group(1).split(",")]
  return counts


def summary(hlo_text: str, top: int = 6) -> dict:
  """{"total": all launched operations, "by_opcode": the `top` most frequent}, for a JSON line."""
  counts = launched_ops(hlo_text)
  return {"total": sum(counts.values()), "by_opcode": dict(counts.most_common(top))}
