"""The device mesh and how batches are laid out on it.

One mesh axis, ``'data'``, spans every device of every process; batches are
split along it and parameters are replicated. Under ``jax.jit`` this makes
BatchNorm statistics those of the global batch (SyncBN semantics).
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'
# The axes a batch is split over (every device takes its own examples).
BATCH_AXES = (DATA_AXIS,)


def make_mesh() -> Mesh:
  """A 1-D data-parallel mesh over all devices of all processes."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``'data'``; other axes whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, Any]:
  """This process's part of a batch -> global ``jax.Array``s on the mesh."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local.items()}


def device_batches(batches: Iterator[dict[str, np.ndarray]], mesh: Mesh,
                   prefetch: int = 2) -> Iterator[dict[str, Any]]:
  """Global batches, with up to ``prefetch`` already transferred ahead."""
  queue = []
  for local in batches:
    queue.append(global_batch(local, mesh))
    if len(queue) > prefetch:
      yield queue.pop(0)
  yield from queue


def wait_for_processes(name: str) -> None:
  """Returns once every process has called it with ``name`` (at once with
  one process). A coordination-service barrier, which waits minutes, not a
  device collective: CPU (gloo) collectives give up on a peer that reaches
  its first collective much later, as a host still compiling does."""
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(
        name, processes=set(range(jax.process_count())))
