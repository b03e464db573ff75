"""Device mesh, shardings and host-to-global batch assembly.

One way to parallelise (DESIGN.md rule 6): a 1-D ``data`` mesh over the chosen
devices, parameters and optimizer state replicated, batches sharded on their
leading axis. On several hosts, ``jax.distributed.initialize()`` is called first
and each process feeds only its local slice of every global batch.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed(enabled: bool) -> None:
    """Join a multi-host run (Cloud TPU VM pods, multi-node GPU) when ``enabled``.

    Must run before any other JAX call. On a single host it is a no-op.
    """
    if enabled:
        jax.distributed.initialize()


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D ``data`` mesh over the first ``num_devices`` devices (0 = all).

    Raises ValueError if more devices are requested than exist.
    """
    devices = jax.devices()
    if num_devices and num_devices > len(devices):
        raise ValueError(
            f"train.num_devices={num_devices} but only {len(devices)} JAX devices exist "
            f"({devices[0].platform}). On CPU, simulate more with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count=N."
        )
    chosen = devices[: num_devices or len(devices)]
    return jax.make_mesh(
        (len(chosen),),
        (DATA_AXIS,),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=chosen,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy of an array on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding that splits an array's leading (batch) axis over the ``data`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    """Raise a clear error unless the global batch divides evenly over the mesh and processes."""
    n = mesh.size
    if global_batch_size % n:
        raise ValueError(
            f"batch size {global_batch_size} is not divisible by the {n} devices of the mesh; "
            f"choose a multiple of {n} or set --config.train.num_devices."
        )
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"batch size {global_batch_size} is not divisible by {jax.process_count()} processes"
        )


def to_global(batch: dict, mesh: Mesh) -> dict:
    """Assemble process-local numpy batches ``{key: [B_local, ...]}`` into global jax.Arrays.

    Each leaf becomes a ``[B_local * process_count, ...]`` array sharded on the batch axis.
    """
    sharding = batch_sharded(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )


def replicate(tree, mesh: Mesh):
    """Place a pytree of host or device arrays fully replicated on ``mesh``."""
    return jax.device_put(tree, replicated(mesh))
