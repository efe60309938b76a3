"""Hand-made torch files, byte by byte, for the importer's hostile-input tests (no torch needed).

`tensor(...)` is the pickle of one `torch._utils._rebuild_tensor_v2` call with any storage reference,
offset, sizes and strides, including ones torch never writes; `pickled_dict` a dict of such entries;
`zip_archive` and `legacy_file` wrap a pickle and raw storages in either file format, as `torch.save`
lays them out.
"""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def pickle_int(value: int) -> bytes:
  if 0 <= value < 256:
    return b"K" + bytes([value])
  if -2**31 <= value < 2**31:
    return b"J" + struct.pack("<i", value)
  raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
  return b"\x8a" + bytes([len(raw)]) + raw


def pickle_str(text: str) -> bytes:
  raw = text.encode()
  return b"X" + struct.pack("<I", len(raw)) + raw


def pickle_tuple(*items: bytes) -> bytes:
  return b"(" + b"".join(items) + b"t"


def pickle_global(module: str, name: str) -> bytes:
  return b"c" + f"{module}\n{name}\n".encode()


def tensor(key: str, offset: int, size, stride, storage_type: str = "FloatStorage", numel: int = 0) -> bytes:
  """The pickle opcodes that rebuild one tensor viewing storage `key`."""
  storage = pickle_tuple(pickle_str("storage"), pickle_global("torch", storage_type), pickle_str(key),
                         pickle_str("cpu"), pickle_int(numel)) + b"Q"  # BINPERSID
  args = pickle_tuple(storage, pickle_int(offset), pickle_tuple(*map(pickle_int, size)),
                      pickle_tuple(*map(pickle_int, stride)), b"\x89",  # requires_grad False
                      pickle_global("collections", "OrderedDict") + b")R")
  return pickle_global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def pickled_dict(entries: dict[str, bytes]) -> bytes:
  """A protocol-2 pickle of {name: entry} (entries are pickle opcodes, e.g. from `tensor`)."""
  return b"\x80\x02}(" + b"".join(pickle_str(k) + v for k, v in entries.items()) + b"u."


def nested_lists(depth: int) -> bytes:
  """A pickle of a list inside a list ... `depth` deep."""
  return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def zip_archive(pickled: bytes, storages: dict[str, bytes], *, compress: int = zipfile.ZIP_STORED) -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as archive:
    archive.writestr("archive/data.pkl", pickled)
    archive.writestr("archive/byteorder", "little")
    for key, raw in storages.items():
      archive.writestr(zipfile.ZipInfo(f"archive/data/{key}"), raw, compress_type=compress)
  return buf.getvalue()


def legacy_file(pickled: bytes, storages: dict[str, bytes], counts: dict[str, int] | None = None,
                itemsize: int = 4) -> bytes:
  """The legacy format: magic, protocol, sys info, the object, the keys, then each storage as an
  int64 element count (default: its real one) and its bytes."""
  counts = counts or {}
  head = b"".join([b"\x80\x02" + pickle_int(LEGACY_MAGIC) + b".", b"\x80\x02" + pickle_int(1001) + b".",
                   b"\x80\x02}" + pickle_str("little_endian") + b"\x88s.",
                   pickled, b"\x80\x02" + b"]" + b"(" + b"".join(map(pickle_str, storages)) + b"e."])
  body = b"".join(struct.pack("<q", counts.get(k, len(raw) // itemsize)) + raw for k, raw in storages.items())
  return head + body


def floats(n: int, start: float = 0.0) -> bytes:
  return (np.arange(n, dtype=np.float32) + start).tobytes()
