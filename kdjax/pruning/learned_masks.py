"""A zoo model whose chosen mask groups are gated by learned, differentiable masks (PDD).

    wrapped = LearnedMasks(model=get_model("resnet20", 10), learned=("stage1.block0", ...))
    variables = wrapped.init(rng, x)
    # params = {"model": <the zoo model's params>, "mask_logits": {group: m [C]}}

With ``cost_table`` set, ``features["macs_ratio"]`` = MACs under the current masks /
unmasked MACs, differentiable in the logits through the straight-through gradient (used by
PDD's optional FLOPs-target extension).

Forward: the zoo model runs with masks {g: M(m_g)} for the learned groups and ones for
the others, where M is the PDD straight-through mask of kdjax.pruning.ste
(M = 1[m > 0], ∂M/∂m = max(0, 1 − |m|)). The logits are ordinary parameters, so the
model's optimizer (and its weight decay) trains them with the weights, as in PDD.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.pruning import ste
from kdjax.pruning.cost import masked_cost


class LearnedMasks(nn.Module):
    """Wrap ``model`` with one learned mask vector per group in ``learned``.

    init_scale: logits start at N(0, 1)·init_scale (PDD's initialisation), so about half
    of the channels start gated off and can switch on through the surrogate gradient.
    """

    model: nn.Module
    learned: tuple[str, ...]
    init_scale: float = 1e-3
    cost_table: Any = None  # a kdjax.pruning.cost.CostTable: adds features["macs_ratio"]

    def mask_groups(self) -> dict[str, int]:
        return self.model.mask_groups()

    def taps(self) -> tuple[str, ...]:
        return self.model.taps()

    @nn.compact
    def __call__(self, x, train: bool = False, masks=None, **kwargs):
        """(logits, features) of the wrapped model under the learned masks.

        ``masks``, if given, multiplies on top of the learned ones (e.g. a frozen pruning).
        """
        groups = self.model.mask_groups()
        unknown = [g for g in self.learned if g not in groups]
        if unknown:
            raise ValueError(f"learned mask groups {unknown} are not groups of the model; "
                             f"valid: {list(groups)}")
        shapes = {g: groups[g] for g in self.learned}

        def init_logits(rng):
            keys = dict(zip(shapes, jax.random.split(rng, len(shapes))))
            return {g: self.init_scale * jax.random.normal(keys[g], (c,)) for g, c in shapes.items()}

        logits = self.param("mask_logits", init_logits)
        full = {g: jnp.ones((c,), x.dtype) for g, c in groups.items()}
        for g in self.learned:
            full[g] = ste.pdd_mask(logits[g]).astype(x.dtype)
        if masks is not None:
            full = {g: full[g] * masks[g] for g in full}
        logits, features = self.model(x, masks=full, train=train, **kwargs)
        if self.cost_table is not None:
            ones = {g: jnp.ones((c,), jnp.float32) for g, c in groups.items()}
            features = dict(features)
            features["macs_ratio"] = (masked_cost(self.cost_table, full)["macs"]
                                      / masked_cost(self.cost_table, ones)["macs"])
        return logits, features


def binary_masks(params: dict, groups: dict[str, int]) -> dict[str, jax.Array]:
    """Hard 0/1 masks {group: [C]} from trained LearnedMasks params (ones for groups
    without learned logits). A group whose logits are all ≤ 0 keeps its single
    highest-logit channel, so no layer is emptied."""
    logits = params["mask_logits"]
    masks = {}
    for g, c in groups.items():
        if g not in logits:
            masks[g] = jnp.ones((c,), jnp.float32)
            continue
        keep = logits[g] > 0
        best = jnp.zeros((c,), bool).at[jnp.argmax(logits[g])].set(True)
        masks[g] = jnp.where(jnp.any(keep), keep, best).astype(jnp.float32)
    return masks


def flops_penalty(target: float, weight: float):
    """Extension, not part of PDD: a regulariser (for ``distill.Objective``) adding
    weight · max(0, r − target), where r = features["macs_ratio"] is the masked/unmasked
    MACs ratio of LearnedMasks; logs r as "macs_ratio"."""

    def penalty(student):
        ratio = student.features["macs_ratio"]
        return weight * jax.nn.relu(ratio - target), {"macs_ratio": ratio}

    return penalty
