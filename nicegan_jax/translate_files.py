"""Translating files: a folder (or one file) to PNGs, and a whole test split like the original's test.

Owns: `translate_folder` (walks the input, mirrors sub-folders, writes lossless PNGs with the same base
names, a.jpg.png and a.png.png where a.jpg and a.png sit side by side; never overwrites an input,
reports unreadable files at the end; refuses a folder without images, an output that is a file or
lies inside the input folder, before translating anything) and `translate_test_split` (testA -> fakeB/, testB -> fakeA/ at the training size, as the
original's test phase and the evaluation expect).
"""

from __future__ import annotations

import collections
import pathlib
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from nicegan_jax import datasets, input_pipeline
from nicegan_jax.inference import DIRECTIONS, Translator, check_native, domains, translate


class OutputError(ValueError):
  """An output that cannot be written as asked: a file where a folder is needed, an output folder inside
  the input folder, two inputs that would share one output name."""


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


def output_names(root: pathlib.Path, files: list[pathlib.Path]) -> dict[pathlib.Path, pathlib.Path]:
  """input file -> its output path relative to the output folder: the same relative path as a PNG;
  where several inputs would share one (a.jpg and a.png), each keeps its extension (a.jpg.png,
  a.png.png). Names are compared case-insensitively, as some filesystems do."""
  plain = {f: f.relative_to(root).with_suffix(".png") for f in files}
  shared = collections.Counter(str(rel).lower() for rel in plain.values())
  names = {f: rel if shared[str(rel).lower()] == 1 else rel.with_name(f.name + ".png")
           for f, rel in plain.items()}
  clashes = collections.defaultdict(list)
  for f, rel in names.items():
    clashes[str(rel).lower()].append(f)
  clashing = [group for group in clashes.values() if len(group) > 1]
  if clashing:
    raise OutputError("these inputs would be written to one output file: "
                      + "; ".join(" and ".join(str(f) for f in group) for group in clashing)
                      + ": rename one of each")
  return names


def check_output_folder(output_dir: pathlib.Path, input_path: pathlib.Path) -> None:
  """Refuses an output that is a file, or a folder inside (or equal to) the input folder, where a
  second run would translate the first run's outputs."""
  if output_dir.exists() and not output_dir.is_dir():
    raise OutputError(f"the output {output_dir} is a file; give a folder (it is created if missing)")
  if input_path.is_dir():
    inside = input_path.resolve()
    if output_dir.resolve() == inside or inside in output_dir.resolve().parents:
      raise OutputError(f"the output folder {output_dir} is inside the input folder {input_path}: a "
                        "second run would translate its own outputs; choose a folder outside it")


def translate_folder(translator: Translator, input_path: str | pathlib.Path, output_dir: str | pathlib.Path,
                     direction: str = "A2B", *, native: bool = False,
                     progress: bool = True) -> FolderReport:
  """Translates every image under `input_path` (or that one file) into PNGs under `output_dir`
  (`output_names`). Every check that can refuse the whole job runs before the first image."""
  check_native(translator, native)  # before the loop, which would refuse every file
  input_path, output_dir = pathlib.Path(input_path).expanduser(), pathlib.Path(output_dir).expanduser()
  root, files = _inputs(input_path)
  check_output_folder(output_dir, input_path)
  names = output_names(root, files)
  inputs = {f.resolve() for f in files}
  written, unreadable, skipped = [], [], []
  for f in tqdm(files, desc=f"translate {direction}", unit="img", disable=not progress):
    out = output_dir / names[f]
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
    try:
      out.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(translated).save(out)
    except OSError as e:  # a full disk, no permission, a file where a folder should be
      raise OutputError(f"cannot write {out} ({e.strerror or e}); {len(written)} image(s) were written "
                        "before it") from None
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
  for direction in DIRECTIONS:
    src, dst = domains(direction)
    source = sources[f"test{src}"]
    fakes = translate_split(translator, source, direction, progress=progress, max_images=max_images)
    written[f"fake{dst}"] = []
    for i, fake in enumerate(fakes):
      out = output_dir / f"fake{dst}" / _split_relative_name(source, i, f"test{src}")
      out.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(fake).save(out)
      written[f"fake{dst}"].append(out)
  return written
