"""Test setup: project root on sys.path, 8 virtual CPU devices, a persistent XLA compilation cache,
main.py's garbage-collector thresholds, and a quick exit once the tests are done.

The devices and the cache are set in the environment, so the subprocesses the end-to-end tests start
(main.py) see the same devices and compile to the same cached programs as the tests themselves.
"""

import contextlib
import gc
import os
import pathlib
import sys

import pytest

# A test process traces and loads hundreds of programs and holds ~10^6 live objects; at Python's default
# thresholds the collector walks them all again and again: test_step.py and test_models.py in one process
# spent 6.1 of 110 s in it, 21 full collections, and 1.0 s, 2 full collections, with main.py's thresholds
# (GC_THRESHOLDS there), which the test processes take too.
gc.set_threshold(50_000, 20, 20)

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

# Compiling a NICE-GAN step takes tens of seconds on 2 CPU cores; identical programs (in this process
# and in the subprocesses the end-to-end tests start) are compiled once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path.home() / ".cache" / "nicegan_jax" / "jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()


# pytest-xdist's --dist loadfile hands the files out in a queue, one at a time as workers free up; a long
# file handed out last keeps one worker busy while the other idles. These go first, longest first (their
# cold times on 2 cores, 25 s to 4.5 minutes); the rest keep their alphabetical order. The first two start
# together and compile nothing in common: test_train.py, whose main.py run compiles the same configs/test.py
# programs as test_performance.py's first fixture, starts once that fixture has put them in the cache.
SLOWEST_FIRST = ("test_performance.py", "test_sharding.py", "test_step.py", "test_train.py",
                 "test_multiprocess.py", "test_crash_consistency.py", "test_translate.py", "test_evaluation.py",
                 "test_benchmarks.py", "test_torch_parity.py", "test_notebook.py", "test_preemption.py",
                 "test_convolutions.py", "test_demo.py", "test_onnx.py", "test_models.py",
                 "test_torch_pickle.py", "test_checkpoints.py", "test_export.py")


def pytest_configure(config):
  """Keeps the files in collection order in pytest-xdist's queue: by default (--loadscope-reorder) it
  sorts them by their number of tests, which puts many quick parametrised cases before long end-to-end
  runs."""
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  """Orders the files as SLOWEST_FIRST says (a stable sort: tests within a file keep their order)."""
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
  """Exempts everything still alive from the collections that follow the last test.

  A process that has imported torch, TensorFlow and JAX and compiled many programs holds ~10^6
  objects, and each full collection of them takes about a second here. pytest collects 5 times after
  the session ends, and a pytest-xdist worker reports finished before that: its controller interrupts
  a worker still busy 5 s later, which then prints a KeyboardInterrupt from inside JAX's gc callback.
  Frozen objects are never traversed again, so those collections take milliseconds.
  """
  del session
  gc.freeze()


def normal(seed: int, shape):
  """Standard-normal float32 test data (a jax.Array), drawn by NumPy: `jax.random.normal` compiles a
  program for every new shape (most of a second each here), and the tests draw dozens of shapes."""
  import jax.numpy as jnp
  import numpy as np
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def uniform(seed: int, shape, low: float = -1.0, high: float = 1.0):
  """Uniform float32 test data in [low, high), drawn by NumPy (see `normal`)."""
  import jax.numpy as jnp
  import numpy as np
  return jnp.asarray(np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32))


def image_size_and_mode(path) -> tuple[tuple[int, int], str]:
  """An image file's (width, height) and mode, with the file closed again."""
  from PIL import Image
  with Image.open(path) as image:
    return image.size, image.mode


# What `quick_compiles` sets, as environment variables: for a subprocess whose own programs all qualify.
QUICK_COMPILES_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}


@contextlib.contextmanager
def quick_compiles():
  """Programs compiled inside compile with XLA's backend optimisations off (jax_disable_most_optimizations):
  about 30% less compile time here, code a few times slower, and float rounding that differs in the last
  bits (the same optimised HLO, turned into machine code without LLVM's optimisations).

  Only for programs that are compiled once and run a few steps, whose results are compared with
  tolerances far above float rounding (reduced precision against float32, sharded against one device)
  or in ways rounding cannot touch (exact zeros, parameters left bit-identical).
  Programs shared with other tests through the cache (init, configs/test.py's steps) are compiled outside,
  since the setting is part of a program's cache key.
  """
  import jax
  previous = jax.config.values.get("jax_disable_most_optimizations", False)
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)


def four_image_step_config():
  """configs/test.py with 4 images a batch (they divide over 4 data devices) and D at twice G's rate.

  test_step.py's tests, test_sharding.py's light single-device run and test_multiprocess.py's in-process
  runs (one device and four) train with it, so one compiled step per device count serves them all (a
  program costs 15-30 s to compile here).
  """
  from configs import test as test_config
  config = test_config.get_config()
  config.train.batch_size = 4
  config.optimizer.disc_lr_scale = 2.0  # D's own rate, seen in the step's lr/D (the default is 1)
  return config


def write_tiny_checkpoint(checkpoints_dir, step: int, config=None):
  """Saves a freshly initialised model of `config` (default: configs/test.py) as training does, at
  `step` under `checkpoints_dir`; returns (config, models, state)."""
  import jax
  from configs import test as test_config
  from nicegan_jax import checkpoints, models, train_state
  config = config if config is not None else test_config.get_config()
  nets = models.create_models(config.model)
  state = train_state.create_train_state(config, jax.random.PRNGKey(0), nets)
  writer = checkpoints.Checkpointer(checkpoints_dir, async_save=False)
  writer.save(step, state, config.to_dict())
  writer.close()
  return config, nets, state
