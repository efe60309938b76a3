"""How long the FID Inception takes per batch with each convolution implementation, in one run.

Times the evaluation's feature program (`evaluation.features_of_uint8`: uint8 images, bilinear to 299,
Inception pool features; what FID and KID run) with `conv_impl="xla"` (XLA's convolution everywhere)
and `conv_impl="cpu"` (the unpadded convolutions as `inception._unpadded_conv_on_cpu` runs them),
alternating the two call by call on the same random batch; prints the medians, their ratio and the
largest difference between the two feature sets (0 when XLA computes both alike).

  python -m benchmarks.inception_speed                  # 50 images of 256x256, 5 calls each
  python -m benchmarks.inception_speed --batch=8 --calls=3 --json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=50, help="images per call (the evaluation's batch)")
  parser.add_argument("--size", type=int, default=256, help="height and width of the input images")
  parser.add_argument("--calls", type=int, default=5, help="timed calls of each implementation")
  parser.add_argument("--inception_weights", help="a weights file (default: the fetched ones)")
  parser.add_argument("--json", action="store_true", help="one JSON line instead of the text")
  args = parser.parse_args(argv)
  for name in ("batch", "size", "calls"):
    if getattr(args, name) < 1:
      parser.error(f"--{name}={getattr(args, name)}: must be >= 1")
  return args


def timed(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def measure(args) -> dict:
  from nicegan_jax import convolutions, evaluation, inception
  weights = inception.load_weights(args.inception_weights)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3),
                                                         dtype=np.uint8))
  programs = {impl: functools.partial(evaluation.features_of_uint8, weights, conv_impl=impl)
              for impl in convolutions.IMPLS}
  compile_s = {impl: timed(lambda p=program: p(images)) for impl, program in programs.items()}
  seconds = {impl: [] for impl in programs}
  for _ in range(args.calls):
    for impl, program in programs.items():
      seconds[impl].append(timed(lambda p=program: p(images)))
  outputs = {impl: np.asarray(program(images)) for impl, program in programs.items()}
  median = {impl: statistics.median(s) for impl, s in seconds.items()}
  return {"batch": args.batch, "size": args.size, "calls": args.calls, "backend": jax.default_backend(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "first_call_s": compile_s, "median_s": median,
          "xla_vs_cpu": median["xla"] / median["cpu"],
          "max_abs_difference": float(np.abs(outputs["xla"] - outputs["cpu"]).max())}


def main(argv=None) -> int:
  args = parse_args(argv)
  from nicegan_jax import inception
  try:
    result = measure(args)
  except inception.WeightsError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(result))
    return 0
  print(f"FID Inception features of {args.batch} images of {args.size}x{args.size}; jax {result['jax']} "
        f"({result['backend']}), {result['cpu_count']} cores; median of {args.calls} calls each, alternating")
  for impl, seconds in result["median_s"].items():
    print(f"  conv_impl={impl}: {seconds:.3f} s per call ({args.batch / seconds:.1f} img/s; "
          f"first call {result['first_call_s'][impl]:.1f} s)")
  print(f"  xla / cpu: {result['xla_vs_cpu']:.2f}x; largest feature difference "
        f"{result['max_abs_difference']:.1e}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
