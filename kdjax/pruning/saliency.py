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


def prune_to(scores: Mapping[str, jax.Array], masks: Mapping[str, jax.Array],
             keep_ratio: float | None = None, macs_target: float | None = None,
             model: nn.Module | None = None, input_shape: Sequence[int] | None = None,
             normalize: str = "mean") -> dict[str, jax.Array]:
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
    Returns the new masks (same dtypes). jit-safe in scores, masks and the targets
    (model and input_shape are static).
    """
    if (keep_ratio is None) == (macs_target is None):
        raise ValueError("give exactly one of keep_ratio or macs_target")
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
    return out
