"""Device mesh, shardings and the jitted, sharded train step.

Owns: `create_mesh` (a `data` axis from `config.mesh`), the state and batch shardings, `jit_train_step`
(jit with in/out shardings and the state donated) and `global_batch` (host-local numpy batches to
global arrays sharded on `data`). On one device the same path is plain jit, so CPU tests exercise it.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def create_mesh(mesh_config=None, devices=None) -> Mesh:
  """A 1-D mesh over `devices` (all by default) with the `data` axis.

  `mesh_config.data` = -1 takes every device; a positive value takes that many (an error if there are
  fewer). Auto axis types give pjit-style sharding propagation.
  """
  devices = list(jax.devices() if devices is None else devices)
  wanted = -1 if mesh_config is None else int(mesh_config.data)
  if wanted == 0 or wanted < -1:
    raise ValueError(f"config.mesh.data={wanted}: use -1 (all devices) or a positive device count")
  if wanted > len(devices):
    raise ValueError(f"config.mesh.data={wanted} but only {len(devices)} devices are visible")
  if wanted > 0:
    devices = devices[:wanted]
  return Mesh(np.array(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  n = mesh.shape[DATA_AXIS]
  if batch_size < 1 or batch_size % n:
    raise ValueError(f"train.batch_size={batch_size} must be a positive multiple of the {n} devices on "
                     f"the '{DATA_AXIS}' mesh axis")


def jit_train_step(train_step: Callable, mesh: Mesh) -> Callable:
  """`train_step(state, batch)` jitted: state replicated and donated, batch sharded on `data`.

  The losses are means over the global batch, so gradients are exact whatever the device count.
  """
  repl, batch = replicated(mesh), batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(repl, batch), out_shardings=(repl, repl), donate_argnums=0)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy arrays (this process's share of the batch) -> global arrays sharded on `data`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
