"""The torch importer against files from strangers: a hand-made file for each known attack, and a fuzz
test that mutates real torch files of a tiny model and checks that every mutant is either imported
exactly as torch reads it or refused with ConversionError: never a crash, another exception, or memory
beyond the reader's budget.
"""

import collections
import io
import os
import pickletools
import struct
import subprocess
import sys
import tracemalloc
import zipfile

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from conftest import ROOT
from hostile_torch import (floats, legacy_file, nested_lists, pickle_global, pickle_int, pickle_tuple,
                           pickled_dict, tensor, zip_archive)
from nicegan_jax import convert, torch_pickle

ONE_FLOAT_VIEWS = {  # (offset, size, stride) over a storage of 16 floats
    "negative stride": (15, (16,), (-1,)),
    "negative stride past the start (heap bytes)": (15, (4096,), (-1,)),
    "negative offset": (-8, (4,), (1,)),
    "negative offset of a scalar": (-1, (), ()),
    "past the end": (10, (8,), (1,)),
    "negative size": (0, (-4,), (1,)),
}


def reader_peak(data: bytes, **kwargs):
  """(the object or the TorchFileError, the reader's peak of traced Python and numpy memory)."""
  tracemalloc.start()
  try:
    result = torch_pickle.load(data, **kwargs)
  except torch_pickle.TorchFileError as e:
    result = e
  finally:
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
  return result, peak


# ------------------------------------------------------------------------- the hand-made corpus
def test_a_well_formed_hand_made_file_reads_in_both_formats():
  views = {"w": tensor("0", 0, (4, 4), (1, 4)), "s": tensor("1", 2, (), (), storage_type="LongStorage")}
  storages = {"0": floats(16), "1": np.arange(4, dtype=np.int64).tobytes()}
  for data in (zip_archive(pickled_dict(views), storages),):
    out = torch_pickle.load(data)
    np.testing.assert_array_equal(out["w"], np.arange(16, dtype=np.float32).reshape(4, 4).T)
    assert out["s"] == 2
  out = torch_pickle.load(legacy_file(pickled_dict({"w": tensor("0", 1, (3,), (2,))}), {"0": floats(8)}))
  np.testing.assert_array_equal(out["w"], [1, 3, 5])


@pytest.mark.parametrize("name", list(ONE_FLOAT_VIEWS))
@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_a_view_outside_its_storage_is_refused_before_it_is_read(name, fmt):
  offset, size, stride = ONE_FLOAT_VIEWS[name]
  pickled = pickled_dict({"w": tensor("0", offset, size, stride)})
  data = zip_archive(pickled, {"0": floats(16)}) if fmt == "zip" else legacy_file(pickled, {"0": floats(16)})
  with pytest.raises(torch_pickle.TorchFileError, match="negative|past the end"):
    torch_pickle.load(data)


@pytest.mark.parametrize("shape", [(16384, 16384), (100000, 100000)])
def test_a_stride_zero_view_of_one_number_allocates_nothing(shape):
  data = zip_archive(pickled_dict({"w": tensor("0", 0, shape, (0, 0))}), {"0": floats(1)})
  assert len(data) < 600
  error, peak = reader_peak(data)
  assert isinstance(error, torch_pickle.TorchFileError) and "more elements" in str(error)
  assert peak < 1 << 20


def test_a_compressed_member_is_charged_at_its_declared_size_before_it_is_expanded():
  expanded = 64 << 20
  data = zip_archive(pickled_dict({"w": tensor("0", 0, (16,), (1,))}), {"0": bytes(expanded)},
                     compress=zipfile.ZIP_DEFLATED)
  assert len(data) < expanded // 500
  error, peak = reader_peak(data)
  assert isinstance(error, torch_pickle.TorchFileError) and "over its budget" in str(error)
  assert peak < 1 << 20
  # The same member within the budget reads (torch.save never compresses, but a zip tool may have).
  small = zip_archive(pickled_dict({"w": tensor("0", 0, (16,), (1,))}), {"0": floats(16)},
                      compress=zipfile.ZIP_DEFLATED)
  np.testing.assert_array_equal(torch_pickle.load(small)["w"], np.arange(16))


def test_one_budget_covers_every_tensor_of_the_file():
  """Many views of one storage: each is allowed, together they exceed the file's budget."""
  views = {f"w{i}": tensor("0", i, (1000,), (1,)) for i in range(8)}
  data = zip_archive(pickled_dict(views), {"0": floats(1008)})
  assert len(torch_pickle.load(data)) == 8
  with pytest.raises(torch_pickle.TorchFileError, match="over its budget"):
    torch_pickle.load(data, max_bytes=len(data) + 4 * 1008 + 4 * 4000)


def test_deep_nesting_and_a_huge_pickle_are_refused_in_one_line():
  error, peak = reader_peak(zip_archive(nested_lists(100_000), {}))
  assert isinstance(error, torch_pickle.TorchFileError) and "nest more than" in str(error)
  assert "\n" not in str(error) and peak < 32 << 20
  huge = b"\x80\x02" + b"N" * (torch_pickle.MAX_PICKLE_BYTES + 1) + b"."
  for data in (zip_archive(huge, {}), legacy_file(huge, {})):
    with pytest.raises(torch_pickle.TorchFileError, match="pickled part of the file is larger"):
      torch_pickle.load(data)


@pytest.mark.parametrize("count", [-5, 2**60, 1000])
def test_a_legacy_storage_count_beyond_the_file_is_refused(count):
  data = legacy_file(pickled_dict({"w": tensor("0", 0, (4,), (1,))}), {"0": floats(4)}, counts={"0": count})
  with pytest.raises(torch_pickle.TorchFileError, match="file ends before them"):
    torch_pickle.load(data)


@pytest.mark.parametrize("pickled,message", [
    (b"\x80\x02" + pickle_global("torch", "FloatStorage") + pickle_tuple(pickle_int(5)) + b"R.",
     "calls torch.FloatStorage"),
    (b"\x80\x02" + tensor("0", 0, (4,), (1,)) + b"}" + b"\x8c\x06offset" + pickle_int(-9) + b"sb.",
     "sets the state of _Tensor"),
    (b"\x80\x02" + pickle_global("torch._utils", "_rebuild_tensor_v2")
     + pickle_tuple(pickle_tuple(pickle_int(1)), pickle_int(0), pickle_tuple(), pickle_tuple()) + b"R.",
     "not a storage of the file"),
    (b"\x80\x02" + pickle_global("os", "system") + pickle_tuple(b"X\x02\x00\x00\x00ls") + b"R.",
     "refusing to build os.system"),
], ids=["call a storage type", "replace a tensor's state", "a tensor of a non-storage", "os.system"])
def test_allowed_names_cannot_be_misused(pickled, message):
  with pytest.raises(torch_pickle.TorchFileError, match=message):
    torch_pickle.load(zip_archive(pickled, {"0": floats(4)}))


def test_main_refuses_a_hostile_file_in_one_line_and_writes_nothing(tmp_path):
  offset, size, stride = ONE_FLOAT_VIEWS["negative stride past the start (heap bytes)"]
  hostile = tmp_path / "hostile.pt"
  hostile.write_bytes(zip_archive(pickled_dict({"w": tensor("0", offset, size, stride)}), {"0": floats(16)}))
  result = subprocess.run([sys.executable, "main.py", "--mode=import_torch", f"--torch_checkpoint={hostile}",
                           f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 1, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: {hostile} is not a readable PyTorch file: a tensor view has a negative offset, size or "
      "stride (offset 15, size (4096,), stride (-1,)); torch never writes one")
  assert not (tmp_path / "run").exists()


# -------------------------------------------------------------------------------------- fuzzing

# Mutants per run; a longer hunt: NICEGAN_JAX_FUZZ_EXAMPLES=5000 python -m pytest tests/test_torch_pickle.py
FUZZ_EXAMPLES = int(os.environ.get("NICEGAN_JAX_FUZZ_EXAMPLES", "160"))
INTERESTING_INTS = (-2**63, -2**31, -1, 0, 1, 2, 3, 7, 255, 256, 4096, 16384, 2**31 - 1, 2**31, 2**62)


@pytest.fixture(scope="module")
def valid_files():
  """A tiny model's checkpoint after one training iteration (Adam moments filled), as the original
  saves it, in both formats; and the base config the import uses."""
  torch = pytest.importorskip("torch", reason="the fuzz test mutates files that torch.save writes")
  import torch_reference
  from configs import test as test_config
  torch.manual_seed(0)
  nice = torch_reference.NICE(ch=2, n_res=1, n_dis=6, img_size=64, light=True)
  nice.set_mode(True)
  nice.train_iteration(0, torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1)
  files = {}
  for fmt, zip_format in (("zip", True), ("legacy", False)):
    buf = io.BytesIO()
    torch.save(nice.checkpoint(1, profiler_entries=True), buf, _use_new_zipfile_serialization=zip_format)
    files[fmt] = buf.getvalue()
  base = test_config.get_config()
  base.train.batch_size = 1
  return files, base


def pickle_spans(pickled: bytes, start: int = 0) -> tuple[list[tuple[int, int, object, str]], int]:
  """(opcode name, begin, end, arg) of each opcode of the pickle at `start`, and where it ends."""
  stream = io.BytesIO(pickled)
  stream.seek(start)
  ops = list(pickletools.genops(stream))
  spans = [(pos, (ops[i + 1][2] if i + 1 < len(ops) else stream.tell()), arg, op.name)
           for i, (op, arg, pos) in enumerate(ops)]
  return spans, stream.tell()


def legacy_pickles(data: bytes) -> list[tuple[int, int]]:
  """(begin, end) of the five pickles of a legacy file: magic, protocol, sys info, object, keys."""
  bounds, end = [], 0
  for _ in range(5):
    begin = end
    _, end = pickle_spans(data, begin)
    bounds.append((begin, end))
  return bounds


def object_pickle(data: bytes, fmt: str) -> bytes:
  """The pickle that holds the checkpoint's object: data.pkl, or the legacy file's fourth."""
  if fmt == "zip":
    return next(raw for info, raw in zip_members(data) if info.filename.endswith("/data.pkl"))
  begin, end = legacy_pickles(data)[3]
  return data[begin:end]


def with_pickle(data: bytes, fmt: str, new_pickle: bytes) -> bytes:
  """The file with its object pickle replaced (zip: a new archive with the same members)."""
  if fmt == "legacy":
    begin, end = legacy_pickles(data)[3]
    return data[:begin] + new_pickle + data[end:]
  return rebuild_zip([(info, new_pickle if info.filename.endswith("/data.pkl") else raw)
                      for info, raw in zip_members(data)])


def zip_members(data: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
  archive = zipfile.ZipFile(io.BytesIO(data))
  return [(info, archive.read(info)) for info in archive.infolist()]


def rebuild_zip(members, compress: int = zipfile.ZIP_STORED) -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as archive:
    for info, raw in members:
      archive.writestr(zipfile.ZipInfo(info.filename), raw, compress_type=compress)
  return buf.getvalue()


def mutate(data: bytes, fmt: str, draw) -> tuple[str, bytes]:
  """One mutation of a valid file, drawn: (what was done, the mutant)."""
  kind = draw(st.sampled_from(["bytes", "int", "opcode", "truncate", "structure"]))
  if kind == "bytes":
    mutant = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
      mutant[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return kind, bytes(mutant)
  if kind == "truncate":
    return kind, data[:draw(st.integers(0, len(data) - 1))]
  pickled = object_pickle(data, fmt)
  spans, _ = pickle_spans(pickled)
  if kind == "int":  # offsets, sizes, strides, storage sizes, steps, indices
    ints = [(b, e) for b, e, arg, name in spans if name in ("BININT", "BININT1", "BININT2", "LONG1")]
    b, e = draw(st.sampled_from(ints))
    value = draw(st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(-2**64, 2**64)))
    return kind, with_pickle(data, fmt, pickled[:b] + pickle_int(value) + pickled[e:])
  if kind == "opcode":
    b, e, _, _ = draw(st.sampled_from(spans))
    action = draw(st.sampled_from(["delete", "duplicate", "replace"]))
    op = {"delete": b"", "duplicate": pickled[b:e] * 2,
          "replace": bytes([draw(st.integers(0, 255))]) + pickled[b + 1:e]}[action]
    return f"opcode {action}", with_pickle(data, fmt, pickled[:b] + op + pickled[e:])
  if fmt == "legacy":  # the int64 element count in front of the first storage
    first = legacy_pickles(data)[4][1]
    value = draw(st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(-2**63, 2**63 - 1)))
    return "legacy count", data[:first] + struct.pack("<q", value) + data[first + 8:]
  members = zip_members(data)
  storage = [i for i, (info, _) in enumerate(members) if "/data/" in info.filename]
  action = draw(st.sampled_from(["drop", "truncate", "swap", "deflate", "rename"]))
  i, j = draw(st.sampled_from(storage)), draw(st.sampled_from(storage))
  if action == "drop":
    members.pop(i)
  elif action == "truncate":
    members[i] = (members[i][0], members[i][1][:draw(st.integers(0, max(len(members[i][1]) - 1, 0)))])
  elif action == "swap":
    members[i], members[j] = (members[i][0], members[j][1]), (members[j][0], members[i][1])
  elif action == "rename":
    members[i][0].filename = members[i][0].filename + "x"
  return f"member {action}", rebuild_zip(members, zipfile.ZIP_DEFLATED if action == "deflate" else
                                         zipfile.ZIP_STORED)


def read_or_refuse(path, data: bytes):
  """(checkpoint dict or None when refused), checking the reader's memory against its budget."""
  tracemalloc.start()
  try:
    return convert.read_checkpoint(path)
  except convert.ConversionError:
    return None
  finally:
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak <= torch_pickle.budget_for(data), f"the reader took {peak} bytes of a {len(data)}-byte file"


def torch_networks(data: bytes) -> dict | None:
  """The four state_dicts as torch reads them (profiler entries dropped), or None where it refuses."""
  import torch
  try:
    ckpt = torch.load(io.BytesIO(data), weights_only=True)
    return {name: {k: v.numpy() for k, v in ckpt[name].items() if k.rsplit(".", 1)[-1]
                   not in convert.PROFILER_ENTRIES} for name in convert.NETWORKS}
  except Exception:  # noqa: BLE001 - torch refuses it in its own way
    return None


def test_every_mutant_of_a_real_file_is_imported_as_torch_reads_it_or_refused(valid_files, tmp_path):
  files, base = valid_files
  path = tmp_path / "mutant.pt"
  outcomes = collections.Counter()

  @hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                       suppress_health_check=list(hypothesis.HealthCheck))
  @hypothesis.given(st.data())
  def run(data):
    fmt = data.draw(st.sampled_from(["zip", "legacy"]))
    what, mutant = mutate(files[fmt], fmt, data.draw)
    path.write_bytes(mutant)
    ckpt = read_or_refuse(path, mutant)
    if ckpt is not None:
      try:
        convert.load_torch_checkpoint(path, base)
      except convert.ConversionError:
        ckpt = None
    outcomes[(what, "refused" if ckpt is None else "imported")] += 1
    if ckpt is None:
      return
    reference = torch_networks(mutant)
    if reference is None:
      return  # torch refuses what this reader takes (e.g. a file without .format_version)
    for name in convert.NETWORKS:
      assert sorted(ckpt[name]) == sorted(reference[name]), (what, name)
      for key, value in reference[name].items():
        np.testing.assert_array_equal(ckpt[name][key], value, err_msg=f"{what}: {name}.{key}")

  run()
  kinds = {what for what, _ in outcomes}
  assert {"bytes", "int", "truncate"} <= kinds and any(k.startswith("opcode") for k in kinds)
  assert any(k.startswith("member") for k in kinds) and "legacy count" in kinds
  assert sum(n for (_, result), n in outcomes.items() if result == "refused") > FUZZ_EXAMPLES // 4
  assert sum(n for (_, result), n in outcomes.items() if result == "imported") > 0


def test_the_unmutated_files_import(valid_files, tmp_path):
  files, base = valid_files
  for fmt, data in files.items():
    path = tmp_path / f"{fmt}.pt"
    path.write_bytes(data)
    state, config = convert.load_torch_checkpoint(path, base)
    assert int(state.step) == 1 and config.model.ch == 2 and config.model.n_res == 1
    reference = torch_networks(data)
    ckpt = read_or_refuse(path, data)
    for key, value in reference["gen2B"].items():
      np.testing.assert_array_equal(ckpt["gen2B"][key], value)
