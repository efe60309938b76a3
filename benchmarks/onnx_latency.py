"""CPU latency of the ONNX export in onnxruntime against the JAX translator, in one run.

For one model (a run's newest checkpoint with --workdir, else a freshly initialised one of the given
shape: latency does not depend on the weights), it exports one direction to ONNX, opens it in
onnxruntime, and times that session and the JAX translator's jitted network
(`inference.translate_at_work_size`, the program `translate` runs, with the machine's convolution
implementation) on the same [-1, 1] batch, alternating the two call by call; then prints the medians
and their ratio per batch size, and the largest difference between the two outputs.

  python -m benchmarks.onnx_latency                                  # configs/demo.py's model
  python -m benchmarks.onnx_latency --img_size=256 --ch=64 --n_res=6 --batches=1,4
  python -m benchmarks.onnx_latency --workdir=runs/demo --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", help="time this run's newest checkpoint (default: a new model)")
  parser.add_argument("--img_size", type=int, default=64)
  parser.add_argument("--ch", type=int, default=32)
  parser.add_argument("--n_res", type=int, default=4)
  parser.add_argument("--n_dis", type=int, default=6)
  parser.add_argument("--full", action="store_true", help="the full generator (default: light)")
  parser.add_argument("--direction", default="A2B", choices=("A2B", "B2A"))
  parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
  parser.add_argument("--calls", type=int, default=20, help="timed calls of each, per batch size")
  parser.add_argument("--threads", type=int, default=0,
                      help="onnxruntime's intra-op threads (0: its default, every core)")
  parser.add_argument("--json", action="store_true", help="one JSON line instead of the table")
  return parser.parse_args(argv)


def make_translator(args):
  from configs import default
  from nicegan_jax import inference, models, train_state
  if args.workdir:
    return inference.load_translator(args.workdir)
  config = default.get_config()
  config.model.update(img_size=args.img_size, ch=args.ch, n_res=args.n_res, n_dis=args.n_dis,
                      light=not args.full)
  nets = models.create_models(config.model)
  state = train_state.create_train_state(config, jax.random.PRNGKey(0), nets)
  return inference.translator_from_state(config, nets, state)


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main(argv=None) -> dict:
  args = parse_args(argv)
  import onnxruntime as ort
  from nicegan_jax import convolutions, export, inference

  translator = make_translator(args)
  size = translator.config.model.img_size
  start = time.perf_counter()
  model = export.export_onnx(translator, args.direction)
  export_s = time.perf_counter() - start
  options = ort.SessionOptions()
  if args.threads:
    options.intra_op_num_threads = args.threads
  start = time.perf_counter()
  session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
  session_s = time.perf_counter() - start

  rows = []
  for batch in (int(b) for b in args.batches.split(",")):
    images = np.random.default_rng(batch).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    on_device = jax.device_put(images)
    run_jax = lambda: inference.translate_at_work_size(
        translator.encoders[args.direction], translator.generators[args.direction], on_device,
        models=translator.models, direction=args.direction).block_until_ready()
    run_onnx = lambda: session.run(None, {"images": images})[0]
    compile_s = timed(run_jax)  # the first call compiles
    run_onnx()  # and onnxruntime's first run allocates
    jax_s, onnx_s = [], []
    for _ in range(args.calls):
      jax_s.append(timed(run_jax))
      onnx_s.append(timed(run_onnx))
    difference = float(np.abs(np.asarray(run_jax()) - run_onnx()).max())
    rows.append({"batch": batch, "jax_ms": 1e3 * statistics.median(jax_s),
                 "onnxruntime_ms": 1e3 * statistics.median(onnx_s),
                 "onnx_vs_jax": statistics.median(onnx_s) / statistics.median(jax_s),
                 "jax_compile_s": compile_s, "max_abs_difference": difference})
  result = {"model": {"img_size": size, "ch": translator.config.model.ch,
                      "n_res": translator.config.model.n_res, "light": translator.config.model.light},
            "direction": args.direction, "backend": jax.default_backend(),
            "jax_conv_impl": convolutions.resolve(translator.config.model.conv_impl),
            "cpu_count": os.cpu_count(), "onnxruntime": ort.__version__, "jax": jax.__version__,
            "calls": args.calls, "export_s": export_s, "session_s": session_s, "rows": rows}
  if args.json:
    print(json.dumps(result))
    return result
  light = "light" if result["model"]["light"] else "full"
  print(f"{light} {size}x{size}, ch {result['model']['ch']}, n_res {result['model']['n_res']}, "
        f"{args.direction}; jax {jax.__version__} ({result['backend']}, {result['jax_conv_impl']} "
        f"convolutions) vs onnxruntime {ort.__version__}, {os.cpu_count()} cores; median of "
        f"{args.calls} calls each, alternating")
  print(f"export {export_s:.1f} s, onnxruntime session {session_s:.2f} s")
  print("| batch | JAX translator | onnxruntime | onnxruntime / JAX | JAX compile | max |difference| |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['batch']} | {r['jax_ms']:.1f} ms | {r['onnxruntime_ms']:.1f} ms | {r['onnx_vs_jax']:.2f}x "
          f"| {r['jax_compile_s']:.1f} s | {r['max_abs_difference']:.1e} |")
  return result


if __name__ == "__main__":
  sys.exit(main() and 0)
