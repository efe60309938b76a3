"""How far reduced-precision compute moves the training gradients away from float32's, on real images.

Owns the precision benchmark: for a model size it computes, at the same initial weights and on the same
batch of real images, the gradients of the G loss (w.r.t. the generators) and of the D loss (w.r.t. the
discriminators, encoders included) once in float32 and once per reduced compute dtype
(`model.dtype`: bfloat16, float16; parameters stay float32 either way), and reports per network:

  * `rel_err`: |g - g32| / |g32| over all of the network's weights;
  * `cosine`: the cosine of the angle between g and g32;
  * `underflow`: the fraction of weights whose float32 gradient is non-zero and whose gradient is zero
    (what a loss scale would rescue; float16's range is the narrow one);
  * `finite`: whether every gradient is finite (an overflow shows here);
  * `loss_rel_err`: the relative error of the loss itself.

`--loss_scale S` multiplies the losses by S before differentiating and divides the gradients by S
afterwards (a static loss scale), to see what a scale would change.

  python -m benchmarks.precision --img_size=128 --ch=32 --data=../shared/data/cat2dog_sample [--json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.speed import DefaultsShown, add_model_flags, check_model_flags, default_n_dis

REDUCED_DTYPES = ("bfloat16", "float16")


def make_config(args, dtype: str):
  from configs import default
  config = default.get_config()
  m = config.model
  m.img_size, m.ch, m.n_res, m.n_dis, m.light, m.dtype = (args.img_size, args.ch, args.n_res, args.n_dis,
                                                          not args.full, dtype)
  m.conv_impl = "xla"  # the CPU convolution paths compute in float32 whatever the dtype
  return config


def real_batch(data_dir: pathlib.Path, batch: int, img_size: int) -> dict[str, np.ndarray]:
  """The first `batch` images of testA/ and testB/ under `data_dir`, as the test transform makes them."""
  from nicegan_jax import datasets, input_pipeline
  out = {}
  for domain in "AB":
    files = datasets.require_images(data_dir / f"test{domain}")
    if len(files) < batch:
      raise datasets.DataError(f"{data_dir / f'test{domain}'} has {len(files)} images, --batch={batch}")
    out[domain] = np.stack([input_pipeline.test_transform(datasets.read_rgb(f), img_size=img_size)
                            for f in files[:batch]])
  return out


def gradients(config, batch: dict[str, np.ndarray], loss_scale: float = 1.0) -> dict[str, tuple]:
  """{"G": (loss, flat gradient), "D": (loss, flat gradient)} at the config's initial weights (seed 0)."""
  from nicegan_jax import models as models_lib, step, train_state
  models = models_lib.create_models(config.model)
  state = train_state.create_train_state(config, jax.random.PRNGKey(0), models)
  weights = {"adv_weight": float(config.loss.adv_weight)}
  g_weights = {**weights, "cycle_weight": float(config.loss.cycle_weight),
               "recon_weight": float(config.loss.recon_weight)}

  def g_loss(gen_params, disc_params, spectral, batch):
    loss = step.generator_loss(gen_params, disc_params, spectral, batch, models=models, **g_weights)[0]
    return loss_scale * loss

  def d_loss(disc_params, spectral, gen_params, batch):
    return loss_scale * step.discriminator_loss(disc_params, spectral, gen_params, batch, models=models,
                                                **weights)[0]

  @jax.jit  # weights and images as arguments, not constants XLA would fold
  def both(gen_params, disc_params, spectral, batch):
    return (jax.value_and_grad(g_loss)(gen_params, disc_params, spectral, batch),
            jax.value_and_grad(d_loss)(disc_params, spectral, gen_params, batch))

  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])
  results = both(state.gen_params, state.disc_params, state.spectral, batch)
  return {name: (float(loss) / loss_scale, flat(grads) / loss_scale)
          for name, (loss, grads) in zip("GD", results)}


def compare(reference: tuple, reduced: tuple) -> dict:
  """The fields of one network's row: `reduced` (loss, gradient) against float32's."""
  (loss32, g32), (loss, g) = reference, reduced
  norm32 = np.linalg.norm(g32)
  with np.errstate(invalid="ignore", over="ignore"):  # a non-finite gradient gives NaN, reported as such
      return {"rel_err": float(np.linalg.norm(g - g32) / norm32),
            "cosine": float(g @ g32 / (np.linalg.norm(g) * norm32)),
            "underflow": float(np.mean((g == 0) & (g32 != 0))),
            "finite": bool(np.isfinite(g).all()),
            "loss_rel_err": abs(loss - loss32) / abs(loss32)}


def measure(args) -> list[dict]:
  """One row per reduced dtype: the settings, then per network (G, D) the fields of `compare`."""
  images = real_batch(pathlib.Path(args.data), args.batch, args.img_size)
  batch = {domain: jnp.asarray(x) for domain, x in images.items()}
  reference = gradients(make_config(args, "float32"), batch)
  rows = []
  for dtype in args.dtypes:
    reduced = gradients(make_config(args, dtype), batch, args.loss_scale)
    row = {"dtype": dtype, "loss_scale": args.loss_scale, "img_size": args.img_size, "ch": args.ch,
           "n_res": args.n_res, "n_dis": args.n_dis, "light": not args.full, "batch": args.batch,
           "data": str(args.data), "device": jax.devices()[0].device_kind}
    for name in "GD":
      row[name] = compare(reference[name], reduced[name])
    rows.append(row)
  return rows


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=DefaultsShown)
  p.add_argument("--data", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" /
                                       "cat2dog_sample"),
                 help="a folder with testA/ and testB/ image folders (real photos)")
  add_model_flags(p, img_size=128, ch=32)
  p.add_argument("--batch", type=int, default=1, help="images per domain")
  p.add_argument("--dtypes", default=",".join(REDUCED_DTYPES),
                 help=f"comma-separated compute dtypes to compare with float32 "
                      f"(of {', '.join(REDUCED_DTYPES)})")
  p.add_argument("--loss_scale", type=float, default=1.0, help="static loss scale of the reduced runs")
  p.add_argument("--json", action="store_true", help="print one JSON line per dtype")
  args = p.parse_args(argv)
  args.dtypes = [d for d in args.dtypes.split(",") if d]
  unknown = sorted(set(args.dtypes) - set(REDUCED_DTYPES))
  if unknown or not args.dtypes:
    p.error(f"--dtypes={','.join(args.dtypes)}: use some of {', '.join(REDUCED_DTYPES)}")
  default_n_dis(args)
  if args.batch < 1 or args.loss_scale <= 0:
    p.error("--batch must be >= 1 and --loss_scale > 0")
  if not pathlib.Path(args.data).is_dir():
    p.error(f"--data={args.data}: no such folder (give one with testA/ and testB/ image folders)")
  check_model_flags(p, make_config(args, "float32").model)
  return args


def main(argv=None) -> int:
  args = parse(argv)
  from nicegan_jax import datasets
  try:
    rows = measure(args)
  except datasets.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for row in rows:
    if args.json:
      print(json.dumps(row))
      continue
    model = "light" if row["light"] else "full"
    print(f"{row['dtype']} (loss scale {row['loss_scale']:g}) vs float32, {model} {row['img_size']}px "
          f"ch {row['ch']} n_res {row['n_res']} batch {row['batch']}:")
    for name, label in (("G", "generators"), ("D", "discriminators")):
      r = row[name]
      print(f"  {label:14s} gradient rel. error {r['rel_err']:.4f}  cosine {r['cosine']:.5f}  "
            f"underflow {100 * r['underflow']:.3f}%  finite {r['finite']}  "
            f"loss rel. error {r['loss_rel_err']:.2e}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
