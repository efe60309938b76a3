"""Reading files written by `torch.save` (and TorchScript archives) without torch, safely.

Owns: `load(data)`, which turns the bytes of a torch file into plain Python objects — dicts, lists,
numbers and numpy arrays for tensors — in both of PyTorch's serialisation formats:

* zip (PyTorch >= 1.6): `<name>/data.pkl` plus one raw file per storage under `<name>/data/`;
* legacy (older PyTorch, or `_use_new_zipfile_serialization=False`): a stream of pickles — magic
  number, protocol version, system info, the object, the storage keys — followed by every storage as
  an int64 element count and its raw bytes.

The bytes may come from anyone, so the reader assumes nothing about them:

* Only an allow-list of globals is ever constructed (tensors, storages, OrderedDict and, for TorchScript
  archives, attribute bags standing in for modules); the allowed ones cannot be called with other
  arguments or have their state replaced. A malicious pickle cannot run code.
* Every tensor view is checked against its storage before it is read: non-negative offset, sizes and
  strides, every element inside the storage, and no more elements than the storage holds (a stride-0
  view of one number cannot become a gigabyte).
* One memory budget covers the whole file: every zip member is charged at its declared size before it
  is decompressed, every storage and every tensor as it is made. `torch.save` stores storages
  uncompressed and each tensor's elements once, so a real file needs about twice its own size; the
  default budget is that plus 16 MiB (`budget_for`).
* The pickled part of a file (names, shapes and containers: about 100 bytes per tensor) may be at most
  `MAX_PICKLE_BYTES`, which bounds the Python objects it can make.
* Containers nest at most `MAX_DEPTH` deep. The pickles are read by Python's pure-Python unpickler,
  whose memo does not grow to whatever index a pickle names (`_unpickler`).

Anything else wrong with the bytes raises `TorchFileError` (a ValueError) with one line saying what.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import reprlib
import struct
import zipfile

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
MAX_DEPTH = 100  # containers inside containers; a checkpoint nests 5 deep, a TorchScript archive ~20
MAX_NDIM = 32  # dimensions of one tensor
MAX_PICKLE_BYTES = 4 << 20  # 40,000 tensors; a full NICE-GAN checkpoint with its Adam states has ~2,000
BUDGET_SLACK_BYTES = 16 << 20

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlevel = 3


class TorchFileError(ValueError):
  """The bytes are not a torch file this reader understands, or hold objects it refuses to build."""


def budget_for(data: bytes) -> int:
  """The bytes a real torch file of this size needs at most while read: its storages and the tensors
  made from them, twice the file, plus slack for the small ones."""
  return 2 * len(data) + BUDGET_SLACK_BYTES


class Budget:
  """Bytes allocated while reading one file, against a limit."""

  def __init__(self, limit: int, file_size: int):
    self.limit, self.file_size, self.used = limit, file_size, 0

  def charge(self, nbytes: int, what: str) -> None:
    self.used += nbytes
    if self.used > self.limit:
      raise TorchFileError(
          f"{what} would bring the memory this {self.file_size / 2**20:.1f} MiB file needs to "
          f"{self.used / 2**20:.1f} MiB, over its budget of {self.limit / 2**20:.1f} MiB (a torch.save "
          "file needs about twice its size; this one expands or repeats data)")


class _Refused:
  """Allowed names are built by the reader alone: a pickle may not call them or replace their state."""

  def __call__(self, *args, **kwargs):
    raise TorchFileError(f"the file calls {self!r}, which a torch file never does")

  def __setstate__(self, state):
    raise TorchFileError(f"the file sets the state of {type(self).__name__}, which a torch file never does")


class _StorageType(_Refused):
  """torch.<Type>Storage as named in a persistent id: only its element type is used."""

  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(STORAGE_DTYPES[name])

  def __repr__(self):
    return f"torch.{self.name}"


class _Storage(_Refused):
  """A storage whose bytes may arrive after the pickle that references it (legacy format)."""

  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)
    self.array: np.ndarray | None = None


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


class _Tensor(_Refused):
  """A tensor view of a storage, checked and materialised once every storage is read."""

  def __init__(self, storage, offset, size, stride):
    if not isinstance(storage, _Storage):
      raise TorchFileError(f"a tensor's storage is {_short.repr(storage)}, not a storage of the file")
    if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))):
      raise TorchFileError(f"a tensor's size {_short.repr(size)} or stride {_short.repr(stride)} is not "
                           "a sequence")
    if len(size) > MAX_NDIM or len(size) != len(stride):
      raise TorchFileError(f"a tensor has {len(size)} sizes and {len(stride)} strides (at most {MAX_NDIM})")
    if not all(_is_int(v) for v in (offset, *size, *stride)):
      raise TorchFileError(f"a tensor's offset, sizes and strides must be integers; got "
                           f"{_short.repr(offset)}, {_short.repr(size)}, {_short.repr(stride)}")
    self.storage, self.offset = storage, int(offset)
    self.size, self.stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)

  def check(self, flat: np.ndarray) -> int:
    """The number of elements, after checking that the view lies inside `flat` and reads no element
    more often than the storage holds elements."""
    if self.offset < 0 or any(n < 0 for n in self.size) or any(s < 0 for s in self.stride):
      raise TorchFileError(f"a tensor view has a negative offset, size or stride (offset {self.offset}, "
                           f"size {self.size}, stride {self.stride}); torch never writes one")
    count = math.prod(self.size)
    if count == 0:
      return 0
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if last >= len(flat):
      raise TorchFileError(f"a tensor of shape {self.size} (offset {self.offset}, stride {self.stride}) "
                           f"reads past the end of its storage of {len(flat)} elements")
    if count > len(flat):
      raise TorchFileError(f"a tensor of shape {self.size} has more elements ({count}) than its storage "
                           f"({len(flat)}): it repeats data (stride 0), which torch.save never writes")
    return count

  def materialize(self, budget: Budget) -> np.ndarray:
    flat = self.storage.array
    if flat is None:
      raise TorchFileError("a tensor refers to a storage that the file does not contain")
    count = self.check(flat)
    budget.charge(max(count, 1) * flat.dtype.itemsize, f"a tensor of shape {self.size}")
    if count == 0:
      return np.zeros(self.size, flat.dtype)
    item = flat.dtype.itemsize
    return np.lib.stride_tricks.as_strided(flat[self.offset:], self.size,
                                           tuple(s * item for s in self.stride)).copy()


class _AttributeBag(dict):
  """A TorchScript module or object: a dict of its attributes."""

  def __init__(self, *args):
    super().__init__()

  def __setstate__(self, state):
    self.update(state if isinstance(state, dict) else {"__state__": state})


def _pickle_too_large() -> TorchFileError:
  return TorchFileError(f"the pickled part of the file is larger than {MAX_PICKLE_BYTES >> 20} MiB; a torch "
                        "file's holds only names and shapes (about 100 bytes per tensor)")


class _PickleStream:
  """The bytes an unpickler reads, counted and cut off at MAX_PICKLE_BYTES for the whole file."""

  def __init__(self, stream: io.BytesIO):
    self.stream, self.used = stream, 0

  def _take(self, chunk: bytes) -> bytes:
    self.used += len(chunk)
    if self.used > MAX_PICKLE_BYTES:
      raise _pickle_too_large()
    return chunk

  def read(self, n: int = -1) -> bytes:
    return self._take(self.stream.read(n))

  def readline(self) -> bytes:
    return self._take(self.stream.readline(MAX_PICKLE_BYTES + 1))


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
    return _StorageType(name)
  if torchscript and module == "torch.jit._pickle" and name.startswith("build_"):
    return lambda x: x
  if torchscript and module.startswith("__torch__."):
    return type(name, (_AttributeBag,), {})
  raise TorchFileError(f"refusing to build {_short.repr(module)[1:-1]}.{_short.repr(name)[1:-1]}: not a "
                       "tensor, storage or plain container")


def _unpickler(stream: _PickleStream, persistent_load, torchscript: bool) -> pickle.Unpickler:
  """Python's own unpickler in pure Python, not the C one, whose memo is an array grown to the largest
  index a pickle names: a four-byte LONG_BINPUT index makes it allocate up to 32 GiB. This one's memo is
  a dict, and real torch pickles are small (names and shapes only)."""
  class Unpickler(pickle._Unpickler):  # noqa: SLF001 - the pure-Python implementation, on purpose
    def find_class(self, module, name):
      return _find_class(module, name, torchscript)

  unpickler = Unpickler(stream, encoding="latin1")
  if persistent_load is not None:
    unpickler.persistent_load = persistent_load
  return unpickler


def _materialize(obj, budget: Budget):
  """Replaces every _Tensor in a tree of dicts, lists and tuples by its numpy array (one array per
  distinct view, however often the pickle refers to it)."""
  made: dict[tuple, np.ndarray] = {}

  def walk(x, depth):
    if depth > MAX_DEPTH:
      raise TorchFileError(f"containers nest more than {MAX_DEPTH} deep; a torch file never does")
    if isinstance(x, _Tensor):
      key = (id(x.storage), x.offset, x.size, x.stride)
      if key not in made:
        made[key] = x.materialize(budget)
      return made[key]
    if isinstance(x, _AttributeBag):
      for k, v in x.items():
        x[k] = walk(v, depth + 1)
      return x
    if isinstance(x, dict):
      return type(x)((k, walk(v, depth + 1)) for k, v in x.items())
    if isinstance(x, list):
      return [walk(v, depth + 1) for v in x]
    if isinstance(x, tuple):
      return tuple(walk(v, depth + 1) for v in x)
    return x

  return walk(obj, 0)


def _storage_dtype(storage_type):
  if isinstance(storage_type, _StorageType):
    return storage_type.dtype
  raise TorchFileError(f"unsupported storage type {_short.repr(storage_type)}")


def _storage_reference(pid) -> tuple:
  """(storage type, key) of a persistent id ('storage', type, key, location, numel, ...)."""
  if not isinstance(pid, tuple) or len(pid) < 3 or pid[0] != "storage":
    raise TorchFileError(f"unexpected persistent id {_short.repr(pid)}")
  if not isinstance(pid[2], (str, int)):
    raise TorchFileError(f"unexpected storage key {_short.repr(pid[2])}")
  return pid[1], str(pid[2])


def _read_member(archive: zipfile.ZipFile, name: str, budget: Budget) -> bytes:
  """A zip member's bytes, charged to the budget at its declared size before it is decompressed (the
  zip reader never returns more than that size)."""
  info = archive.getinfo(name)
  budget.charge(info.file_size, f"the archive member {name} ({info.file_size} bytes)")
  return archive.read(info)


def _load_zip(data: bytes, torchscript: bool, budget: Budget):
  archive = zipfile.ZipFile(io.BytesIO(data))
  names = archive.namelist()
  pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
  if len(pkl) != 1:
    raise TorchFileError("a zip file, but not a torch archive (no <name>/data.pkl)")
  prefix = pkl[0][: -len("data.pkl")]
  byteorder = f"{prefix}byteorder"
  if byteorder in names and _read_member(archive, byteorder, budget).strip() != b"little":
    raise TorchFileError("big-endian torch files are not supported")
  storages: dict[str, _Storage] = {}

  def persistent_load(pid):
    storage_type, key = _storage_reference(pid)
    if key not in storages:
      storage = _Storage(_storage_dtype(storage_type))
      try:
        raw = _read_member(archive, f"{prefix}data/{key}", budget)
      except KeyError:
        raise TorchFileError(f"storage {_short.repr(key)} is missing from the archive") from None
      if len(raw) % storage.dtype.itemsize:
        raise TorchFileError(f"storage {_short.repr(key)} holds {len(raw)} bytes, not a whole number of "
                             f"{storage.dtype} elements")
      storage.array = np.frombuffer(raw, storage.dtype)
      storages[key] = storage
    return storages[key]

  if archive.getinfo(pkl[0]).file_size > MAX_PICKLE_BYTES:
    raise _pickle_too_large()
  stream = _PickleStream(io.BytesIO(_read_member(archive, pkl[0], budget)))
  return _materialize(_unpickler(stream, persistent_load, torchscript).load(), budget)


def _load_legacy(data: bytes, budget: Budget):
  raw = io.BytesIO(data)
  stream = _PickleStream(raw)  # the pickles; the storages after them are read from `raw`
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
  if not isinstance(keys, list):
    raise TorchFileError(f"the storage keys are {_short.repr(keys)}, not a list")
  for key in keys:
    (count,) = struct.unpack("<q", raw.read(8))
    storage = storages.get(str(key)) or _Storage(np.uint8)
    nbytes = count * storage.dtype.itemsize
    if count < 0 or nbytes > len(data) - raw.tell():
      raise TorchFileError(f"storage {_short.repr(key)} declares {count} elements; the file ends before "
                           "them (truncated?)")
    budget.charge(nbytes, f"storage {_short.repr(key)}")
    storage.array = np.frombuffer(raw.read(nbytes), storage.dtype)
  return _materialize(obj, budget)


def load(data: bytes, *, torchscript: bool = False, max_bytes: int | None = None):
  """The object saved in a torch file, with tensors as numpy arrays (see the module docstring).

  `torchscript`: also accept TorchScript archives, whose modules become dicts of their attributes.
  `max_bytes`: the memory budget of the whole read (default: `budget_for(data)`).
  """
  budget = Budget(budget_for(data) if max_bytes is None else max_bytes, len(data))
  try:
    if data[:4] == b"PK\x03\x04":
      return _load_zip(data, torchscript, budget)
    return _load_legacy(data, budget)
  except TorchFileError:
    raise
  except Exception as e:  # the bytes are untrusted: any failure to parse them is the file's
    text = str(e).splitlines()[0][:200] if str(e) else ""
    raise TorchFileError(f"not a readable torch file ({type(e).__name__}: {text})") from None
