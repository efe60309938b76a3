"""Device mesh, the sharding rules, multi-process start-up and the jitted, sharded train step.

Owns: `create_mesh` (axes `data` x `model` from `config.mesh`), `state_shardings` (the one rule that
places every leaf of the train state: large tensors split over `model`, the rest replicated),
`jit_train_step` (jit with in/out shardings and the state donated), `global_batch` (host-local numpy
batches to global arrays sharded on `data`) and `initialize_distributed` (jax.distributed for runs of
several processes). On one device the same path is plain jit, so CPU tests exercise it.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"
# Leaves smaller than this (elements) stay replicated: splitting them saves little memory and costs a
# collective per use. The full generator's FC_0 kernel (268M) and its Adam moments are the reason for
# the model axis; the discriminators' 1024->2048 conv (33.6M) is the next largest.
MIN_SHARDED_SIZE = 1 << 20


def create_mesh(mesh_config=None, devices=None) -> Mesh:
  """A 2-D mesh (`data`, `model`) over `devices` (all by default).

  `mesh_config.model` (default 1) devices hold one copy of the model, its large tensors split among
  them; `mesh_config.data` = -1 uses every remaining device for data parallelism, a positive value that
  many replicas (an error if there are too few devices). Auto axis types give pjit-style propagation.
  """
  devices = list(jax.devices() if devices is None else devices)
  data = -1 if mesh_config is None else int(mesh_config.data)
  model = 1 if mesh_config is None else int(getattr(mesh_config, "model", 1))
  if data == 0 or data < -1:
    raise ValueError(f"config.mesh.data={data}: use -1 (all devices) or a positive device count")
  if model < 1 or len(devices) % model:
    raise ValueError(f"config.mesh.model={model}: must be >= 1 and divide the {len(devices)} visible "
                     "devices")
  if data == -1:
    data = len(devices) // model
  if data * model > len(devices):
    raise ValueError(f"config.mesh.data={data} x config.mesh.model={model} needs {data * model} devices "
                     f"but only {len(devices)} devices are visible")
  grid = np.array(devices[:data * model]).reshape(data, model)
  return Mesh(grid, (DATA_AXIS, MODEL_AXIS), axis_types=(AxisType.Auto, AxisType.Auto))


def leaf_spec(shape: tuple[int, ...], model_size: int, min_size: int = MIN_SHARDED_SIZE) -> P:
  """The sharding rule: a tensor of >= `min_size` elements is split over `model` along its largest
  dimension that the axis divides (FC_0's 1M inputs, a conv's output channels); else replicated."""
  if model_size == 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % model_size == 0:
      return P(*([None] * dim + [MODEL_AXIS]))
  return P()


def state_shardings(state_shapes, mesh: Mesh, min_size: int = MIN_SHARDED_SIZE):
  """Shardings for every leaf of a pytree (params, optimizer moments alike) from `leaf_spec`."""
  model_size = mesh.shape[MODEL_AXIS]
  return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(tuple(x.shape), model_size, min_size)),
                      state_shapes)


def bytes_per_device(state_shapes, shardings) -> int:
  """The largest per-device share of a pytree placed by `shardings` (from shapes only)."""
  per_device: dict = {}
  for x, s in zip(jax.tree.leaves(state_shapes), jax.tree.leaves(shardings)):
    shard = s.shard_shape(tuple(x.shape))
    for device in s.device_set:
      per_device[device] = per_device.get(device, 0) + math.prod(shard) * x.dtype.itemsize
  return max(per_device.values())


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def copies_on_this_process(shardings) -> bool:
  """Whether every sharding in the pytree puts a whole copy on each of its devices, all of this process."""
  return all(s.is_fully_replicated and s.is_fully_addressable for s in jax.tree.leaves(shardings))


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
  """Batch axis split over `data`: the leading axis, or the second under a leading steps axis."""
  return NamedSharding(mesh, P(None, DATA_AXIS) if stacked else P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  n = mesh.shape[DATA_AXIS]
  if batch_size < 1 or batch_size % n:
    raise ValueError(f"train.batch_size={batch_size} must be a positive multiple of the {n} devices on "
                     f"the '{DATA_AXIS}' mesh axis")


def jit_train_step(train_step: Callable, mesh: Mesh, state_sharding=None, stacked: bool = False) -> Callable:
  """`train_step(state, batch)` jitted: state placed by `state_sharding` (default: replicated) and
  donated, batch sharded on `data` (`stacked`: under a leading steps axis), metrics replicated.

  The losses are means over the global batch, so gradients are exact whatever the device count.
  """
  repl, batch = replicated(mesh), batch_sharding(mesh, stacked)
  state_sharding = repl if state_sharding is None else state_sharding
  return jax.jit(train_step, in_shardings=(state_sharding, batch), out_shardings=(state_sharding, repl),
                 donate_argnums=0)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, stacked: bool = False
                 ) -> dict[str, jax.Array]:
  """Host-local numpy arrays (this process's share of the batch) -> global arrays sharded on `data`."""
  sharding = batch_sharding(mesh, stacked)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def multiprocess_environment(env=None) -> str | None:
  """The cluster this process runs in when it is one of several processes (else None).

  SLURM (srun with several tasks), Open MPI (mpirun -n N) and multi-host Cloud TPU slices are the
  environments jax.distributed.initialize() detects by itself.
  """
  env = os.environ if env is None else env
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
    return "SLURM"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "Open MPI"
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or int(env.get("MEGASCALE_NUM_SLICES", "1") or 1) > 1:
    return "Cloud TPU pod"
  return None


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, env=None) -> bool:
  """Starts jax.distributed when the run has several processes; returns whether it did.

  Explicit coordinator settings win; otherwise the cluster is auto-detected (see
  `multiprocess_environment`). Must run before anything touches the devices.
  """
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    return True
  cluster = multiprocess_environment(env)
  if cluster is None:
    return False
  logging.info("Several processes (%s): starting jax.distributed", cluster)
  jax.distributed.initialize()
  return True
