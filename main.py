"""Entry point: flags, process/device logging, dispatch by mode.

  python main.py --config=configs/selfie2anime.py --workdir=runs/s2a
  python main.py --config=configs/demo.py --workdir=runs/demo --config.train.num_steps=200
"""

import logging as pylogging
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from nicegan_jax import config_lib, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (see configs/).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard events, sample grids.")
flags.DEFINE_enum("mode", "train", ["train"], "What to do: train (resumes from the workdir).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbaxInfo(pylogging.Filter):
  """Orbax narrates every save at INFO; keep its warnings and errors only."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  logging.get_absl_handler().addFilter(_QuietOrbaxInfo())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.info("JAX process %d of %d, %d local / %d global devices: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices())
  try:
    if FLAGS.mode == "train":
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (config_lib.ConfigError, train.NonFiniteLossError) as e:
    logging.error("%s", e)
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
