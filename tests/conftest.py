"""Test setup: project root on sys.path, 4 virtual CPU devices, a persistent XLA compilation cache."""

import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

# Compiling a NICE-GAN step takes tens of seconds on 2 CPU cores; identical programs (in this process
# and in the subprocesses the end-to-end tests start) are compiled once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path.home() / ".cache" / "nicegan_jax" / "jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_num_cpu_devices", 4)
