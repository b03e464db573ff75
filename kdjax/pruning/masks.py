"""Mask pytrees and the channel-group structure of zoo models.

A mask pytree is ``{group: float32 [C_g]}`` with one entry per group of coupled
channels of ``kdjax.models.mask_groups(model)`` (1 = kept, 0 = pruned; soft values
are allowed where a function says so). A population of P candidates is the same
pytree with a leading axis, ``{group: [P, C_g]}``, which the models evaluate under
``jax.vmap``.

``axis_groups(model)`` says which group owns each axis of each variable (e.g. the
output axis of every conv, BN and bias that writes a residual stream, and the input
axis of every layer that reads it). It is what the cost model, compaction and the
weight-based saliencies are built on.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from kdjax import models
from kdjax.models import common as model_common

_PROBE_SHAPE = (1, 8, 8, 3)

Path = tuple[str, ...]


def ones_masks(model: nn.Module) -> dict[str, jax.Array]:
    """All-ones ("unpruned") masks {group: float32 [C_g]} of a zoo model."""
    return {g: jnp.ones((c,), jnp.float32) for g, c in models.mask_groups(model).items()}


def population_ones(model: nn.Module, population: int) -> dict[str, jax.Array]:
    """All-ones masks for P candidates: {group: float32 [P, C_g]}."""
    return {g: jnp.ones((population, c), jnp.float32)
            for g, c in models.mask_groups(model).items()}


def random_masks(model: nn.Module, key: jax.Array, keep_prob: float = 0.5,
                 population: int | None = None) -> dict[str, jax.Array]:
    """Random binary masks, each channel kept with probability ``keep_prob``, and one
    uniformly chosen channel per group (per candidate) always kept so no group is empty.

    Returns {group: float32 [C_g]}, or [P, C_g] with ``population=P``. jit-safe in
    ``key`` and ``keep_prob``.
    """
    lead = () if population is None else (population,)
    groups = models.mask_groups(model)
    out = {}
    for (g, c), k in zip(groups.items(), jax.random.split(key, len(groups))):
        k_keep, k_one = jax.random.split(k)
        keep = jax.random.bernoulli(k_keep, keep_prob, (*lead, c))
        forced = jax.nn.one_hot(jax.random.randint(k_one, lead, 0, c), c, dtype=bool)
        out[g] = (keep | forced).astype(jnp.float32)
    return out


def apply_masks(masks: Mapping[str, jax.Array],
                other: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Channel-wise product of two mask pytrees (e.g. a frozen pruning and a candidate):
    {g: masks[g] · other[g]}, broadcasting leading population axes."""
    return {g: masks[g] * other[g] for g in masks}


def binarize(masks: Mapping[str, jax.Array], threshold: float = 0.5) -> dict[str, jax.Array]:
    """Hard masks: M_g[c] = 1 if masks_g[c] > threshold else 0, as float32 of the same shape."""
    return {g: (jnp.asarray(m) > threshold).astype(jnp.float32) for g, m in masks.items()}


def count_kept(masks: Mapping[str, jax.Array]) -> dict[str, int | np.ndarray]:
    """Kept channels per group: #{c : mask_g[c] ≠ 0}.

    [C] masks give a python int per group (usable as widths for ``get_model``);
    [P, C] masks give an int array [P] per group. Needs concrete arrays (not jit-safe:
    widths are static); inside jit use ``jnp.sum(m != 0, -1)`` or ``cost.masked_cost``.
    """
    counts = {g: np.count_nonzero(np.asarray(m), axis=-1) for g, m in masks.items()}
    return {g: int(c) if np.ndim(c) == 0 else c for g, c in counts.items()}


def sparsity_summary(model: nn.Module, masks: Mapping[str, jax.Array]) -> dict[str, Any]:
    """Kept/total channels per group and overall.

    Returns {'groups': {group: {'kept', 'total', 'kept_ratio'}}, 'kept', 'total',
    'kept_ratio'}; kept values are ints for [C] masks and int arrays [P] for [P, C].
    """
    totals = models.mask_groups(model)
    kept = count_kept(masks)
    groups = {g: {"kept": kept[g], "total": c, "kept_ratio": kept[g] / c}
              for g, c in totals.items()}
    k, t = sum(kept.values()), sum(totals.values())
    return {"groups": groups, "kept": k, "total": t, "kept_ratio": k / t}


def with_widths(model: nn.Module, widths: Mapping[str, int]) -> nn.Module:
    """The same zoo model with the group widths in ``widths`` overridden (others kept)."""
    current = dict(model.widths)
    current.update({g: int(c) for g, c in widths.items()})
    return model.clone(widths=model_common.widths_tuple(current))


def _flat_shapes(model: nn.Module, input_shape=_PROBE_SHAPE) -> dict[Path, tuple[int, ...]]:
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
    return {path: tuple(leaf.shape)
            for path, leaf in traverse_util.flatten_dict(dict(shapes)).items()}


@functools.lru_cache(maxsize=64)
def _axis_groups(model: nn.Module) -> tuple[tuple[Path, tuple[str | None, ...]], ...]:
    groups = models.mask_groups(model)
    full = _flat_shapes(model)
    # Label every group with its own width, larger than any dimension of the model, so a
    # dimension of the labelled model names its owning group (kernel sizes, the input
    # channels and the classes are below the labels and stay unchanged).
    offset = 1 + max([model.num_classes, *(d for s in full.values() for d in s)])
    labels = {offset + i: g for i, g in enumerate(groups)}
    labelled = _flat_shapes(with_widths(model, {g: w for w, g in labels.items()}))
    owners = []
    for path, shape in full.items():
        axes = []
        for dim, probe in zip(shape, labelled[path]):
            group = labels.get(probe)
            if (group is None and probe != dim) or (group is not None and dim != groups[group]):
                raise ValueError(f"axis of {'/'.join(path)} ({dim} -> {probe}) is neither "
                                 "fixed nor exactly one group's width")
            axes.append(group)
        owners.append((path, tuple(axes)))
    return tuple(owners)


def axis_groups(model: nn.Module) -> dict[Path, tuple[str | None, ...]]:
    """Owning mask group of every axis of every variable (None for axes no group owns).

    Keys are flattened variable paths, e.g. ('params', 'stage1_block0', 'conv1', 'kernel')
    -> (None, None, 'stage1', 'stage1.block0') for an HWIO kernel. Found from two
    abstract inits: the model as is, and the model with every group given a distinct
    width that no other dimension has; an axis whose size is not exactly one group's
    width raises ValueError. Cached per model (zoo models are hashable).
    """
    return dict(_axis_groups(model))
