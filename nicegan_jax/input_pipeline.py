"""Deterministic input pipelines: unpaired A/B training batches and the test transform, with grain.

Owns: the original's transforms (`train_transform`: flip, resize to img+margin, random crop, [-1, 1];
`test_transform`: resize, [-1, 1]), the per-domain grain streams and `train_batches`, which yields
this process's share of every global batch from a given step on.

Batch k is a pure function of (seed, k): each domain is shuffled (a new order every epoch), augmented
with a per-index random stream, and read by index from grain's random-access `MapDataset`. Resuming at
step k therefore only needs k; the data iterator position is the step stored in the checkpoint. The
global batch does not depend on the number of processes: each process reads only its rows of it.

Also owns `stacked` (k batches per dispatch), `Prefetcher` (host-to-device copies ahead of the step) and
`padded_chunks` (fixed-size chunks of a batch for inference, one compiled shape).
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # grain is imported where the pipelines are built, not by translation
  import grain


def to_unit_range(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
  return image.astype(np.float32) / 127.5 - 1.0


def from_unit_range(y: np.ndarray) -> np.ndarray:
  """float32 [-1, 1] -> uint8, rounded to nearest (half to even); in place, as photo-sized outputs are
  large."""
  y = np.add(y, 1.0, out=y)
  y = np.multiply(y, 127.5, out=y)
  return np.rint(y, out=y).astype(np.uint8)


def padded_chunks(items: np.ndarray, size: int | None) -> Iterator[tuple[np.ndarray, int]]:
  """(chunk, number of real items in it) over `items`, each chunk of `size` items, the last one padded
  with copies of its last item so that every call has one shape (compiled once). With `size` None, or
  no more items than `size`, `items` come whole."""
  if size is None or len(items) <= size:
    yield items, len(items)
    return
  for start in range(0, len(items), size):
    chunk = items[start:start + size]
    n = len(chunk)
    if n < size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - n, axis=0)])
    yield chunk, n


def resize(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
  """Bilinear resize to size x size (or (height, width)) with PIL, as torchvision's Resize on PIL images
  (aspect not kept; antialiased when shrinking). An RGB uint8 image or one float32 plane."""
  height, width = (size, size) if isinstance(size, int) else size
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def train_transform(image: np.ndarray, rng: np.random.Generator, *, img_size: int, margin: int,
                    flip: bool) -> np.ndarray:
  """Random horizontal flip (p=0.5, at the original size), resize to img+margin, random crop, [-1, 1]."""
  if flip and rng.random() < 0.5:
    image = image[:, ::-1]
  image = resize(np.ascontiguousarray(image), img_size + margin)
  top, left = rng.integers(0, margin + 1, size=2)
  return to_unit_range(image[top:top + img_size, left:left + img_size])


def test_transform(image: np.ndarray, *, img_size: int) -> np.ndarray:
  """Resize to img_size x img_size, [-1, 1]; no flip, no crop."""
  return to_unit_range(resize(image, img_size))


def domain_stream(source: Sequence, *, img_size: int, margin: int, flip: bool, seed: int
                  ) -> grain.MapDataset:
  """An endless, shuffled (a new order every epoch), augmented random-access stream of one domain."""
  import grain  # here, not at the top: translation and the model need only the transforms above
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  return ds.random_map(lambda img, rng: train_transform(img, rng, img_size=img_size, margin=margin,
                                                        flip=flip), seed=seed + 1)


def process_rows(global_batch_size: int, process_index: int, process_count: int) -> range:
  """The rows of every global batch that this process reads: a contiguous block of G / P rows."""
  if global_batch_size % process_count:
    raise ValueError(f"batch size {global_batch_size} is not divisible by {process_count} processes")
  local = global_batch_size // process_count
  return range(process_index * local, (process_index + 1) * local)


def train_batches(sources: dict, data_config, *, img_size: int, global_batch_size: int, seed: int,
                  start_step: int = 0, process_index: int = 0, process_count: int = 1,
                  num_threads: int = 4) -> Iterator[dict[str, np.ndarray]]:
  """{"A": (b, S, S, 3), "B": ...} float32 host batches for steps start_step, start_step+1, ...

  Global batch k holds elements k*G ... k*G+G-1 of each domain's stream; this process gets its rows
  of it (b = G / process_count), so the global batch is the same whatever the number of processes.
  A and B are drawn independently (unpaired).
  """
  rows = process_rows(global_batch_size, process_index, process_count)
  common = dict(img_size=img_size, margin=int(data_config.resize_margin), flip=bool(data_config.flip))
  streams = {"A": domain_stream(sources["trainA"], seed=seed * 4 + 1, **common),
             "B": domain_stream(sources["trainB"], seed=seed * 4 + 2, **common)}

  def batch(k):
    return {d: np.stack([stream[k * global_batch_size + r] for r in rows]) for d, stream in streams.items()}

  import grain
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2 * num_threads, 2))
  return iter(grain.MapDataset.range(start_step, 2**62).map(batch).to_iter_dataset(options))


def test_images(source: Sequence, indices: Sequence[int], *, img_size: int) -> np.ndarray:
  """The test-transformed images at `indices`, stacked (N, S, S, 3)."""
  return np.stack([test_transform(source[i], img_size=img_size) for i in indices])


def stacked(batches: Iterator[dict], count: int) -> Iterator[dict]:
  """Groups `count` consecutive batches into one with a leading axis (for several steps per dispatch)."""
  while True:
    group = [next(batches) for _ in range(count)]
    yield {k: np.stack([b[k] for b in group]) for k in group[0]}


class Prefetcher:
  """Runs `put(next(iterator))` (e.g. the host-to-device copy) in a thread, `size` items ahead.

  The batches stay the same and in the same order (the data position is the step); only the waiting
  moves off the training loop. `close()` stops the thread; errors surface in the consumer.
  """

  def __init__(self, iterator: Iterator, put, size: int):
    self._queue: queue.Queue = queue.Queue(maxsize=max(size, 1))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, args=(iterator, put), daemon=True)
    self._thread.start()

  def _offer(self, item) -> bool:
    """Queues `item` unless stopped first; returns whether it was queued."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _fill(self, iterator, put) -> None:
    try:
      for item in iterator:
        if not self._offer(("item", put(item))):
          return
      self._offer(("end", None))
    except BaseException as e:  # handed to the consumer
      self._offer(("error", e))

  def __iter__(self):
    return self

  def __next__(self):
    kind, value = self._queue.get()
    if kind == "error":
      raise value
    if kind == "end":
      self._queue.put(("end", None))  # stay exhausted
      raise StopIteration
    return value

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5)


def device_batches(batches: Iterator[dict], put, prefetch: int):
  """`put` applied to every batch: in a Prefetcher thread when `prefetch` > 0, else inline."""
  if prefetch > 0:
    return Prefetcher(batches, put, prefetch)
  return (put(b) for b in batches)
