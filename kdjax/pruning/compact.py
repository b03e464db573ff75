"""Physical compaction: a masked zoo model -> a plain, smaller zoo model with the same outputs.

Zoo models take per-group widths and keep their variable names for any widths, so
compaction is slicing: every variable axis owned by group g (``masks.axis_groups``)
keeps the indices K_g = {c : m_g[c] ≠ 0}, in order,

    small[leaf] = leaf[..., K_{g(a)}, ...]   on each owned axis a,

for params and batch_stats alike (kernels, biases, BN scale/bias/mean/var; nothing is
re-initialised). A masked channel is exactly zero downstream of its mask, so dropping
it and every weight that reads it leaves the eval-mode outputs unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from kdjax import models
from kdjax.pruning import masks as masks_lib


def zoo_spec(model: nn.Module) -> tuple[str, int, dict[str, int]]:
    """(name, num_classes, widths) with ``get_model(name, num_classes, widths) == model``.

    Found by comparing ``model`` with each registry entry (class and configuration);
    a width variant such as resnet20_pdd is reported as its base model plus its widths.
    Raises ValueError for a module that is not a zoo model.
    """
    widths = dict(getattr(model, "widths", ()))
    for name in models.MODEL_NAMES:
        if name in models.VARIANTS:
            continue
        try:
            candidate = models.get_model(name, model.num_classes, widths)
        except (ValueError, AttributeError):
            continue
        if candidate == model:
            return name, int(model.num_classes), widths
    raise ValueError(f"{type(model).__name__} is not a kdjax.models zoo model")


def kept_indices(model: nn.Module, masks: Mapping[str, jax.Array]) -> dict[str, np.ndarray]:
    """{group: sorted indices of kept channels} of binary masks; ValueError unless every
    group of ``model`` has a 0/1 mask of its width with at least one kept channel."""
    keep = {}
    for g, c in models.mask_groups(model).items():
        if g not in masks:
            raise ValueError(f"masks lack group {g!r}")
        m = np.asarray(masks[g])
        if m.shape != (c,) or not np.all((m == 0) | (m == 1)):
            raise ValueError(f"mask of group {g!r} must be 0/1 of shape ({c},); "
                             f"got shape {m.shape}")
        if not m.any():
            raise ValueError(f"mask of group {g!r} keeps no channel; every group needs "
                             "at least one")
        keep[g] = np.flatnonzero(m)
    return keep


def compact(model: nn.Module, variables: Mapping, masks: Mapping[str, jax.Array]
            ) -> tuple[nn.Module, dict]:
    """Remove the masked channels physically.

    model: a zoo model; variables: its {'params', 'batch_stats'}; masks: binary
    {group: [C_g]} with ≥ 1 kept channel per group. Returns (small_model, small_variables)
    where small_model = get_model(name, num_classes, widths=count_kept(masks)) (a plain
    zoo model, see ``zoo_spec``) and small_variables hold the kept slices, so that
    ``small_model.apply(small_variables, x) == model.apply(variables, x, masks=masks)``
    in eval mode (up to float rounding), and the costs agree:
    ``model_cost(small_model, s) == model_cost(model, s, masks)``.
    """
    name, num_classes, widths = zoo_spec(model)
    keep = kept_indices(model, masks)
    owners = masks_lib.axis_groups(model)
    flat = traverse_util.flatten_dict(unfreeze(variables))
    unknown = sorted("/".join(p) for p in flat if p not in owners)
    if unknown:
        raise ValueError(f"variables not created by the model's init: {unknown}")
    small = {}
    for path, leaf in flat.items():
        leaf = jnp.asarray(leaf)
        for axis, group in enumerate(owners[path]):
            if group is not None:
                leaf = jnp.take(leaf, keep[group], axis=axis)
        small[path] = leaf
    small_model = models.get_model(name, num_classes,
                                   {**widths, **{g: len(k) for g, k in keep.items()}})
    return small_model, traverse_util.unflatten_dict(small)
