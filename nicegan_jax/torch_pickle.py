"""Reading files written by `torch.save` (and TorchScript archives) without torch.

Owns: `load(data)`, which turns the bytes of a torch file into plain Python objects — dicts, lists,
numbers and numpy arrays for tensors — in both of PyTorch's serialisation formats:

* zip (PyTorch >= 1.6): `<name>/data.pkl` plus one raw file per storage under `<name>/data/`;
* legacy (older PyTorch, or `_use_new_zipfile_serialization=False`): a stream of pickles — magic
  number, protocol version, system info, the object, the storage keys — followed by every storage as
  an int64 element count and its raw bytes.

Only an allow-list of globals is ever constructed (tensors, storages, OrderedDict and, for TorchScript
archives, attribute bags standing in for modules); anything else raises `TorchFileError`, so a
malicious pickle cannot run code.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class TorchFileError(ValueError):
  """The bytes are not a torch file this reader understands, or hold objects it refuses to build."""


class _Storage:
  """A storage whose bytes may arrive after the pickle that references it (legacy format)."""

  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)
    self.array: np.ndarray | None = None


class _Tensor:
  """A tensor view of a storage, materialised once every storage is read."""

  def __init__(self, storage: _Storage, offset: int, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def materialize(self) -> np.ndarray:
    flat = self.storage.array
    if flat is None:
      raise TorchFileError("a tensor refers to a storage that the file does not contain")
    if not self.size:
      return flat[self.offset].copy()
    extent = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
    if any(n == 0 for n in self.size):
      return np.zeros(self.size, flat.dtype)
    if extent > len(flat):
      raise TorchFileError(f"a tensor of shape {self.size} reads past the end of its storage")
    item = flat.dtype.itemsize
    return np.lib.stride_tricks.as_strided(flat[self.offset:], self.size,
                                           tuple(s * item for s in self.stride)).copy()


class _AttributeBag(dict):
  """A TorchScript module or object: a dict of its attributes."""

  def __init__(self, *args):
    super().__init__()

  def __setstate__(self, state):
    self.update(state if isinstance(state, dict) else {"__state__": state})


def _rebuild_tensor(storage, offset, size, stride, *_):
  return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *_):
  return data


def _find_class(module: str, name: str, torchscript: bool):
  if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
    return _rebuild_tensor
  if (module, name) in (("torch._utils", "_rebuild_parameter"),
                        ("torch._utils", "_rebuild_parameter_with_state")):
    return _rebuild_parameter
  if (module, name) == ("collections", "OrderedDict"):
    return collections.OrderedDict
  if module == "torch" and name in STORAGE_DTYPES:
    return STORAGE_DTYPES[name]
  if torchscript and module == "torch.jit._pickle" and name.startswith("build_"):
    return lambda x: x
  if torchscript and module.startswith("__torch__."):
    return type(name, (_AttributeBag,), {})
  raise TorchFileError(f"refusing to build {module}.{name}: not a tensor, storage or plain container")


def _unpickler(stream, persistent_load, torchscript: bool) -> pickle.Unpickler:
  class Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
      return _find_class(module, name, torchscript)

  unpickler = Unpickler(stream, encoding="latin1")
  if persistent_load is not None:
    unpickler.persistent_load = persistent_load
  return unpickler


def _materialize(obj):
  """Replaces every _Tensor in a tree of dicts, lists and tuples by its numpy array."""
  if isinstance(obj, _Tensor):
    return obj.materialize()
  if isinstance(obj, _AttributeBag):
    for k, v in obj.items():
      obj[k] = _materialize(v)
    return obj
  if isinstance(obj, dict):
    return type(obj)((k, _materialize(v)) for k, v in obj.items())
  if isinstance(obj, list):
    return [_materialize(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_materialize(v) for v in obj)
  return obj


def _storage_dtype(storage_type):
  if isinstance(storage_type, type) and issubclass(storage_type, np.generic) or \
     storage_type is ml_dtypes.bfloat16:
    return storage_type
  raise TorchFileError(f"unsupported storage type {storage_type!r}")


def _storage_reference(pid) -> tuple:
  """(storage type, key) of a persistent id ('storage', type, key, location, numel, ...)."""
  if not isinstance(pid, tuple) or len(pid) < 3 or pid[0] != "storage":
    raise TorchFileError(f"unexpected persistent id {pid!r}")
  return pid[1], pid[2]


def _load_zip(data: bytes, torchscript: bool):
  archive = zipfile.ZipFile(io.BytesIO(data))
  names = archive.namelist()
  pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
  if len(pkl) != 1:
    raise TorchFileError("a zip file, but not a torch archive (no <name>/data.pkl)")
  prefix = pkl[0][: -len("data.pkl")]
  if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() != b"little":
    raise TorchFileError("big-endian torch files are not supported")
  storages: dict[str, _Storage] = {}

  def persistent_load(pid):
    storage_type, key = _storage_reference(pid)
    if key not in storages:
      storage = _Storage(_storage_dtype(storage_type))
      try:
        raw = archive.read(f"{prefix}data/{key}")
      except KeyError:
        raise TorchFileError(f"storage {key} is missing from the archive") from None
      storage.array = np.frombuffer(raw, storage.dtype)
      storages[key] = storage
    return storages[key]

  return _materialize(_unpickler(io.BytesIO(archive.read(pkl[0])), persistent_load, torchscript).load())


def _load_legacy(data: bytes):
  stream = io.BytesIO(data)
  plain = lambda: _unpickler(stream, None, False).load()
  if plain() != LEGACY_MAGIC:
    raise TorchFileError("not a torch file (neither a zip archive nor the legacy magic number)")
  if plain() != LEGACY_PROTOCOL:
    raise TorchFileError("unsupported legacy torch protocol version")
  sys_info = plain()
  if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
    raise TorchFileError("big-endian torch files are not supported")
  storages: dict[str, _Storage] = {}

  def persistent_load(pid):
    storage_type, key = _storage_reference(pid)
    if len(pid) > 5 and pid[5] is not None:
      raise TorchFileError("legacy storage views are not supported")
    storages.setdefault(key, _Storage(_storage_dtype(storage_type)))
    return storages[key]

  obj = _unpickler(stream, persistent_load, False).load()
  keys = plain()
  for key in keys:
    (count,) = struct.unpack("<q", stream.read(8))
    storage = storages.get(key) or _Storage(np.uint8)
    raw = stream.read(count * storage.dtype.itemsize)
    if len(raw) != count * storage.dtype.itemsize:
      raise TorchFileError(f"the file ends inside storage {key} (truncated?)")
    storage.array = np.frombuffer(raw, storage.dtype)
  return _materialize(obj)


def load(data: bytes, *, torchscript: bool = False):
  """The object saved in a torch file, with tensors as numpy arrays (see the module docstring).

  `torchscript`: also accept TorchScript archives, whose modules become dicts of their attributes.
  """
  try:
    if data[:4] == b"PK\x03\x04":
      return _load_zip(data, torchscript)
    return _load_legacy(data)
  except TorchFileError:
    raise
  except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, struct.error, ValueError, TypeError,
          KeyError, IndexError, AttributeError) as e:
    raise TorchFileError(f"not a readable torch file ({type(e).__name__}: {e})") from None
