"""Evaluating a population of candidates: loop / vmap / ``lax.map`` chunks, optionally
sharded over the device mesh, and the choice between them by measurement.

A candidate function ``fn(x, *shared) -> y`` (x one row of the population [P, ...],
``shared`` the same for every candidate, e.g. weights and data) becomes
``evaluate(xs [P, ...], *shared) -> ys [P, ...]`` by one of

    "loop": y_i = fn(x_i) for i = 1..P written out one after another (P copies of the
            candidate's graph in one program; no batching of the candidates),
    "vmap": one batched program over all P candidates (``jax.vmap``),
    "map":  ``jax.lax.map`` over chunks of ``chunk`` candidates (a loop of vmapped
            chunks; chunk 0 or 1 = one candidate per iteration: one compiled
            single-candidate body reused, the in-program form of a host loop of
            single-candidate calls),

all with the same result. With a mesh of D > 1 devices the population is padded to a
multiple of D (copies of row 0, dropped again), split over the mesh's data axis
(``shard_map``: D slices of ⌈P / D⌉ candidates, the shared arguments replicated) and
each device evaluates its slice with the chosen strategy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

log = logging.getLogger(__name__)

STRATEGIES = ("loop", "vmap", "map")
# "backend": the strategy measured fastest per JAX backend. CPU: "loop" (resnet56 stage-2
# fitness, P = 20, batch 256, 2-core EPYC: loop 5.4, vmap 2.4, map-by-8 2.2 evaluations/s;
# BUILD_NOTES "Speed side by side"). Accelerators: "vmap" (one batched program; not
# measured here).
BACKEND_STRATEGY = {"cpu": "loop"}
CHOICES = ("backend", "auto") + STRATEGIES


def check_strategy(strategy: str, allow_auto: bool = True) -> str:
    """``strategy`` if valid, else a ValueError naming the choices."""
    valid = CHOICES if allow_auto else STRATEGIES
    if strategy not in valid:
        raise ValueError(f"unknown population evaluation {strategy!r}; valid: {', '.join(valid)}")
    return strategy


def candidate_strategies(choice: str, backend: str | None = None) -> tuple[str, ...]:
    """The strategies a search builds for ``choice``: all of them for "auto" (timed by
    ``fastest``), ``BACKEND_STRATEGY[backend]`` (default "vmap") for "backend", else
    ``(choice,)``. backend: a JAX backend name; None = ``jax.default_backend()``."""
    check_strategy(choice)
    if choice == "auto":
        return STRATEGIES
    if choice == "backend":
        return (BACKEND_STRATEGY.get(backend or jax.default_backend(), "vmap"),)
    return (choice,)


def batched(fn: Callable, strategy: str, chunk: int = 0) -> Callable:
    """``evaluate(xs [P, ...], *shared) -> [P, ...]`` from ``fn(x, *shared)`` (module
    docstring). jit-safe (P static)."""
    check_strategy(strategy, allow_auto=False)

    def evaluate(xs, *shared):
        one = lambda x: fn(x, *shared)  # noqa: E731
        if strategy == "vmap":
            return jax.vmap(one)(xs)
        if strategy == "map":
            return jax.lax.map(one, xs, batch_size=chunk if chunk > 1 else None)
        return jax.tree.map(lambda *ys: jnp.stack(ys), *[one(xs[i]) for i in range(xs.shape[0])])

    return evaluate


def sharded(evaluate: Callable, mesh: Mesh | None) -> Callable:
    """``evaluate`` with its population split over ``mesh``'s first axis (module
    docstring); unchanged for no mesh or a one-device mesh. The caller places the
    shared arguments (and the population) replicated on the mesh."""
    if mesh is None or mesh.size == 1:
        return evaluate
    data = PartitionSpec(mesh.axis_names[0])

    def split(xs, *shared):
        size = xs.shape[0]
        pad = -size % mesh.size
        if pad:
            xs = jnp.concatenate([xs, jnp.repeat(xs[:1], pad, axis=0)])
        body = jax.shard_map(evaluate, mesh=mesh,
                             in_specs=(data,) + (PartitionSpec(),) * len(shared),
                             out_specs=data)
        return jax.tree.map(lambda y: y[:size], body(xs, *shared))

    return split


def fastest(evaluators: Mapping[str, Callable], args: Sequence, repeats: int = 2) -> str:
    """The name of the fastest of ``evaluators`` on ``args``: each is jitted, called once
    (compile + run), then timed ``repeats`` times (best time); the times are logged."""
    times = {}
    for name, fn in evaluators.items():
        jitted = jax.jit(fn)
        jax.block_until_ready(jitted(*args))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(jitted(*args))
            best = min(best, time.perf_counter() - start)
        times[name] = best
    choice = min(times, key=times.get)
    log.info("population evaluation timed on %s: %s -> %s", jax.default_backend(),
             ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in times.items()), choice)
    return choice
