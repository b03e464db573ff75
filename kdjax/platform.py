"""Process-level defaults that must be set before JAX starts (no JAX import here).

On CPU, XLA runs one convolution on all cores with little parallel efficiency for
the small images of CIFAR-style models; one simulated device per core, with the
batch sharded across them, is faster (measured in BUILD_NOTES.md). The command-line
entry points therefore ask XLA for ``cpu_devices()`` host devices unless the user
set ``--xla_force_host_platform_device_count`` in XLA_FLAGS. The flag only affects
the CPU platform: on GPU/TPU hosts JAX's default devices are the accelerators.
"""

from __future__ import annotations

import os
import sys

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# Simulated CPU devices meet at collectives (the gradient all-reduce). On a loaded
# machine one device's thread can be descheduled for many seconds, and XLA's default
# 40 s rendezvous limit then aborts the process; we wait much longer instead.
COLLECTIVE_TIMEOUT_FLAGS = (
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120",
    "--xla_cpu_collective_call_terminate_timeout_seconds=1800",
)


def cpu_devices() -> int:
    """Largest power of two ≤ min(number of cores, 8): divides the usual batch sizes."""
    cores = max(1, min(os.cpu_count() or 1, 8))
    return 1 << (cores.bit_length() - 1)


def configure_cpu_devices() -> bool:
    """Set XLA_FLAGS for ``cpu_devices()`` host devices; returns whether it did.

    Does nothing if JAX is already imported (too late to be sure it applies) or the
    user chose a device count.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "jax" in sys.modules or DEVICE_COUNT_FLAG in flags:
        return False
    os.environ["XLA_FLAGS"] = cpu_device_flags(flags, cpu_devices())
    return True


def cpu_device_flags(flags: str, count: int) -> str:
    """``flags`` plus ``count`` host devices and the longer collective timeouts."""
    extra = [f"{DEVICE_COUNT_FLAG}={count}"]
    extra += [f for f in COLLECTIVE_TIMEOUT_FLAGS if f.split("=")[0] not in flags]
    return " ".join([flags, *extra]).strip()
