"""Translating files: a folder (or one file) to PNGs, and a whole test split like the original's test.

Owns: `translate_folder` (walks the input, mirrors sub-folders, writes lossless PNGs with the same base
names, never overwrites an input, reports unreadable files at the end, refuses a folder without
images) and `translate_test_split` (testA -> fakeB/, testB -> fakeA/ at the training size, as the
original's test phase and the evaluation expect).
"""

from __future__ import annotations

import pathlib
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from nicegan_jax import datasets, input_pipeline
from nicegan_jax.inference import Translator, check_native, translate


class FolderReport(NamedTuple):
  written: list[pathlib.Path]
  unreadable: list[str]  # "path: reason"
  skipped: list[str]  # outputs that would have overwritten an input


def _inputs(path: pathlib.Path) -> tuple[pathlib.Path, list[pathlib.Path]]:
  if path.is_file():
    return path.parent, [path]
  if not path.is_dir():
    raise FileNotFoundError(f"input {path} does not exist")
  return path, datasets.require_images(path)  # not an empty run that looks like a success


def translate_folder(translator: Translator, input_path: str | pathlib.Path, output_dir: str | pathlib.Path,
                     direction: str = "A2B", *, native: bool = False,
                     progress: bool = True) -> FolderReport:
  """Translates every image under `input_path` (or that one file) into PNGs under `output_dir`."""
  check_native(translator, native)  # before the loop, which would refuse every file
  root, files = _inputs(pathlib.Path(input_path).expanduser())
  output_dir = pathlib.Path(output_dir).expanduser()
  inputs = {f.resolve() for f in files}
  written, unreadable, skipped = [], [], []
  for f in tqdm(files, desc=f"translate {direction}", unit="img", disable=not progress):
    out = output_dir / f.relative_to(root).with_suffix(".png")
    if out.resolve() in inputs:
      skipped.append(str(out))
      continue
    try:
      translated = translate(translator, datasets.read_rgb(f), direction, native=native)
    except datasets.DataError as e:
      unreadable.append(str(e))
      continue
    except ValueError as e:  # readable, but outside translate's contract (e.g. smaller than 4x4)
      unreadable.append(f"cannot translate {f}: {e}")
      continue
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(translated).save(out)
    written.append(out)
  return FolderReport(written, unreadable, skipped)


def split_size(source, max_images: int = 0) -> int:
  """How many images of a split are used: all, or the first `max_images` when it is positive."""
  if max_images < 0:
    raise ValueError(f"max_images must be >= 0 (0 = all), got {max_images}")
  return min(len(source), max_images) if max_images else len(source)


def translate_split(translator: Translator, source, direction: str, *, batch_size: int = 16,
                    progress: bool = False, max_images: int = 0) -> list[np.ndarray]:
  """The images of a split (all, or the first max_images), resized to the training size (the test
  transform) and translated: uint8."""
  size = translator.config.model.img_size
  count = split_size(source, max_images)
  out = []
  for start in tqdm(range(0, count, batch_size), desc=f"translate {direction}", unit="batch",
                    disable=not progress):
    chunk = [input_pipeline.resize(np.asarray(source[i]), size)
             for i in range(start, min(start + batch_size, count))]
    batch = np.stack(chunk + [chunk[-1]] * (batch_size - len(chunk)))  # one compiled batch shape
    out.extend(translate(translator, batch, direction)[:len(chunk)])
  return out


def _split_relative_name(source, index: int, split: str) -> pathlib.Path:
  rel = pathlib.Path(source.filename(index) if hasattr(source, "filename") else f"{index:06d}")
  if rel.parts[0] == split:  # image folders name files relative to the dataset root
    rel = pathlib.Path(*rel.parts[1:])
  return rel.with_suffix(".png")


def translate_test_split(translator: Translator, sources: dict, output_dir: str | pathlib.Path,
                         *, progress: bool = True, max_images: int = 0) -> dict[str, list[pathlib.Path]]:
  """testA -> output_dir/fakeB, testB -> output_dir/fakeA, PNGs at the training size (all images, or
  the first max_images of each split)."""
  output_dir = pathlib.Path(output_dir)
  written = {}
  for src, dst, direction in (("A", "B", "A2B"), ("B", "A", "B2A")):
    source = sources[f"test{src}"]
    fakes = translate_split(translator, source, direction, progress=progress, max_images=max_images)
    written[f"fake{dst}"] = []
    for i, fake in enumerate(fakes):
      out = output_dir / f"fake{dst}" / _split_relative_name(source, i, f"test{src}")
      out.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(fake).save(out)
      written[f"fake{dst}"].append(out)
  return written
