"""Physical compaction: a masked zoo model -> a plain, smaller zoo model with the same outputs.

Every zoo model accepts per-group widths (``model.clone(widths=...)``) with parameter
names independent of the widths, so compaction is slicing: each variable axis that
belongs to a mask group keeps only that group's kept channels. Which group owns which
axis is found from the model itself (shrink one group by one channel in an abstract
init and see which axes shrink), so the rule holds for every architecture in the zoo
and for residual couplings (a stream group owns the output axis of every conv and BN
that writes the stream and the input axis of every layer that reads it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import models
from kdjax.models import common as model_common

_PROBE_SHAPE = (1, 8, 8, 3)


def with_widths(model, widths: dict):
    """``model`` rebuilt with group widths overridden by ``widths`` (other groups kept)."""
    current = dict(model.widths)
    current.update({g: int(c) for g, c in widths.items()})
    return model.clone(widths=model_common.widths_tuple(current))


def _variable_shapes(model, input_shape=_PROBE_SHAPE):
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(input_shape))
    return jax.tree.map(lambda a: tuple(a.shape), shapes)


def axis_owners(model) -> dict:
    """For every variable leaf, a list with the mask group owning each axis (None if none).

    Same structure as the model's variables ({'params', 'batch_stats'}). Found by widening
    one group at a time by one channel in an abstract init (the input channel count does
    not matter: the input axis of the first conv belongs to no group).
    """
    full = _variable_shapes(model)
    is_shape = lambda s: isinstance(s, tuple)
    owners = jax.tree.map(lambda s: [None] * len(s), full, is_leaf=is_shape)
    for group, channels in models.mask_groups(model).items():
        shrunk = _variable_shapes(with_widths(model, {group: channels + 1}))

        def mark(owner, big, small, group=group):
            for axis, (a, b) in enumerate(zip(big, small)):
                if a != b:
                    owner[axis] = group
            return owner

        owners = jax.tree.map(mark, owners, full, shrunk, is_leaf=lambda s: isinstance(s, list))
    return owners


def _check_binary(masks: dict, groups: dict) -> dict:
    keep = {}
    for g, c in groups.items():
        m = np.asarray(masks[g])
        if m.shape != (c,) or not np.all((m == 0) | (m == 1)):
            raise ValueError(f"mask of group {g!r} must be 0/1 of shape ({c},); got {m.shape}")
        if not m.any():
            raise ValueError(f"mask of group {g!r} keeps no channel; a group needs at least one")
        keep[g] = np.flatnonzero(m)
    return keep


def compact(model, variables: dict, masks: dict) -> tuple:
    """(small_model, small_variables) with the masked channels physically removed.

    variables: {'params', 'batch_stats'} of ``model``; masks: binary {group: [C]} with at
    least one kept channel per group. Every parameter and statistic (kernels, biases, BN
    scale/bias/mean/var) is sliced, nothing is re-initialised, so the eval-mode outputs of
    ``small_model`` equal ``model.apply(variables, x, masks=masks)``.
    """
    groups = models.mask_groups(model)
    keep = _check_binary(masks, groups)
    owners = axis_owners(model)

    def slice_leaf(leaf, owner):
        leaf = np.asarray(leaf)
        for axis, group in enumerate(owner):
            if group is not None:
                leaf = np.take(leaf, keep[group], axis=axis)
        return jnp.asarray(leaf)

    small_vars = jax.tree.map(slice_leaf, dict(variables), owners,
                              is_leaf=lambda x: isinstance(x, list))
    small_model = with_widths(model, {g: len(k) for g, k in keep.items()})
    return small_model, small_vars
