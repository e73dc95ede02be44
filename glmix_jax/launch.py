"""Process start-up for the entry points: multi-host initialisation.

Multi-host: on a TPU pod slice or a SLURM / Open MPI GPU cluster, set
``GLMIX_JAX_DISTRIBUTED=1`` and ``jax.distributed`` finds its peers itself;
elsewhere set ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0),
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. Either must happen before JAX
touches a device, which is why the entry points call ``initialize()`` first.
"""

from __future__ import annotations

import os

import jax


def initialize() -> None:
  """``jax.distributed.initialize`` when the environment asks for it; quiets
  TensorFlow's C++ start-up logs (TFDS imports it later, in this process
  and in the input workers, which inherit the environment)."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  address = os.environ.get('JAX_COORDINATOR_ADDRESS')
  if address:
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=int(os.environ['JAX_NUM_PROCESSES']),
        process_id=int(os.environ['JAX_PROCESS_ID']))
  elif os.environ.get('GLMIX_JAX_DISTRIBUTED') == '1':
    jax.distributed.initialize()
  if jax.process_count() > 1:
    print(f'process {jax.process_index()} of {jax.process_count()}: '
          f'{jax.local_device_count()} local of {jax.device_count()} devices',
          flush=True)
