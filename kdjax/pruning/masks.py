"""Mask pytrees: ``{group: float32 [C]}`` (or ``[P, C]`` for a population of P candidates)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from kdjax import models


def ones_masks(model) -> dict:
    """All-ones masks {group: [C]} of a zoo model ("unpruned")."""
    return {g: jnp.ones((c,), jnp.float32) for g, c in models.mask_groups(model).items()}


def population_ones(model, population: int) -> dict:
    """All-ones masks with a leading population axis: {group: [P, C]}."""
    return {g: jnp.ones((population, c), jnp.float32) for g, c in models.mask_groups(model).items()}


def binarize(masks: dict, threshold: float = 0.5) -> dict:
    """0/1 float masks: 1 where mask > threshold."""
    return {g: (m > threshold).astype(jnp.float32) for g, m in masks.items()}


def count_kept(masks: dict) -> dict:
    """Kept (non-zero) channels per group: int for [C] masks, int array [P] for [P, C]."""
    counts = {g: np.count_nonzero(np.asarray(m), axis=-1) for g, m in masks.items()}
    return {g: int(c) if np.ndim(c) == 0 else c for g, c in counts.items()}


def sparsity_summary(model, masks: dict) -> dict:
    """{'groups': {group: {'kept', 'total', 'kept_ratio'}}, 'kept', 'total', 'kept_ratio'}
    for one candidate's binary masks."""
    totals = models.mask_groups(model)
    kept = count_kept(masks)
    groups = {g: {"kept": kept[g], "total": c, "kept_ratio": kept[g] / c} for g, c in totals.items()}
    k, t = sum(kept.values()), sum(totals.values())
    return {"groups": groups, "kept": k, "total": t, "kept_ratio": k / t}
