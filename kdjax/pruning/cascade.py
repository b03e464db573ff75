"""Nested masks, MACs targets, pruning events and the joint loss of cascaded TA pruning.

One network, L = K + 2 levels k = 0..L−1 (teacher, K teaching assistants, student). Level
k runs the shared weights under binary channel masks m_k; the masks of all levels are one
pytree with a leading level axis, ``{group: float32 [L, C_g]}``, and they are NESTED:

    1 = m_0 ≥ m_1 ≥ … ≥ m_{L−1}   elementwise (a channel alive in level k is alive in k−1).

Targets, as retained-MACs ratios R = MACs(masked) / MACs(unpruned) (kdjax.pruning.cost), with
ρ = the student's target:
  final, per level      geometric  r_k = ρ^{k/(L−1)}          linear  r_k = 1 − (k/(L−1))(1 − ρ)
  after event e of E    geometric  r_k^{(e)} = r_k^{e/E}      linear  r_k^{(e)} = 1 − (e/E)(1 − r_k)
so every level reaches its final target at the last event (e = E), and r_0 = 1 always.

A pruning event updates the levels in order k = 1..L−1, each after its parent:

    key_k[c] = ŝ_k[c] if m_k[c] = 1 else −1,   ŝ_k = s_k normalised per group over m_k's alive
    m_k ← prune_to(key_k, m_{k−1}^{new}, macs ≤ r_k^{(e)} · MACs(1))

i.e. level k restarts from its parent's new mask and drops the lowest keys until its MACs
target: channels it had already dropped go first (key −1 < any saliency), then its own
lowest-saliency channels. Hence: nesting holds by construction; ``prune_to`` keeps the best
channel of every group, so no group empties (a channel a level had dropped comes back only
if its parent's pruning left the group empty otherwise, or pushed the level below its own
target); and each level stops at the shortest prefix meeting its target (exact).

Saliency s_k: first-order Taylor |∂L_k/∂m_k| (kdjax.pruning.saliency) of the level's OWN
pair loss L_k = γ·CE(z_k, y) + D(z_{k−1} → z_k) (L_0 = γ·CE(z_0, y)), computed for all
levels in one backward pass (``cascade_grads``) and averaged over the steps between events.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import losses
from kdjax.pruning import saliency as saliency_lib

SPACINGS = ("geometric", "linear")


def num_levels(num_tas: int) -> int:
    """L = K + 2 (teacher, K TAs, student); ValueError for K < 0."""
    if int(num_tas) != num_tas or num_tas < 0:
        raise ValueError(f"cascade.num_tas must be an integer ≥ 0, got {num_tas!r}")
    return int(num_tas) + 2


def _interpolate(end: np.ndarray, fraction: np.ndarray, spacing: str) -> np.ndarray:
    """1 → end at fraction 0 → 1: end**fraction (geometric) or 1 − fraction·(1 − end)."""
    if spacing == "geometric":
        return end ** fraction
    if spacing == "linear":
        return 1.0 - fraction * (1.0 - end)
    raise ValueError(f"unknown cascade.spacing {spacing!r}; valid: {', '.join(SPACINGS)}")


def level_ratios(target: float, levels: int, spacing: str = "geometric") -> np.ndarray:
    """Final retained-MACs ratio of every level, float64 [L]: r_0 = 1, r_{L−1} = target
    (module docstring). ValueError unless 0 < target ≤ 1 and L ≥ 2."""
    if not 0.0 < float(target) <= 1.0:
        raise ValueError(f"target_flops_ratio must be in (0, 1], got {target}")
    if levels < 2:
        raise ValueError(f"a cascade needs at least 2 levels (teacher, student), got {levels}")
    return _interpolate(np.float64(target), np.arange(levels) / (levels - 1), spacing)


def event_ratios(final: np.ndarray, num_events: int, spacing: str = "geometric") -> np.ndarray:
    """Retained-MACs ratio of every level after each event, float64 [E, L]; row E−1 equals
    ``final`` (module docstring). ValueError unless E ≥ 1."""
    if int(num_events) != num_events or num_events < 1:
        raise ValueError(f"cascade.num_events must be an integer ≥ 1, got {num_events!r}")
    fraction = (np.arange(1, num_events + 1) / num_events)[:, None]
    return _interpolate(np.asarray(final, np.float64)[None, :], fraction, spacing)


def nested_ones(groups: Mapping[str, int], levels: int) -> dict[str, jax.Array]:
    """All-ones masks of every level, {group: float32 [L, C_g]}."""
    return {g: jnp.ones((levels, c), jnp.float32) for g, c in groups.items()}


def level(tree: Any, k: int) -> Any:
    """Level k of a level-stacked pytree (every leaf indexed on its leading axis)."""
    return jax.tree.map(lambda x: x[k], tree)


def is_nested(masks: Mapping[str, Any]) -> bool:
    """True iff masks {group: [L, C]} are binary, level 0 is all ones, and every level is
    contained in the one before it (host-side check, NumPy)."""
    for m in masks.values():
        m = np.asarray(m)
        if not (np.all((m == 0) | (m == 1)) and np.all(m[0] == 1) and np.all(m[1:] <= m[:-1])):
            return False
    return True


def prune_event(scores: Mapping[str, jax.Array], masks: Mapping[str, jax.Array],
                macs_targets: jax.Array, model, input_shape,
                normalize: str = "mean", round_to: int = 1) -> dict[str, jax.Array]:
    """One pruning event over all levels (module docstring).

    scores, masks: {group: [L, C_g]} (saliency ≥ 0; nested binary masks); macs_targets:
    [L] MACs per image each level must reach (entry 0 unused: the teacher stays whole);
    model, input_shape (H, W, C): the network and input the MACs refer to (static);
    normalize: per-group normalisation of the saliencies (``saliency.normalize_scores``);
    round_to: kept widths rounded down to multiples (``saliency.prune_to``; rounding only
    removes channels of the level's own pruning, so nesting still holds).
    Returns the new nested masks {group: [L, C_g]}. jit-safe.
    """
    groups = list(masks)
    new = [level(masks, 0)]
    for k in range(1, next(iter(masks.values())).shape[0]):
        own, parent = level(masks, k), new[-1]
        norm = saliency_lib.normalize_scores(level(scores, k), own, normalize)
        keys = {g: jnp.where(own[g] != 0, norm[g], -1.0) for g in groups}
        new.append(saliency_lib.prune_to(keys, parent, macs_target=macs_targets[k],
                                         model=model, input_shape=input_shape,
                                         normalize="none", round_to=round_to))
    return {g: jnp.stack([m[g] for m in new]) for g in groups}


def cascade_loss(outputs: Any, batch: Mapping, pair_loss: Callable, ce_weight: float,
                 stop_gradient: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Σ_k L_k with L_k = γ·CE(z_k, y) + D(t_k → s_k) for k ≥ 1 and L_0 = γ·CE(z_0, y).

    outputs: the levels' outputs, level-stacked: a named tuple with ``logits`` [L, B, K]
    and ``features`` {tap: [L, ...]} (the distillation interface's ``Outputs``);
    pair_loss(student, teacher, batch) -> (scalar, metrics) for ONE level's outputs (any
    distillation method); γ = ce_weight; t_k = level k−1, wrapped in ``stop_gradient``
    when ``stop_gradient``. Returns (total, metrics) with "loss" and per-level
    "level{k}/ce", "level{k}/accuracy", "level{k}/<pair metric>".
    """
    logits, labels = outputs.logits, batch["label"]
    ce = jax.vmap(losses.cross_entropy, in_axes=(0, None))(logits, labels)          # [L]
    acc = jnp.mean(jnp.argmax(logits, -1) == labels[None], axis=-1)                  # [L]
    students = jax.tree.map(lambda x: x[1:], outputs)
    teachers = jax.tree.map(lambda x: x[:-1], outputs)
    if stop_gradient:
        teachers = jax.lax.stop_gradient(teachers)
    pair, pair_metrics = jax.vmap(pair_loss, in_axes=(0, 0, None))(students, teachers, batch)
    total = ce_weight * jnp.sum(ce) + jnp.sum(pair)
    metrics = {"loss": total}
    for k in range(logits.shape[0]):
        metrics[f"level{k}/ce"] = ce[k]
        metrics[f"level{k}/accuracy"] = acc[k]
        for name, values in (pair_metrics.items() if k else ()):
            metrics[f"level{k}/{name}"] = values[k - 1]
    return total, metrics


def cascade_grads(forward: Callable, params: Any, masks: Mapping, loss_fn: Callable,
                  stop_gradient: bool):
    """Loss, parameter gradient and per-level Taylor saliency in one forward pass.

    forward(params, masks) -> (outputs, aux): all levels at once (masks {group: [L, C]});
    loss_fn(outputs, stop_gradient) -> (loss, metrics), e.g. ``cascade_loss``.
    The parameters get ∂(Σ_k L_k)/∂θ of the training loss (teacher side stopped or not).
    The saliency is |∂L_k/∂m_k| of each level's OWN pair loss: the cotangent of the loss
    with every teacher side stopped, pulled back to the masks — with ``stop_gradient`` this
    is the training loss itself (one backward pass); without it, Σ_j L_j would also reach
    m_k through level k's role as teacher of level k+1, so a second pull-back is taken.
    Returns (loss, metrics, param_grads, saliency {group: [L, C]}, aux).
    """
    outputs, pullback, aux = jax.vjp(forward, params, masks, has_aux=True)
    own = jax.value_and_grad(lambda o: loss_fn(o, True), has_aux=True)
    (loss, metrics), cot_own = own(outputs)
    if stop_gradient:
        param_grads, mask_grads = pullback(cot_own)
    else:
        cot_train = jax.grad(lambda o: loss_fn(o, False)[0])(outputs)
        param_grads = pullback(cot_train)[0]
        mask_grads = pullback(cot_own)[1]
    return loss, metrics, param_grads, jax.tree.map(jnp.abs, mask_grads), aux
