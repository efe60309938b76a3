"""Entry point: flags, process/device logging, dispatch by mode.

  python main.py --config=configs/demo.py --workdir=runs/demo                       # train (resumes)
  python main.py --mode=translate --workdir=runs/demo --input=DIR_OR_FILE --output=DIR --direction=A2B
  python main.py --mode=test --workdir=runs/demo        # testA -> fakeB/, testB -> fakeA/ in the workdir
  python main.py --mode=evaluate --workdir=runs/demo    # the above, then FID / KIDx100 both ways
  python main.py --mode=import_torch --torch_checkpoint=cat2dog_params_latest.pt --workdir=runs/cat2dog
  python main.py --mode=export --workdir=runs/demo --output=horse2zebra.jaxexport --direction=A2B
  python main.py --mode=export --format=onnx --workdir=runs/demo --output=horse2zebra.onnx   # .[onnx]
  python main.py --mode=demo --workdir=runs/demo        # a page on http://127.0.0.1:7860 (.[demo])
"""

import gc
import os
import pathlib
import sys

# TensorFlow (imported by clu's writers and TFDS) runs no computation of ours; without this it announces
# its oneDNN CPU kernels at every start.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# Start-up (the imports, then tracing and loading the step) leaves about a million long-lived Python objects,
# and at Python's default thresholds (700, 10, 10) the collector walks all of them again and again: 3.4-4.3 s
# of a 4-step run of configs/test.py on 2 CPU cores (about 40 s) goes to it, in 11 full collections. Young
# collections every 50,000 allocations, full ones after 20 of the middle generation, bring it to 1.1-1.3 s
# with none (`python -m benchmarks.startup`). Cyclic garbage is still collected, full collections included.
GC_THRESHOLDS = (50_000, 20, 20)
gc.set_threshold(*GC_THRESHOLDS)

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from nicegan_jax import checkpoints, config_lib, convert, datasets, inception, preemption, sharding
from nicegan_jax import train
from nicegan_jax import export as export_lib
from nicegan_jax import inference as translate_lib
from nicegan_jax import translate_files

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (see configs/); train and import_torch "
                                "modes. Other modes read the config saved in the checkpoint.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard events, sample grids.")
flags.DEFINE_enum("mode", "train", ["train", "translate", "test", "evaluate", "import_torch", "export",
                                    "demo"],
                  "train: train or resume in --workdir (Ctrl-C or SIGTERM: a checkpoint at the step "
                  "reached, then a stop). translate: translate --input into --output. "
                  "test: translate the whole test split into <workdir>/test/fakeA, fakeB. "
                  "evaluate: test, then FID and KIDx100 of A2B (vs testB) and B2A (vs testA), written "
                  "to <workdir>/eval_<step>.json and TensorBoard. import_torch: convert an original "
                  "PyTorch checkpoint (--torch_checkpoint) into a checkpoint in --workdir. export: "
                  "write --direction's network, weights included, to the file --output, a program "
                  "that runs with JAX alone (jax.export) or, with --format=onnx, an ONNX model. "
                  "demo: serve a page to translate uploaded images (--host, --port, --share).")
flags.DEFINE_string("inception_weights", None, "evaluate: pytorch-fid's pt_inception-2015-12-05-*.pth "
                    "(default: the cached weights; `python -m nicegan_jax.inception --fetch`).")
flags.DEFINE_integer("max_images", 0, "test, evaluate: only the first N images of each test split "
                     "(0 = all; scores at different N are not comparable).", lower_bound=0)
flags.DEFINE_string("input", None, "translate: an image file or a folder (walked recursively).")
flags.DEFINE_string("output", None, "translate: the folder for the PNG outputs (sub-folders mirrored). "
                    "export: the file to write.")
flags.DEFINE_enum("direction", "A2B", list(translate_lib.DIRECTIONS), "translate, export: A2B or B2A.")
flags.DEFINE_list("platforms", list(export_lib.PLATFORMS), "export: the platforms the program is "
                  f"compiled for, some of {', '.join(export_lib.KNOWN_PLATFORMS)}.")
flags.DEFINE_enum("format", "jax", ["jax", "onnx"], "export: jax (a jax.export program, for "
                  "--platforms) or onnx (an ONNX model for onnxruntime; needs pip install '.[onnx]').")
flags.DEFINE_string("host", "127.0.0.1", "demo: the address to serve on (0.0.0.0: every interface).")
flags.DEFINE_integer("port", 7860, "demo: the port to serve on.", lower_bound=1, upper_bound=65535)
flags.DEFINE_bool("share", False, "demo: also serve through a public *.gradio.live link (e.g. on Colab).")
flags.DEFINE_bool("overwrite", False, "export: replace --output if it exists (otherwise refused).")
flags.DEFINE_bool("native", False, "translate: work at the input's own size (light models) instead of "
                  "the training size; outputs have the input's size either way.")
flags.DEFINE_string("torch_checkpoint", None, "import_torch: the original's <dataset>_params_latest.pt or "
                    "_params_<step>.pt. The model (light/full, ch, n_res, n_dis) is read from its "
                    "shapes; other settings (data, schedule, img_size of a light model) from --config "
                    "(default: configs/default.py).")
flags.DEFINE_bool("torch_optimizer", True, "import_torch: also import both Adam states and the step, so "
                  "training continues where the original stopped (false: weights only, step 0).")
flags.DEFINE_string("coordinator_address", None, "Several processes without a cluster manager: host:port "
                    "of process 0 (with --num_processes and --process_id). SLURM, Open MPI and Cloud "
                    "TPU pods are detected without these flags.")
flags.DEFINE_integer("num_processes", None, "With --coordinator_address: how many processes in total.")
flags.DEFINE_integer("process_id", None, "With --coordinator_address: this process's index (0 = chief).")
flags.DEFINE_string("compilation_cache_dir", None, "XLA's persistent compilation cache: a rerun, a resume "
                    "or a restart after preemption loads the compiled train step instead of compiling it "
                    "again (most of a minute on an accelerator). Default: $JAX_COMPILATION_CACHE_DIR, else "
                    "~/.cache/nicegan_jax/xla_cache ($NICEGAN_JAX_CACHE moves it); '' turns it off.")
flags.mark_flags_as_required(["workdir"])
for _name in ("workdir", "input", "output"):
  flags.register_validator(_name, lambda path: path is None or not checkpoints.is_url(path),
                           f"--{_name} takes a local path: {checkpoints.URLS_NOT_SUPPORTED}")

COMPILATION_CACHE_MAX_BYTES = 4 << 30  # least recently used programs are dropped beyond this


def enable_compilation_cache(path: str | None) -> None:
  """Points XLA's persistent compilation cache at `path` (None: $JAX_COMPILATION_CACHE_DIR, which JAX
  reads itself, else the nicegan_jax cache folder; '': off)."""
  if path is None:
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
      return
    path = str(datasets.default_cache_dir() / "xla_cache")
  if not path:
    return
  path = os.path.expanduser(path)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:  # a read-only home, say: run without the cache rather than warn at every compile
    logging.warning("No compilation cache: cannot create %s (%s)", path, e)
    return
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)


def run_translate() -> None:
  if not FLAGS.input or not FLAGS.output:
    raise app.UsageError("--mode=translate needs --input and --output")
  translator = translate_lib.load_translator(FLAGS.workdir)
  try:
    translate_lib.check_native(translator, FLAGS.native)
  except ValueError as e:
    raise app.UsageError(f"--native: {e}") from None
  report = translate_files.translate_folder(translator, FLAGS.input, FLAGS.output, FLAGS.direction,
                                            native=FLAGS.native)
  print(f"Wrote {len(report.written)} image(s) to {FLAGS.output}")
  for line in report.skipped:
    print(f"Not written (would overwrite an input): {line}")
  for line in report.unreadable:
    print(f"Unreadable: {line}")
  if report.unreadable or report.skipped:
    sys.exit(1)


def run_test() -> None:
  translator = translate_lib.load_translator(FLAGS.workdir)
  config = translator.config
  sources = datasets.load_domains(config.data, config.model.img_size)
  out = pathlib.Path(FLAGS.workdir) / "test"
  written = translate_files.translate_test_split(translator, sources, out, max_images=FLAGS.max_images)
  for name, files in written.items():
    print(f"Wrote {len(files)} image(s) to {out / name}")


def run_evaluate() -> None:
  from nicegan_jax import evaluation
  result = evaluation.evaluate_run(FLAGS.workdir, weights_file=FLAGS.inception_weights,
                                   max_images=FLAGS.max_images)
  writer = train.create_writer(FLAGS.workdir)
  writer.write_scalars(result["step"], {f"eval/{d}/{k}": result[d][k] for d in ("A2B", "B2A")
                                        for k in ("fid", "kid_x100")})
  writer.flush()
  for d in ("A2B", "B2A"):
    r = result[d]
    print(f"{d} (step {result['step']}): FID {r['fid']:.2f}  KIDx100 {r['kid_x100']:.3f} "
          f"(n_real {r['n_real']}, n_fake {r['n_fake']})")


def run_import_torch() -> None:
  if not FLAGS.torch_checkpoint:
    raise app.UsageError("--mode=import_torch needs --torch_checkpoint")
  step, config = convert.import_checkpoint(FLAGS.torch_checkpoint, FLAGS.workdir, FLAGS.config,
                                           with_optimizer=FLAGS.torch_optimizer, progress=True)
  print(f"Imported {FLAGS.torch_checkpoint} ({convert.describe(config.model)}) at step {step} into "
        f"{pathlib.Path(FLAGS.workdir) / 'checkpoints' / str(step)}")


def run_export() -> None:
  if not FLAGS.output:
    raise app.UsageError("--mode=export needs --output (the file to write)")
  if pathlib.Path(FLAGS.output).expanduser().is_dir():
    raise app.UsageError(f"--output={FLAGS.output} is a folder: --mode=export writes one file")
  export_lib.check_output(FLAGS.output, FLAGS.overwrite)  # before loading and exporting, not after
  try:
    platforms = export_lib.check_platforms(FLAGS.platforms)
  except ValueError as e:
    raise app.UsageError(f"--platforms: {e}") from None
  translator = translate_lib.load_translator(FLAGS.workdir)
  if FLAGS.format == "onnx":
    model = export_lib.export_onnx(translator, FLAGS.direction)
    path = export_lib.write_onnx(model, FLAGS.output, overwrite=FLAGS.overwrite)
    size = translator.config.model.img_size
    print(f"Wrote {FLAGS.direction} ({convert.describe(translator.config.model)}) to {path} "
          f"({path.stat().st_size / 2**20:.1f} MiB): ONNX, input 'images' float32 (N, {size}, {size}, 3) "
          f"in [-1, 1] -> output 'translated', the same. Run it with onnxruntime: "
          f"onnxruntime.InferenceSession({str(path)!r}).run(None, {{'images': images}})[0]")
    return
  exported = export_lib.export_translator(translator, FLAGS.direction, platforms)
  path = export_lib.write_exported(exported, FLAGS.output, overwrite=FLAGS.overwrite)
  print(f"Wrote {FLAGS.direction} ({convert.describe(translator.config.model)}) for "
        f"{', '.join(platforms)} to {path} ({path.stat().st_size / 2**20:.1f} MiB): "
        f"{exported.in_avals[0].str_short()} in [-1, 1] -> the same. Run it with JAX alone: "
        f"jax.export.deserialize(open({str(path)!r}, 'rb').read()).call(images)")


def run_demo() -> None:
  from nicegan_jax import demo
  try:
    demo.serve(FLAGS.workdir, host=FLAGS.host, port=FLAGS.port, share=FLAGS.share)
  except ModuleNotFoundError as e:
    if e.name != "gradio":
      raise
    sys.exit("error: --mode=demo needs Gradio: pip install '.[demo]' (or -r requirements-demo.txt)")
  except OSError as e:  # the port is taken, or the address is not this machine's
    if "port" not in str(e).lower():
      raise
    sys.exit(f"error: cannot serve on {FLAGS.host}:{FLAGS.port} ({' '.join(str(e).split())}); "
             "choose another --port")


def main(argv):
  logging.get_absl_handler().addFilter(checkpoints.QuietOrbaxInfo())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  enable_compilation_cache(FLAGS.compilation_cache_dir)
  sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  logging.info("JAX process %d of %d, %d local / %d global devices: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices())
  try:
    if FLAGS.mode == "train":
      if FLAGS.config is None:
        raise app.UsageError("--mode=train needs --config")
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "translate":
      run_translate()
    elif FLAGS.mode == "test":
      run_test()
    elif FLAGS.mode == "evaluate":
      run_evaluate()
    elif FLAGS.mode == "import_torch":
      run_import_torch()
    elif FLAGS.mode == "export":
      run_export()
    elif FLAGS.mode == "demo":
      run_demo()
  except (config_lib.ConfigError, datasets.DataError, train.NonFiniteLossError, FileNotFoundError,
          inception.WeightsError, convert.ConversionError, checkpoints.CheckpointError,
          translate_files.OutputError, FileExistsError, export_lib.MissingExtraError) as e:
    sys.exit(f"error: {e}")  # one line, exit status 1
  except preemption.TrainingInterrupted as e:  # the shell's code for death by that signal: 130, 143
    logging.warning("%s", e)
    print(f"Training {e}", file=sys.stderr)
    sys.exit(128 + e.signum)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with an unknown `--config.<field>` reported in one line (ml_collections
  raises an AttributeError or KeyError for it while the flags are parsed, before main runs)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    text = (str(e.args[0]) if e.args else str(e)).replace("\\n", "\n").replace("\\'", "'")
    key, _, hint = text.strip("'\"").partition("\n")
    key = key.strip("'\"")
    named = [a.split("=")[0] for a in argv[1:]
             if a.startswith("--config.") and key in a.split("=")[0].split(".")[1:]]
    sys.exit(f"error: {named[0] if named else '--config.' + key}: no such config field"
             f"{' (' + hint.strip() + ')' if hint.strip() else ''}; configs/default.py lists every field")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
