"""The device mesh, and where batches and the train state live on it.

The mesh is ``'data'`` x ``'fsdp'`` over every device of every process
(config ``mesh_shape``; by default all devices on ``'data'``). Batches are
split over both axes: every device takes its own examples, and under
``jax.jit`` BatchNorm statistics are those of the global batch (SyncBN
semantics). Parameters, optimizer state and EMA are replicated over
``'data'``; with an ``'fsdp'`` axis of F > 1 devices each large array is
split F ways over it (ZeRO-3 / FSDP) and gathered where a layer uses it.
``jax.make_mesh`` makes the last axis the fastest-varying one, so the F
devices of an FSDP group are those of one host where F divides its device
count, and the gathers stay off the network between hosts.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
# The axes a batch is split over (every device takes its own examples).
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# Arrays of the state with fewer elements stay replicated under FSDP (norm
# scales, biases, small kernels): gathering them would cost a collective's
# latency for a few KiB of memory.
FSDP_MIN_SIZE = 2**16


def make_mesh(shape: tuple[int, int] = (-1, 1)) -> Mesh:
  """The (data, fsdp) mesh over all devices of all processes; a -1 stands
  for the devices the other axis leaves."""
  count = jax.device_count()
  data, fsdp = shape
  if data == -1 and fsdp > 0 and count % fsdp == 0:
    data = count // fsdp
  elif fsdp == -1 and data > 0 and count % data == 0:
    fsdp = count // data
  if data < 1 or fsdp < 1 or data * fsdp != count:
    raise ValueError(
        f'mesh_shape={tuple(shape)} does not lay out the {count} devices: '
        'set --config.mesh_shape="(D, F)" with D x F = '
        f'{count} (F devices share each parameter, FSDP; -1 for either '
        'takes the rest).')
  return jax.make_mesh((data, fsdp), (DATA_AXIS, FSDP_AXIS),
                       axis_types=(AxisType.Auto,) * 2)


def state_shardings(abstract_state: Any, mesh: Mesh,
                    min_size: int = FSDP_MIN_SIZE) -> Any:
  """Where each array of the train state lives: split over ``'fsdp'`` along
  its largest axis that the FSDP group divides, when it has ``min_size``
  elements or more; else (or without an FSDP axis) replicated."""
  group = mesh.shape[FSDP_AXIS]
  replicated = NamedSharding(mesh, PartitionSpec())

  def where(x):
    if group == 1 or x.size < min_size:
      return replicated
    for axis in sorted(range(x.ndim), key=lambda a: -x.shape[a]):
      if x.shape[axis] % group == 0:
        parts = [None] * x.ndim
        parts[axis] = FSDP_AXIS
        return NamedSharding(mesh, PartitionSpec(*parts))
    return replicated

  return jax.tree_util.tree_map(where, abstract_state)


def _split(where: NamedSharding) -> bool:
  """Whether ``where`` splits its array over the FSDP axis."""
  return FSDP_AXIS in jax.tree_util.tree_leaves(tuple(where.spec))


def fsdp_split(shardings: Any) -> bool:
  """Whether any array of ``shardings`` (``state_shardings``) is split."""
  return any(_split(s) for s in jax.tree_util.tree_leaves(shardings))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _cast_while_split(x: jax.Array, dtype, where: NamedSharding) -> jax.Array:
  # Cast on each device's part, then gathered whole: left to itself the
  # partitioner gathered float32, or kept a layer's output split over its
  # features and moved activations (all-to-all) to split the batch again.
  split = jax.lax.with_sharding_constraint(x.astype(dtype), where)
  return jax.lax.with_sharding_constraint(
      split, NamedSharding(where.mesh, PartitionSpec()))


def _cast_while_split_fwd(x, dtype, where):
  return _cast_while_split(x, dtype, where), jnp.zeros((), x.dtype)


def _cast_while_split_bwd(dtype, where, original, cotangent):
  # Back in the parameter's dtype before it is summed over the devices, as
  # data parallelism sums it.
  del dtype
  return (jax.lax.with_sharding_constraint(
      cotangent.astype(original.dtype), where),)


_cast_while_split.defvjp(_cast_while_split_fwd, _cast_while_split_bwd)


def gathered_in(params: Any, shardings: Any, dtype) -> Any:
  """``params`` for a forward pass under FSDP: each layer weight (a
  ``kernel``, which its layer casts to the compute ``dtype`` before its
  product) that ``shardings`` splits is cast while still split and gathered
  whole, so its all-gather moves ``dtype`` (half the bytes of the float32
  master weights in bfloat16) and no activation moves; its gradient is
  summed back onto the split in the parameter's dtype. The function is
  unchanged. The optimizer state, EMA and float32 weights stay split: the
  step holds one whole compute-dtype copy of the weights at a time."""
  def cast(path, x, where):
    if _split(where) and getattr(path[-1], 'key', None) == 'kernel':
      return _cast_while_split(x, jnp.dtype(dtype), where)
    return x
  return jax.tree_util.tree_map_with_path(cast, params, shardings)


def traced_on(mesh: Mesh, fn: Callable) -> Callable:
  """``fn``, traced with ``mesh`` as the context mesh, so that code inside
  it that splits work over the devices (``jax.shard_map``) sees them."""
  @functools.wraps(fn)
  def on_mesh(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return on_mesh


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over all devices (the mesh's batch axes);
  other axes whole."""
  return NamedSharding(mesh, PartitionSpec(
      tuple(a for a in BATCH_AXES if a in mesh.axis_names)))


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
