"""Sub-network splits, genomes and the cost/selection math of EMO-PMS (pure, no I/O).

A network with feature taps is cut at ``boundaries`` (tap names in forward order) into
sub-networks ``s = 1..S``; sub-network ``s`` runs the taps ``(b_{s-1}, b_s]`` with
``b_0`` = the input image. When mask groups are produced after the last boundary, one
more sub-network ``(b_S, logits]`` is appended. A mask group belongs to the
sub-network that PRODUCES it (the first one whose computation reads its mask), so the
stem goes to the first one; a top-level parameter module belongs to the first
sub-network that reads it (modules read by none, e.g. the classifier after the last
boundary, stay with the unpruned network).

Ownership is read off the program itself: the sub-network's forward pass is traced
abstractly (``jax.make_jaxpr`` on ``ShapeDtypeStruct`` inputs, nothing computed) and a
mask or parameter belongs to it iff some equation consumes it.

Genomes: one bit per channel of a sub-network's groups, concatenated in group order;
``layout(groups)`` gives ``group_index [G]`` (bit -> group id) for ``nsga2.repair``.

Cost: ``kdjax.pruning.cost.cost_table`` gives each layer's MACs as a monomial
``const · Π_g n_g`` in the kept channel counts ``n_g = Σ_c m_g[c]``; the functions below
evaluate it for masks of some groups only (the others at full width), for a sub-table of
the layers a sub-network touches, and for all combinations of candidates at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from kdjax.pruning import cost as cost_lib
from kdjax.pruning import saliency as saliency_lib

Masks = Mapping[str, ArrayLike]  # {group: [..., C_g]}

PROBE_SHAPE = (32, 32, 3)


class Subnet(NamedTuple):
    """One sub-network: taps ``(start, stop]`` (None = image / logits), its mask groups
    ``{group: C}`` in forward order and the top-level parameter modules it owns."""

    name: str
    start: str | None
    stop: str | None
    groups: dict
    modules: tuple


def default_boundaries(model: nn.Module) -> tuple[str, ...]:
    """The stage taps of a zoo model ("stage1", "stage2", ...): ResNet/WRN 3, VGG 5."""
    return tuple(t for t in model.taps() if t.startswith("stage"))


def _used_inputs(fn, *args):
    """Pytree of bools like ``args``: True where ``fn``'s traced program consumes the leaf."""
    closed = jax.make_jaxpr(fn)(*args)
    consumed = {id(v) for eqn in closed.jaxpr.eqns for v in eqn.invars}
    consumed |= {id(v) for v in closed.jaxpr.outvars}
    flags = [id(v) in consumed for v in closed.jaxpr.invars]
    return jax.tree.unflatten(jax.tree.structure(args), flags)


def _spans(model, boundaries: Sequence[str]) -> list[tuple[str | None, str | None]]:
    taps = model.taps()
    bad = [b for b in boundaries if b not in taps]
    if bad:
        raise ValueError(f"boundaries {bad} are not taps of the model; taps: {list(taps)}")
    order = [taps.index(b) for b in boundaries]
    if not boundaries or order != sorted(set(order)):
        raise ValueError(f"boundaries must be distinct taps in forward order, got {list(boundaries)}")
    starts = (None, *boundaries)
    return list(zip(starts, (*boundaries, None)))


def split(model: nn.Module, boundaries: Sequence[str],
          input_shape: Sequence[int] = PROBE_SHAPE) -> list[Subnet]:
    """Sub-networks of ``model`` cut at ``boundaries`` (see the module docstring).

    Raises ValueError for unknown/unordered boundaries or a sub-network with no group.
    """
    groups = model.mask_groups()
    image = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), image)
    taps = jax.eval_shape(lambda v, x: model.apply(v, x)[1], variables, image)
    masks = {g: jax.ShapeDtypeStruct((c,), jnp.float32) for g, c in groups.items()}
    assigned_groups, assigned_modules, subnets = set(), set(), []
    for start, stop in _spans(model, boundaries):
        h = image if start is None else taps[start]

        def forward(v, m, x, start=start, stop=stop):
            logits, feats = model.apply(v, x, masks=m, start=start, stop=stop)
            return feats[stop] if stop is not None else logits

        used_vars, used_masks, _ = _used_inputs(forward, variables, masks, h)
        mine = {g: c for g, c in groups.items() if used_masks[g] and g not in assigned_groups}
        modules = tuple(k for k, leaf in used_vars["params"].items()
                        if any(jax.tree.leaves(leaf)) and k not in assigned_modules)
        name = f"{start or 'input'}-{stop or 'logits'}"
        if not mine:
            if stop is None:
                continue  # nothing left to prune after the last boundary
            raise ValueError(f"sub-network {name} produces no mask group; drop boundary {stop!r}")
        assigned_groups |= set(mine)
        assigned_modules |= set(modules)
        subnets.append(Subnet(name, start, stop, mine, modules))
    return subnets


def split_groups(model: nn.Module, boundaries: Sequence[str],
                 input_shape: Sequence[int] = PROBE_SHAPE) -> list[dict[str, int]]:
    """``[{group: C}]`` per sub-network, covering every mask group exactly once."""
    return [s.groups for s in split(model, boundaries, input_shape)]


# --------------------------------------------------------------------------
# Genomes <-> masks
# --------------------------------------------------------------------------


def layout(groups: Mapping[str, int]) -> np.ndarray:
    """``group_index`` int32 [G] (G = Σ C): bit ``i`` belongs to the ``group_index[i]``-th group."""
    return np.concatenate([np.full(c, i, np.int32) for i, c in enumerate(groups.values())])


def genome_to_masks(genome: jax.Array | np.ndarray,
                    groups: Mapping[str, int]) -> dict[str, jax.Array]:
    """Bool/float genome [..., G] -> float32 masks {group: [..., C]} (consecutive slices)."""
    masks, offset = {}, 0
    for g, c in groups.items():
        masks[g] = jnp.asarray(genome[..., offset:offset + c], jnp.float32)
        offset += c
    return masks


def masks_to_genome(masks: Masks, groups: Mapping[str, int]) -> jax.Array:
    """Inverse of ``genome_to_masks``: bool [..., G]."""
    return jnp.concatenate([jnp.asarray(masks[g]) > 0 for g in groups], axis=-1)


# --------------------------------------------------------------------------
# Cost (on kdjax.pruning.cost.CostTable: MACs = Σ_layers const · Π_{g in term} n_g)
# --------------------------------------------------------------------------


def touching(table: cost_lib.CostTable, groups: Iterable[str]) -> cost_lib.CostTable:
    """The sub-table of layers whose MACs depend on one of ``groups`` (the layers a
    sub-network's masks shrink: its own, and the next layer reading its output)."""
    layers = tuple(l for l in table.layers if set(l.macs.groups) & set(groups))
    return cost_lib.CostTable(layers=layers, widths=table.widths)


def kept_counts(table: cost_lib.CostTable, masks: Masks) -> dict[str, Any]:
    """n_g = Σ_c masks[g][c] ([..., C] -> [...]) for groups in ``masks``, the full width
    C_g for the others."""
    counts = dict(table.widths)
    counts.update({g: jnp.sum(jnp.asarray(m, jnp.float32), axis=-1) for g, m in masks.items()})
    return counts


def macs(table: cost_lib.CostTable, masks: Masks) -> jax.Array:
    """MACs per image under masks of some groups (others unpruned); jnp, vmaps/jits,
    masks [P, C] give [P]. Equals cost.model_cost(model, shape, masks) for binary masks."""
    return cost_lib.counts_cost(table, kept_counts(table, masks))["macs"]


def retained_ratio(table: cost_lib.CostTable, masks: Masks) -> jax.Array:
    """Retained MACs ratio of the layers ``masks`` touch: with T = touching(table, masks),
    macs(T, masks) / macs(T, {}), in (0, 1]. The objective of a sub-network search."""
    sub = touching(table, masks)
    return macs(sub, masks) / cost_lib.counts_cost(sub, dict(table.widths))["macs"]


def combination_macs(table: cost_lib.CostTable, subnet_groups: Sequence[Mapping[str, int]],
                     kept: Sequence[Mapping[str, ArrayLike]]) -> np.ndarray:
    """Whole-network MACs of every combination of per-sub-network candidates.

    kept[s]: {group of sub-network s: int [K_s]} kept channels of its K_s candidates.
    Returns float64 [K_1, ..., K_S]: entry (p_1..p_S) = MACs of the network assembled
    from candidate p_s of every s (exact: n_g of sub-network s varies along axis s and
    the cost monomials broadcast).
    """
    shape = tuple(len(next(iter(k.values()))) for k in kept)
    counts = {}
    for s, groups in enumerate(subnet_groups):
        axis_shape = [1] * len(shape)
        axis_shape[s] = shape[s]
        for g in groups:
            counts[g] = np.asarray(kept[s][g], np.float64).reshape(axis_shape)
    total = sum(np.asarray(l.macs.value(counts), np.float64) for l in table.layers)
    return np.broadcast_to(total, shape).copy()


# --------------------------------------------------------------------------
# Candidate choice and global performance impairment ranking (GPIR)
# --------------------------------------------------------------------------


def spread_indices(values: ArrayLike, k: int) -> np.ndarray:
    """Up to ``k`` distinct indices of ``values`` [N] spread evenly over its range:
    for targets t_j = linspace(min, max, k), the nearest not-yet-chosen point; sorted."""
    values = np.asarray(values, np.float64)
    targets = np.linspace(values.min(), values.max(), min(k, len(values)))
    chosen: list[int] = []
    for t in targets:
        order = np.argsort(np.abs(values - t), kind="stable")
        chosen.append(int(next(i for i in order if i not in chosen)))
    return np.array(sorted(chosen, key=lambda i: (values[i], i)), np.int64)


def gpir_select(impairments: Sequence[ArrayLike], macs: ArrayLike,
                budget: float) -> tuple[tuple[int, ...], float]:
    """Min-Σ-impairment combination meeting a MACs budget.

    impairments: S arrays [K_s], Δ_s(p) (full-network loss increase with only
    sub-network s replaced by its candidate p); macs: [K_1..K_S] from
    ``combination_macs``; budget: max MACs (retained ratio target · unpruned MACs).
    Returns (indices tuple (p_1..p_S), Σ Δ). Ties go to the first in C order.
    Raises ValueError when no combination meets the budget.
    """
    macs = np.asarray(macs, np.float64)
    total = np.zeros(macs.shape)
    for s, delta in enumerate(impairments):
        axis_shape = [1] * macs.ndim
        axis_shape[s] = -1
        total = total + np.asarray(delta, np.float64).reshape(axis_shape)
    feasible = macs <= budget * (1 + 1e-9)
    if not feasible.any():
        raise ValueError(
            f"no combination of the candidates meets the MACs budget {budget:,.0f} "
            f"(smallest combination: {macs.min():,.0f} MACs); raise "
            f"emo.candidates_per_subnet / emo.generations, or loosen target_flops_ratio")
    flat = int(np.argmin(np.where(feasible, total, np.inf)))
    index = np.unravel_index(flat, macs.shape)
    return tuple(int(i) for i in index), float(total[index])


def brute_force_select(impairments: Sequence[ArrayLike], macs: np.ndarray,
                       budget: float) -> tuple[tuple[int, ...], float] | None:
    """Reference GPIR by enumeration (loops; for tests and small problems)."""
    best = None
    for combo in itertools.product(*(range(len(d)) for d in impairments)):
        if macs[combo] <= budget * (1 + 1e-9):
            cost = sum(float(d[i]) for d, i in zip(impairments, combo))
            if best is None or cost < best[1]:
                best = (combo, cost)
    return best


# --------------------------------------------------------------------------
# Uniform width scaling (baseline)
# --------------------------------------------------------------------------


def uniform_masks(groups: Mapping[str, int], keep: float,
                  round_to: int = 1) -> dict[str, jax.Array]:
    """Keep the first k = r(max(1, round(keep · C))) channels of every group: {group: f32 [C]}
    (r = ``saliency.round_counts`` to a multiple of round_to; 1 = no rounding)."""
    round_to = saliency_lib.check_round_to(round_to)
    out = {}
    for g, c in groups.items():
        k = int(saliency_lib.round_counts(int(np.clip(round(keep * c), 1, c)), c, round_to))
        out[g] = jnp.asarray(np.arange(c) < k, jnp.float32)
    return out


def uniform_for_budget(table: cost_lib.CostTable, groups: Mapping[str, int], budget: float,
                       iters: int = 40, round_to: int = 1) -> dict[str, jax.Array]:
    """Uniform masks with the largest keep fraction whose MACs are ≤ budget (bisection
    on keep ∈ (0, 1]; the per-group rounding, and the rounding to multiples of round_to,
    make MACs monotone non-decreasing in keep)."""
    cost = lambda keep: float(macs(table, uniform_masks(groups, keep, round_to)))
    lo, hi = 0.0, 1.0
    if cost(hi) <= budget:
        return uniform_masks(groups, hi, round_to)
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid)
    return uniform_masks(groups, lo, round_to)


# --------------------------------------------------------------------------
# Hypervolume reference
# --------------------------------------------------------------------------


def reference_point(initial_objectives: ArrayLike, ratio_margin: float = 0.05,
                    loss_factor: float = 1.1) -> np.ndarray:
    """Fixed 2-D hypervolume reference of a search: (1 + ratio_margin,
    loss_factor · max initial loss), from the initial population's [P, 2] objectives."""
    objectives = np.asarray(initial_objectives, np.float64)
    return np.array([1.0 + ratio_margin, loss_factor * float(objectives[:, 1].max())])
