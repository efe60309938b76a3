"""The Animal-MNIST horse -> zebra benchmark: trains the real program, then scores the translation.

Owns the benchmark (results: docs/results.md): train (or resume) `configs/animal_horse2zebra.py` in a
workdir, translate the 200 held-out test horses, bring the translations back to 28x28 (bilinear without
antialiasing, which undoes the loader's 28 -> 64 upsampling almost exactly) and report

  * judge_zebra_rate: how often a 10-class CNN (trained here, in JAX, on the Animal-MNIST train split,
    which holds none of the test horses; cached) calls G(horse) "zebra" (and judge_classes: how
    often it calls them each class);
  * mask_iou: mean IoU of blurred foreground masks (Gaussian sigma 1, threshold 24/255) between each
    horse and its translation — a generator that ignores its input fails it;
  * kid_x100: Inception KIDx100 of G(test horses) against the real test zebras (built-in evaluation);

with the do-nothing baselines beside them, the same three scores for a reference (real train zebras
drawn in the test horses' boxes, `drawn_in_box`: what the bars ask of a translation's outline), a PNG
grid and a JSON file (<workdir>/benchmark.json).
Pass: judge >= 0.8, IoU >= 0.6, KIDx100 <= 3 — together, since each alone is easy to fool.

  python -m benchmarks.horse2zebra_mini --workdir=runs/horse2zebra_mini               # the original's recipe
  python -m benchmarks.horse2zebra_mini --config=configs/animal_horse2zebra.py:tuned --workdir=...  # passes
  python -m benchmarks.horse2zebra_mini --workdir=... --config.train.num_steps=4000   # train longer
  python -m benchmarks.horse2zebra_mini --workdir=... --eval_only                     # score as is
  python -m benchmarks.horse2zebra_mini --workdir=... --eval_only --every_checkpoint  # and each kept one
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

# TensorFlow (imported by clu's writers and TFDS) runs no computation of ours; without this it announces
# its oneDNN CPU kernels at every start (as main.py).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import serialization
from ml_collections import config_flags
from PIL import Image

from nicegan_jax import checkpoints, datasets, evaluation, inception, inference, preemption, train

HORSE, ZEBRA = datasets.ANIMAL_MNIST_CLASSES.index("horse"), datasets.ANIMAL_MNIST_CLASSES.index("zebra")
CRITERIA = {"judge_zebra_rate": (">=", 0.8), "mask_iou": (">=", 0.6), "kid_x100": ("<=", 3.0)}
MASK_THRESHOLD = 24.0
GRID_COLUMNS = 16

_CONFIG = config_flags.DEFINE_config_file("config", "configs/animal_horse2zebra.py",
                                          "benchmark config (file + --config.x=... overrides)")
flags.DEFINE_string("workdir", None, "run directory (trains or resumes there)", required=True)
flags.DEFINE_bool("eval_only", False, "score the newest checkpoint without training")
flags.DEFINE_integer("num_test", 200, "test horses translated (and test zebras compared); <= 200")
flags.DEFINE_integer("judge_steps", 1500, "training steps of the judge CNN")
flags.DEFINE_bool("every_checkpoint", False, "also score every checkpoint the run kept (slower)")
FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------------------------- judge
class Judge(nn.Module):
  """A small 10-class CNN on 28x28 grey images in [0, 1]."""

  @nn.compact
  def __call__(self, x):  # (N, 28, 28) -> (N, 10) logits
    x = x[..., None]
    for features in (32, 64):  # ~4M multiply-adds per image: a 1500-step training is ~1 min on 2 cores
      x = nn.relu(nn.Conv(features, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


def shift_images(images: np.ndarray, rng: np.random.Generator, max_shift: int = 2) -> np.ndarray:
  """Random translations by up to `max_shift` pixels (zero fill): the judge's only augmentation."""
  padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift)))
  dy, dx = rng.integers(0, 2 * max_shift + 1, (2, len(images)))
  size = images.shape[1]
  return np.stack([p[y:y + size, x:x + size] for p, y, x in zip(padded, dy, dx)])


def train_judge(images: np.ndarray, labels: np.ndarray, *, steps: int, seed: int = 0,
                batch_size: int = 64):
  """Judge params trained with Adam on uint8 (N, 28, 28) images."""
  model = Judge()
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 28, 28)))
  tx = optax.adam(optax.cosine_decay_schedule(1e-3, steps))
  opt_state = tx.init(params)

  @jax.jit
  def update(params, opt_state, x, y):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(images), batch_size)
    x = shift_images(images[idx], rng).astype(np.float32) / 255.0
    params, opt_state = update(params, opt_state, x, labels[idx])
  return params


def judge_predict(params, images: np.ndarray) -> np.ndarray:
  """Class indices of (N, 28, 28) grey images, uint8 or float in [0, 255]."""
  logits = jax.jit(Judge().apply)(params, jnp.asarray(images, jnp.float32) / 255.0)
  return np.asarray(jnp.argmax(logits, -1))


def load_or_train_judge(images, labels, train_idx, test_idx, *, steps: int, cache_dir: pathlib.Path):
  """(params, held-out accuracy); params cached per number of steps."""
  path = cache_dir / f"judge_v2_{steps}.msgpack"
  template = Judge().init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28)))
  if path.exists():
    params = serialization.from_bytes(template, path.read_bytes())
  else:
    logging.info("Training the judge CNN (%d steps) on %d images", steps, len(train_idx))
    params = train_judge(images[train_idx], labels[train_idx], steps=steps)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_bytes(serialization.to_bytes(params))
    tmp.replace(path)
  accuracy = float(np.mean(judge_predict(params, images[test_idx]) == labels[test_idx]))
  return params, accuracy


def class_shares(predictions: np.ndarray) -> dict[str, float]:
  """{class name: share of the predictions} for the classes predicted at least once, most common first."""
  counts = np.bincount(predictions, minlength=len(datasets.ANIMAL_MNIST_CLASSES))
  order = np.argsort(-counts, kind="stable")
  return {datasets.ANIMAL_MNIST_CLASSES[c]: float(counts[c] / len(predictions)) for c in order if counts[c]}


# ------------------------------------------------------------------------------------------ measures
def to_28(images: np.ndarray) -> np.ndarray:
  """uint8 (N, 64, 64, 3) -> float (N, 28, 28) grey in [0, 255]: bilinear, no antialiasing."""
  x = jnp.asarray(images, jnp.float32).mean(-1)
  return np.asarray(jax.image.resize(x, (x.shape[0], 28, 28), "bilinear", antialias=False))


def gaussian_blur(images: np.ndarray, sigma: float = 1.0) -> np.ndarray:
  """Separable Gaussian blur (radius 3 sigma, zero padding) of (N, H, W) images."""
  radius = int(np.ceil(3 * sigma))
  t = np.arange(-radius, radius + 1)
  k = np.exp(-t ** 2 / (2 * sigma ** 2))
  k /= k.sum()
  x = np.pad(np.asarray(images, np.float64), ((0, 0), (radius, radius), (radius, radius)))
  x = sum(k[i] * x[:, i:i + x.shape[1] - 2 * radius, :] for i in range(len(k)))
  return sum(k[i] * x[:, :, i:i + x.shape[2] - 2 * radius] for i in range(len(k)))


def foreground_masks(images: np.ndarray) -> np.ndarray:
  return gaussian_blur(images) > MASK_THRESHOLD


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Per-image IoU of the foreground masks of two (N, 28, 28) image sets (1 where both are empty)."""
  ma, mb = foreground_masks(a), foreground_masks(b)
  inter = (ma & mb).sum((1, 2))
  union = (ma | mb).sum((1, 2))
  return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def foreground_box(image: np.ndarray) -> tuple[int, int, int, int]:
  """(top, bottom, left, right), end-exclusive, of a (28, 28) image's pixels above the mask threshold."""
  rows, cols = np.nonzero(image > MASK_THRESHOLD)
  if not len(rows):
    return 0, image.shape[0], 0, image.shape[1]
  return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


def drawn_in_box(zebra: np.ndarray, horse: np.ndarray) -> np.ndarray:
  """The zebra's foreground box resized (bilinear) onto the horse's box, on an empty (28, 28) image.

  A reference translation: a real zebra where the horse stands, at the horse's size, in neither's exact
  silhouette. It shows what the criteria ask of a translation's shape (docs/results.md).
  """
  top, bottom, left, right = foreground_box(horse)
  z_top, z_bottom, z_left, z_right = foreground_box(zebra)
  crop = Image.fromarray(np.clip(zebra[z_top:z_bottom, z_left:z_right], 0, 255).astype(np.uint8))
  out = np.zeros(horse.shape, np.float32)
  out[top:bottom, left:right] = np.asarray(crop.resize((right - left, bottom - top), Image.BILINEAR))
  return out


def grey_to_rgb(images: np.ndarray) -> np.ndarray:
  return np.repeat(np.clip(np.round(images), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def features(weights, images: np.ndarray) -> np.ndarray:
  """Inception features of (N, 28, 28) grey images (resized to 299 as the built-in protocol)."""
  return evaluation.image_features(list(grey_to_rgb(images)), weights)


def kid_x100(real_features: np.ndarray, fake_features: np.ndarray) -> float:
  return evaluation.scores(real_features, fake_features)["kid_x100"]


def passes(results: dict) -> dict[str, bool]:
  return {k: (results[k] >= bar if op == ">=" else results[k] <= bar) for k, (op, bar) in CRITERIA.items()}


def save_grid(horses: np.ndarray, translations: np.ndarray, path: pathlib.Path) -> None:
  """Two rows (input horses, their translations) of GRID_COLUMNS 64x64 images, upscaled x2."""
  n = min(GRID_COLUMNS, len(horses))
  rows = [np.concatenate(list(x[:n]), axis=1) for x in (horses, translations)]
  grid = Image.fromarray(np.concatenate(rows, axis=0))
  grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(path)


# --------------------------------------------------------------------------------------------- run
def training_time(workdir: pathlib.Path, steps_before: int, steps_after: int, seconds: float) -> dict:
  """Accumulates wall time over resumed runs in <workdir>/benchmark_train_time.json."""
  path = workdir / "benchmark_train_time.json"
  log = json.loads(path.read_text()) if path.exists() else {"segments": []}
  if steps_after > steps_before:
    log["segments"].append({"from_step": steps_before, "to_step": steps_after, "wall_s": seconds})
    path.write_text(json.dumps(log, indent=2))
  return {"train_wall_s": sum(s["wall_s"] for s in log["segments"]),
          "steps_timed": sum(s["to_step"] - s["from_step"] for s in log["segments"])}


def newest_step(workdir: pathlib.Path) -> int:
  steps = checkpoints.list_steps(checkpoints.checkpoints_root(workdir))
  return steps[-1] if steps else 0


def translate_horses(translator, horses_64: np.ndarray) -> np.ndarray:
  return inference.translate(translator, horses_64, "A2B")  # in chunks of 8 on a CPU


def run_benchmark(config, workdir: pathlib.Path, *, eval_only: bool = False, num_test: int = 200,
                  judge_steps: int = 1500, every_checkpoint: bool = False) -> dict:
  """Trains (unless eval_only), scores and writes benchmark.json and benchmark_grid.png.

  every_checkpoint: also score each checkpoint the run kept (results["checkpoints"]), not only the
  newest.
  """
  if config.data.dataset != "animal_mnist/horse2zebra":
    raise ValueError(f"the benchmark needs config.data.dataset='animal_mnist/horse2zebra'; "
                     f"got {config.data.dataset!r}")
  workdir.mkdir(parents=True, exist_ok=True)
  before = newest_step(workdir)
  if not eval_only:
    start = time.time()
    train.train_and_evaluate(config, str(workdir))
    timing = training_time(workdir, before, newest_step(workdir), time.time() - start)
  else:
    timing = training_time(workdir, before, before, 0.0)
  translator = inference.load_translator(workdir)
  steps = newest_step(workdir)

  cache_dir = (pathlib.Path(config.data.data_dir).expanduser() if config.data.data_dir
               else datasets.default_cache_dir())
  images, labels = datasets.fetch_animal_mnist(cache_dir)
  splits = [datasets.animal_mnist_split(labels, c) for c in range(len(datasets.ANIMAL_MNIST_CLASSES))]
  judge_train = np.concatenate([tr for tr, _ in splits])
  judge_test = np.concatenate([te for _, te in splits])
  judge, judge_accuracy = load_or_train_judge(images, labels, judge_train, judge_test,
                                              steps=judge_steps, cache_dir=cache_dir / "animal_mnist")

  horse_idx, zebra_idx = splits[HORSE][1][:num_test], splits[ZEBRA][1][:num_test]
  horses, zebras = images[horse_idx].astype(np.float32), images[zebra_idx].astype(np.float32)
  sources = datasets.animal_mnist_sources("horse2zebra", cache_dir, config.model.img_size)
  horses_64 = np.stack([sources["testA"][i] for i in range(len(horse_idx))])

  inception.fetch_weights()  # a no-op once the converted weights are cached
  weights = inception.load_weights()
  zebra_features = features(weights, zebras)
  kid_vs_zebras = lambda x: kid_x100(zebra_features, features(weights, x))
  zebra_rate = lambda x: float(np.mean(judge_predict(judge, x) == ZEBRA))

  def scores_28(translated: np.ndarray) -> dict:
    predicted = judge_predict(judge, translated)
    return {"judge_zebra_rate": float(np.mean(predicted == ZEBRA)),
            "judge_classes": class_shares(predicted),
            "mask_iou": float(mask_iou(horses, translated).mean()),
            "kid_x100": kid_vs_zebras(translated)}

  scores = lambda translated_64: scores_28(to_28(translated_64))

  translated_64 = translate_horses(translator, horses_64)
  shifted = np.roll(horses, 2, axis=2)
  train_zebras = images[splits[ZEBRA][0][:len(horses)]].astype(np.float32)
  zebras_in_horse_boxes = scores_28(np.stack([drawn_in_box(z, h) for z, h in zip(train_zebras, horses)]))
  results = {
      "steps": steps,
      **timing,
      # The run's own batch size, from its checkpoint (with --eval_only the flags' need not match).
      "train_img_per_s": (2 * translator.config.train.batch_size * timing["steps_timed"] / timing["train_wall_s"]
                          if timing["train_wall_s"] else None),
      "num_test": len(horse_idx),
      "judge_heldout_accuracy": judge_accuracy,
      **scores(translated_64),
      "baselines": {
          "judge_zebra_rate_raw_horses": zebra_rate(horses),
          "judge_zebra_rate_real_zebras": zebra_rate(zebras),
          "kid_x100_raw_horses": kid_vs_zebras(horses),
          "kid_x100_train_zebras_64_roundtrip": kid_vs_zebras(to_28(np.stack(
              [sources["trainB"][i] for i in range(min(num_test, len(sources["trainB"])))]))),
          "mask_iou_unrelated_zebra": float(mask_iou(horses, zebras[:len(horses)]).mean()),
          "mask_iou_horse_shifted_2px": float(mask_iou(horses, shifted).mean()),
          # Train zebras resized onto the test horses' foreground boxes (`drawn_in_box`).
          **{f"{k}_zebras_in_horse_boxes": zebras_in_horse_boxes[k] for k in CRITERIA},
      },
      # The scored checkpoint's own model settings (with --eval_only they need not match the flags').
      "config": {k: translator.config.model[k] for k in ("img_size", "ch", "n_res", "n_dis", "light")},
  }
  results["criteria"] = {k: f"{op} {bar}" for k, (op, bar) in CRITERIA.items()}
  results["pass"] = passes(results)
  results["passed"] = all(results["pass"].values())
  if every_checkpoint:
    results["checkpoints"] = []
    root = checkpoints.checkpoints_root(workdir)
    for step in checkpoints.list_steps(root):  # the newest is the one scored above
      scored = results if step == steps else scores(
          translate_horses(inference.load_translator(root / str(step)), horses_64))
      row = {"steps": step, **{k: scored[k] for k in CRITERIA}}
      results["checkpoints"].append({**row, "passed": all(passes(row).values())})
  save_grid(horses_64, translated_64, workdir / "benchmark_grid.png")
  results["grid"] = str(workdir / "benchmark_grid.png")
  (workdir / "benchmark.json").write_text(json.dumps(results, indent=2))
  return results


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(checkpoints.QuietOrbaxInfo())
  try:
    results = run_benchmark(_CONFIG.value, pathlib.Path(FLAGS.workdir), eval_only=FLAGS.eval_only,
                            num_test=FLAGS.num_test, judge_steps=FLAGS.judge_steps,
                            every_checkpoint=FLAGS.every_checkpoint)
  except preemption.TrainingInterrupted as e:  # Ctrl-C while training: the same command resumes
    print(f"Training {e}; nothing scored", file=sys.stderr)
    sys.exit(128 + e.signum)
  b = results["baselines"]
  print(f"steps {results['steps']}  train wall {results['train_wall_s'] / 60:.1f} min  "
        f"({results['train_img_per_s'] or 0:.2f} img/s)\n"
        f"judge held-out accuracy {results['judge_heldout_accuracy']:.3f}\n"
        f"judge 'zebra' rate  {results['judge_zebra_rate']:.3f}  (raw horses {b['judge_zebra_rate_raw_horses']:.3f})\n"
        f"judge's classes     " + ", ".join(f"{k} {v:.3f}" for k, v in results["judge_classes"].items()) + "\n"
        f"mask IoU            {results['mask_iou']:.3f}  (unrelated zebra {b['mask_iou_unrelated_zebra']:.3f}, "
        f"shifted 2 px {b['mask_iou_horse_shifted_2px']:.3f})\n"
        f"KIDx100 vs zebras   {results['kid_x100']:.3f}  (raw horses {b['kid_x100_raw_horses']:.3f}, "
        f"train zebras 28->64->28 {b['kid_x100_train_zebras_64_roundtrip']:.3f})\n"
        f"zebras drawn in the horses' boxes: judge {b['judge_zebra_rate_zebras_in_horse_boxes']:.3f}, "
        f"mask IoU {b['mask_iou_zebras_in_horse_boxes']:.3f}, KIDx100 {b['kid_x100_zebras_in_horse_boxes']:.3f}\n"
        f"pass: {results['passed']} {results['pass']}\n"
        f"{pathlib.Path(FLAGS.workdir) / 'benchmark.json'}, {results['grid']}")
  if "checkpoints" in results:
    print("every kept checkpoint:\n  steps  judge 'zebra'  mask IoU  KIDx100  pass")
    for row in results["checkpoints"]:
      print(f"  {row['steps']:5d}  {row['judge_zebra_rate']:13.3f}  {row['mask_iou']:8.3f}  "
            f"{row['kid_x100']:7.3f}  {row['passed']}")


if __name__ == "__main__":
  app.run(main)
