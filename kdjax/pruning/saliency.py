"""Channel saliency per mask group, and pruning to a keep ratio or a MACs target.

Scores are pytrees like the masks, {group: float [C_g]}; larger = more important.

Taylor (first order, Molchanov et al.): the models compute a' = m ⊙ a at every place
p where group g's channels are gated (a stream group is gated after the stem and
after every block of its stage), so by the chain rule, at the masks m,

    ∂L/∂m_c = Σ_p Σ_{batch, positions} a_{p,c} · ∂L/∂a'_{p,c},

which at m = 1 (a' = a) is Σ a·∂L/∂a summed over every place the group's mask
multiplies. The score is |∂L/∂m_c|: one ``jax.grad`` of the loss w.r.t. the mask
pytree, for any loss (CE, KD, ...), with no activation hooks.

L1 magnitude: Σ |w| of every conv kernel filter that produces the group's channels
(kernel [kh, kw, Cin, Cout] whose Cout axis the group owns, summed over kh, kw, Cin).

BN scale: Σ |γ| of every BatchNorm over the group's channels — the BN after the
producing conv, for a ResNet stream all BNs writing the stream (each block's bn2,
the projection shortcut's BN and the coupled stem BN); for a WRN stream, where no BN
writes the stream, the pre-activation BNs (and final BN) that read it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from kdjax import models
from kdjax.pruning import cost as cost_lib
from kdjax.pruning import masks as masks_lib


def taylor_scores(loss_fn: Callable[[dict], jax.Array],
                  masks: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """|∂L/∂m| per channel: ``loss_fn(masks) -> scalar`` differentiated at ``masks``.

    E.g. ``loss_fn = lambda m: kd_loss(model.apply(variables, x, masks=m)[0], ...)``.
    At all-ones masks this is the first-order Taylor saliency |Σ a·∂L/∂a| (module
    docstring); at binary masks it is that saliency for every kept channel (for a
    pruned channel, the first-order effect of reviving it). jit-safe.
    """
    grads = jax.grad(loss_fn)(dict(masks))
    return {g: jnp.abs(v) for g, v in grads.items()}


def _owned_params(model: nn.Module, params: Mapping):
    """(leaf name, array, axis owners) of every parameter leaf."""
    owners = masks_lib.axis_groups(model)
    for path, leaf in traverse_util.flatten_dict(dict(params)).items():
        yield path[-1], leaf, owners[("params", *path)]


def l1_scores(model: nn.Module, params: Mapping) -> dict[str, jax.Array]:
    """score_g[c] = Σ_{kernels K producing g} Σ_{kh, kw, Cin} |K[kh, kw, Cin, c]|.

    params: the model's ``params`` collection; returns {group: float32 [C_g]}. jit-safe.
    """
    scores = {g: jnp.zeros((c,), jnp.float32) for g, c in models.mask_groups(model).items()}
    for name, leaf, owner in _owned_params(model, params):
        if name == "kernel" and len(owner) == 4 and owner[-1] is not None:
            scores[owner[-1]] = scores[owner[-1]] + jnp.sum(jnp.abs(leaf), axis=(0, 1, 2))
    return scores


def bn_scale_scores(model: nn.Module, params: Mapping) -> dict[str, jax.Array]:
    """score_g[c] = Σ_{BatchNorms B over g's channels} |γ_B[c]| (see module docstring).

    params: the model's ``params`` collection; returns {group: float32 [C_g]}. jit-safe.
    """
    scores = {g: jnp.zeros((c,), jnp.float32) for g, c in models.mask_groups(model).items()}
    for name, leaf, owner in _owned_params(model, params):
        if name == "scale" and len(owner) == 1 and owner[0] is not None:
            scores[owner[0]] = scores[owner[0]] + jnp.abs(leaf)
    return scores


def normalize_scores(scores: Mapping[str, jax.Array], masks: Mapping[str, jax.Array],
                     method: str = "mean") -> dict[str, jax.Array]:
    """Per-group normalisation so that groups of different scales compete globally.

    s'_g = s_g / z_g over the alive channels A_g = {c : m_g[c] ≠ 0}, with
      "mean": z_g = mean_{c∈A_g} s_g[c]  (a channel of average importance scores 1,
              whatever the group's size),
      "l2":   z_g = sqrt(Σ_{c∈A_g} s_g[c]²)  (Molchanov et al. 2017; larger groups get
              smaller normalised scores, so they are pruned more),
      "none": z_g = 1.
    z_g = 1 where it would be 0 (all alive scores zero). jit-safe.
    """
    out = {}
    for g, m in masks.items():
        alive = m != 0
        s = jnp.asarray(scores[g], jnp.float32)
        if method == "mean":
            z = jnp.sum(jnp.where(alive, s, 0.0)) / jnp.maximum(jnp.sum(alive), 1)
        elif method == "l2":
            z = jnp.sqrt(jnp.sum(jnp.where(alive, s * s, 0.0)))
        elif method == "none":
            z = jnp.ones(())
        else:
            raise ValueError(f"unknown normalisation {method!r}; valid: 'mean', 'l2', 'none'")
        out[g] = s / jnp.where(z > 0, z, 1.0)
    return out


def check_round_to(round_to: int) -> int:
    """``round_to`` as an int ≥ 1, else a ValueError naming it."""
    if isinstance(round_to, bool) or int(round_to) != round_to or round_to < 1:
        raise ValueError(f"round_to must be an integer >= 1 (1 = off; e.g. 8/16 for CPU "
                         f"SIMD, 128 for TPU lanes), got {round_to!r}")
    return int(round_to)


def round_counts(kept: jax.typing.ArrayLike, width: jax.typing.ArrayLike,
                 round_to: int) -> jax.Array:
    """Kept-channel counts rounded down to a multiple of ``round_to``.

    r(k) = k                               if k = width (an unpruned group keeps its
                                           dense width, multiple or not),
         = k                               if k < round_to (a group narrower than the
                                           multiple keeps its width: never emptied),
         = round_to · ⌊k / round_to⌋       otherwise.
    r(k) ≤ k, so MACs (monotone in every count) never rise; r is non-decreasing in k.
    kept, width: broadcastable integer-valued arrays. jit-safe.
    """
    kept = jnp.asarray(kept)
    down = jnp.floor(kept / round_to) * round_to
    return jnp.where((kept >= width) | (kept < round_to), kept, down).astype(kept.dtype)


def round_masks(scores: Mapping[str, jax.Array], masks: Mapping[str, jax.Array],
                round_to: int) -> dict[str, jax.Array]:
    """Per group, keep the r(k_g) highest-scoring alive channels (``round_counts``,
    k_g = alive channels of group g, width C_g); the others are zeroed.

    scores, masks: {group: [C_g]} (binary masks). The result is a subset of ``masks``
    (so nesting with a parent level is kept). Ties go to the lower index. jit-safe.
    """
    round_to = check_round_to(round_to)
    out = {}
    for g, m in masks.items():
        live = m != 0
        size = live.shape[-1]
        keep = round_counts(jnp.sum(live), size, round_to)
        key = jnp.where(live, jnp.asarray(scores[g], jnp.float32), -jnp.inf)
        order = jnp.argsort(-key, stable=True)
        rank = jnp.zeros_like(order).at[order].set(jnp.arange(size))
        out[g] = jnp.where(live & (rank < keep), m, jnp.zeros_like(m))
    return out


def prune_to(scores: Mapping[str, jax.Array], masks: Mapping[str, jax.Array],
             keep_ratio: float | None = None, macs_target: float | None = None,
             model: nn.Module | None = None, input_shape: Sequence[int] | None = None,
             normalize: str = "mean", round_to: int = 1) -> dict[str, jax.Array]:
    """Zero the globally lowest-scoring alive channels until a target is met.

    scores, masks: {group: [C_g]} (binary masks; vmap for a population). Scores are
    normalised per group (``normalize_scores``, default: by the group's mean alive
    score), then all alive channels are ranked together in ascending order; the highest
    scoring alive channel of each group is never removed, so every group keeps ≥ 1
    channel; already-pruned channels stay pruned. Exactly one target:
      keep_ratio:  remove the k lowest, k = alive − round(keep_ratio · Σ_g C_g) (clipped
                   to what the one-per-group floor allows), so the kept fraction of all
                   channels is keep_ratio to within half a channel;
      macs_target: remove the shortest prefix of the ranking whose masked MACs per image
                   (``cost.counts_cost`` on ``model`` at ``input_shape`` (H, W, C)) are
                   ≤ macs_target; if none reaches it, every removable channel goes.
    round_to > 1: every group's kept count is then rounded down to a multiple of
    round_to (``round_counts``: unpruned groups and groups narrower than the multiple
    keep their count), dropping the group's lowest-scoring kept channels. With
    macs_target the prefix is chosen on the *rounded* MACs, i.e. the shortest prefix
    whose rounded widths are ≤ macs_target, so the budget still holds; with keep_ratio
    the kept fraction is ≤ keep_ratio (rounding only removes channels).
    Returns the new masks (same dtypes). jit-safe in scores, masks and the targets
    (model and input_shape are static).
    """
    if (keep_ratio is None) == (macs_target is None):
        raise ValueError("give exactly one of keep_ratio or macs_target")
    round_to = check_round_to(round_to)
    groups = list(masks)
    sizes = [int(jnp.shape(masks[g])[-1]) for g in groups]
    norm = normalize_scores(scores, masks, normalize)
    alive, candidate, keys = [], [], []
    for g in groups:
        live = masks[g] != 0
        best = jnp.argmax(jnp.where(live, norm[g], -jnp.inf))
        cand = live & (jnp.arange(live.shape[-1]) != best)
        alive.append(live)
        candidate.append(cand)
        keys.append(jnp.where(cand, norm[g], jnp.inf))
    alive, candidate = jnp.concatenate(alive), jnp.concatenate(candidate)
    order = jnp.argsort(jnp.concatenate(keys), stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    n_cand = jnp.sum(candidate)

    if keep_ratio is not None:
        target = jnp.round(keep_ratio * sum(sizes))
        k = jnp.clip(jnp.sum(alive) - target, 0, n_cand)
    else:
        if model is None or input_shape is None:
            raise ValueError("macs_target needs model and input_shape")
        table = cost_lib.cost_table(model, tuple(input_shape))
        group_of = np.repeat(np.arange(len(groups)), sizes)
        removed = jax.nn.one_hot(jnp.asarray(group_of)[order], len(groups))   # [N, G]
        alive_counts = jnp.stack([jnp.sum(a) for a in jnp.split(alive, np.cumsum(sizes)[:-1])])
        counts = alive_counts - jnp.concatenate([jnp.zeros((1, len(groups))),
                                          jnp.cumsum(removed, axis=0)])      # [N+1, G]
        if round_to > 1:
            counts = round_counts(counts, jnp.asarray(sizes, counts.dtype), round_to)
        macs = cost_lib.counts_cost(table, dict(zip(groups, counts.T)))["macs"]
        steps = jnp.arange(order.shape[0] + 1)
        feasible = (macs <= macs_target) & (steps <= n_cand)
        k = jnp.where(jnp.any(feasible), jnp.argmax(feasible), n_cand)

    remove = candidate & (rank < k)
    out, start = {}, 0
    for g, size in zip(groups, sizes):
        m = masks[g]
        out[g] = jnp.where(remove[start:start + size], jnp.zeros_like(m), m)
        start += size
    return round_masks(norm, out, round_to) if round_to > 1 else out
