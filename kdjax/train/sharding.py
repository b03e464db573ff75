"""Device mesh, shardings and host-to-global batch assembly.

One way to parallelise (docs/architecture.md): a 1-D ``data`` mesh over the chosen
devices, parameters and optimizer state replicated, batches sharded on their
leading axis. On several hosts, ``jax.distributed.initialize()`` is called first
and each process feeds only its local slice of every global batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def distributed_kwargs(train: Mapping[str, Any]) -> dict[str, Any] | None:
    """Arguments for ``jax.distributed.initialize`` from the ``train`` config section.

    Keys: ``distributed`` (bool), ``coordinator_address`` (``"host:port"``, ``""`` =
    auto-detect), ``num_processes`` and ``process_id`` (``-1`` = auto-detect). Returns
    None when ``distributed`` is False. Auto-detected values are passed as None, so JAX
    reads them from the cluster environment (Cloud TPU VM, Slurm, ...); explicit ones
    are needed elsewhere (several GPU machines, a localhost test). Raises ValueError for
    explicit settings without ``distributed=True``, ``num_processes < 1`` or a
    ``process_id`` outside ``[0, num_processes)``.
    """
    address = train.get("coordinator_address", "")
    num_processes = train.get("num_processes", -1)
    process_id = train.get("process_id", -1)
    if not train.get("distributed", False):
        if address or num_processes != -1 or process_id != -1:
            raise ValueError(
                "train.coordinator_address/num_processes/process_id are set but "
                "train.distributed=False; add --config.train.distributed=True"
            )
        return None
    if num_processes != -1 and num_processes < 1:
        raise ValueError(f"train.num_processes={num_processes}; valid: -1 (auto-detect) or >= 1")
    if process_id != -1 and (process_id < 0 or num_processes != -1 and process_id >= num_processes):
        valid = ">= 0" if num_processes == -1 else f"0..{num_processes - 1}"
        raise ValueError(f"train.process_id={process_id}; valid: -1 (auto-detect) or {valid}")
    return dict(
        coordinator_address=address or None,
        num_processes=None if num_processes == -1 else num_processes,
        process_id=None if process_id == -1 else process_id,
    )


def initialize_distributed(train: Mapping[str, Any]) -> None:
    """Join a multi-process run (Cloud TPU VM pods, several GPU hosts) when
    ``train.distributed`` is True, with the settings of :func:`distributed_kwargs`.

    Must run before any other JAX call. A no-op when ``train.distributed`` is False
    or when this process has already joined (pipelines with several stages).
    """
    kwargs = distributed_kwargs(train)
    if kwargs is not None and not jax.distributed.is_initialized():
        use_cpu_collectives()
        jax.distributed.initialize(**kwargs)


def use_cpu_collectives() -> None:
    """Give the CPU backend a cross-process collectives implementation (gloo over TCP)
    unless one is configured already.

    Without one, a computation spanning the CPU devices of several processes (the
    localhost multi-process run, host-side reductions on TPU/GPU hosts) fails; recent
    JAX versions default to gloo, older ones to none. Must run before the CPU backend
    is created, hence before ``jax.distributed.initialize``.
    """
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


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
