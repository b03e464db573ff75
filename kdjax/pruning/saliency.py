"""Channel saliency per mask group, and pruning to a keep ratio or a MACs target.

Scores are dicts {group: float [C]}; larger = more important.
  taylor_scores   first-order Taylor |Σ a·∂L/∂a| — through the masks: with the model
                  computing a' = m ⊙ a at every place a group's channels are written,
                  ∂L/∂m_c at m = 1 equals Σ (over those places, positions and batch) of
                  a_c·∂L/∂a'_c, so the score is |∂L/∂m| (one jax.grad).
  l1_scores       Σ |w| of every conv kernel filter that PRODUCES the group's channels.
  bn_scale_scores Σ |γ| of every BatchNorm over the group's channels.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import models
from kdjax.pruning import compact as compact_lib
from kdjax.pruning import cost as cost_lib


def taylor_scores(loss_of_masks: Callable[[dict], jax.Array], masks: dict) -> dict:
    """|∂L/∂m| per channel, for ``loss_of_masks(masks) -> scalar`` evaluated at ``masks``."""
    grads = jax.grad(loss_of_masks)(masks)
    return {g: jnp.abs(v) for g, v in grads.items()}


def _owned_leaves(model, params):
    """Yield (leaf_name, array, owners-per-axis) for every parameter leaf."""
    owners = compact_lib.axis_owners(model)["params"]
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    for path, leaf in flat:
        node = owners
        for key in path:
            node = node[key.key]
        yield path[-1].key, np.asarray(leaf), node


def l1_scores(model, params) -> dict:
    """Σ |w| over the producing conv filters: for kernel [kh, kw, Cin, Cout] whose output
    axis belongs to group g, score_g[c] += Σ_{kh,kw,Cin} |w[..., c]|."""
    groups = models.mask_groups(model)
    scores = {g: np.zeros(c, np.float64) for g, c in groups.items()}
    for name, leaf, owner in _owned_leaves(model, params):
        if name == "kernel" and leaf.ndim == 4 and owner[3] is not None:
            scores[owner[3]] += np.abs(leaf).sum(axis=(0, 1, 2))
    return {g: jnp.asarray(s, jnp.float32) for g, s in scores.items()}


def bn_scale_scores(model, params) -> dict:
    """Σ |γ| over every BatchNorm whose channels belong to the group."""
    groups = models.mask_groups(model)
    scores = {g: np.zeros(c, np.float64) for g, c in groups.items()}
    for name, leaf, owner in _owned_leaves(model, params):
        if name == "scale" and leaf.ndim == 1 and owner[0] is not None:
            scores[owner[0]] += np.abs(leaf)
    return {g: jnp.asarray(s, jnp.float32) for g, s in scores.items()}


def removal_order(scores: dict, masks: dict) -> list[tuple[str, int]]:
    """Alive channels in the order they would be pruned, never emptying a group.

    Scores are normalised per group (divided by the group's mean score over alive
    channels) so that groups with different scales compete fairly; channels are taken
    in ascending normalised score, skipping a channel if it is its group's last.
    """
    entries, alive = [], {}
    for g, m in masks.items():
        m = np.asarray(m) > 0
        s = np.asarray(scores[g], np.float64)
        alive[g] = int(m.sum())
        scale = s[m].mean() if m.any() and s[m].mean() > 0 else 1.0
        entries += [(s[c] / scale, g, c) for c in np.flatnonzero(m)]
    order = []
    for _, g, c in sorted(entries, key=lambda e: (e[0], e[1], e[2])):
        if alive[g] > 1:
            alive[g] -= 1
            order.append((g, int(c)))
    return order


def _apply_removals(masks: dict, removals) -> dict:
    out = {g: np.asarray(m, np.float32).copy() for g, m in masks.items()}
    for g, c in removals:
        out[g][c] = 0.0
    return {g: jnp.asarray(m) for g, m in out.items()}


def prune_to(scores: dict, masks: dict, keep_ratio: float | None = None,
             macs_target: float | None = None, model=None, input_shape=None) -> dict:
    """Zero the lowest-scoring channels (see removal_order) until the target is met.

    keep_ratio: keep at most ceil(keep_ratio · total channels) channels overall.
    macs_target: prune the shortest prefix of removal_order whose masked MACs per image
      are ≤ macs_target (needs ``model`` and ``input_shape``); if even the full order
      cannot reach it, every group is left with one channel.
    Already-pruned channels stay pruned; every group keeps at least one channel.
    """
    if (keep_ratio is None) == (macs_target is None):
        raise ValueError("give exactly one of keep_ratio or macs_target")
    order = removal_order(scores, masks)
    if keep_ratio is not None:
        total = sum(np.asarray(m).size for m in masks.values())
        alive = sum(int(np.count_nonzero(m)) for m in masks.values())
        excess = max(0, alive - int(np.ceil(keep_ratio * total)))
        return _apply_removals(masks, order[:excess])
    if model is None or input_shape is None:
        raise ValueError("macs_target needs model and input_shape")
    table = cost_lib.layer_table(model, input_shape)
    macs = lambda k: float(cost_lib.masked_macs(table, _apply_removals(masks, order[:k])))
    lo, hi = 0, len(order)  # smallest k with macs(k) <= target (macs decreases with k)
    while lo < hi:
        mid = (lo + hi) // 2
        if macs(mid) <= macs_target:
            hi = mid
        else:
            lo = mid + 1
    return _apply_removals(masks, order[:lo])
