"""Analytic cost of a model per image: parameters and multiply-accumulates (MACs), under masks.

MACs count convolutions and dense layers only (the convention of the published tables):
a conv with kernel [kh, kw, Cin/groups, Cout] producing an [Ho, Wo] map costs
Ho·Wo·kh·kw·(Cin/groups)·Cout; a dense layer [Din, Dout] costs Din·Dout. Parameters
count the ``params`` collection (BN scale/bias included, running statistics not).

Under masks, every axis owned by a mask group g (``masks.axis_groups``) has n_g
channels instead of C_g, so each term is a monomial in the kept counts:

    params = Σ_leaves  Π_{axes a} (n_{g(a)} if a is owned else dim_a)
    MACs   = Σ_layers  Ho·Wo · Π_{kernel axes a} (n_{g(a)} if a is owned else dim_a)

A pruned output channel thus also removes the next layers' input channels, its BN
entries and, for a residual stream, the same channel in every conv, BN and shortcut
writing or reading the stream. For binary masks this is exactly the cost of the
compacted model ``get_model(name, k, widths=count_kept(masks))``.

``cost_table`` records the monomials once per (model, input shape) from one abstract
forward pass (``jax.eval_shape`` with ``nn.intercept_methods``); ``model_cost`` gives
exact python ints for concrete binary masks, ``masked_cost`` a jnp expression
(jit/vmap/grad-safe, leading population axes allowed, soft masks counted as Σ_c m_c).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from kdjax import models
from kdjax.models import common as model_common
from kdjax.pruning import masks as masks_lib


@dataclasses.dataclass(frozen=True)
class Term:
    """const · Π_{g in groups} n_g (a group may repeat)."""

    const: int
    groups: tuple[str, ...]

    def value(self, counts: Mapping):
        """Evaluate with counts {group: n_g} (python ints -> exact int; arrays broadcast)."""
        out = self.const
        for g in self.groups:
            out = out * counts[g]
        return out


@dataclasses.dataclass(frozen=True)
class Layer:
    """One conv, dense or BatchNorm module holding parameters, in call order.

    kind: 'conv', 'dense' or 'norm'; in_group/out_group: groups owning the kernel's
    input/output channel axis (for a norm layer, its channel axis; None if unowned).
    """

    name: str
    kind: str
    in_group: str | None
    out_group: str | None
    macs: Term
    params: tuple[Term, ...]


@dataclasses.dataclass(frozen=True)
class CostTable:
    """Layers of a model at one input shape, plus its full group widths."""

    layers: tuple[Layer, ...]
    widths: tuple[tuple[str, int], ...]


def _term(const: int, shape, owners) -> Term:
    """Monomial of a tensor of ``shape`` whose axes are owned by ``owners``, times const."""
    fixed = math.prod(d for d, g in zip(shape, owners) if g is None)
    return Term(const * fixed, tuple(g for g in owners if g is not None))


@functools.lru_cache(maxsize=64)
def cost_table(model: nn.Module, input_shape: tuple[int, ...]) -> CostTable:
    """The cost monomials of every conv/dense/BatchNorm layer of ``model`` for one image
    of ``input_shape`` (H, W, C). Cached per (model, input_shape); a parameter held by
    any other kind of module raises ValueError."""
    input_shape = tuple(int(d) for d in input_shape)
    owners = masks_lib.axis_groups(model)
    calls: dict[tuple[str, ...], tuple[str, int]] = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(
                module, (nn.Conv, nn.Dense, nn.BatchNorm)):
            kind = ("conv" if isinstance(module, nn.Conv) else
                    "dense" if isinstance(module, nn.Dense) else "norm")
            spatial = math.prod(out.shape[1:-1]) if kind == "conv" else 1
            calls.setdefault(tuple(module.path), (kind, spatial))
        return out

    def forward(x):
        with nn.intercept_methods(interceptor):
            return model.init(jax.random.PRNGKey(0), x)

    shapes = jax.eval_shape(forward, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    params = traverse_util.flatten_dict(dict(shapes["params"]))
    layers = []
    for path, (kind, spatial) in calls.items():
        leaves = {p[-1]: leaf.shape for p, leaf in params.items() if p[:-1] == path}
        if not leaves:  # e.g. a BatchNorm without scale and bias
            continue
        leaf_owners = {name: owners[("params", *path, name)] for name in leaves}
        if kind == "norm":
            axis = next(iter(leaf_owners.values()))
            in_group = out_group = axis[-1]
            macs = Term(0, ())
        else:
            axes = leaf_owners["kernel"]
            in_group, out_group = axes[-2], axes[-1]
            macs = _term(spatial, leaves["kernel"], axes)
        layers.append(Layer(
            name="/".join(path), kind=kind, in_group=in_group, out_group=out_group,
            macs=macs,
            params=tuple(_term(1, leaves[n], leaf_owners[n]) for n in sorted(leaves))))
    counted = {p for p in params if p[:-1] in calls}
    if counted != set(params):
        raise ValueError("parameters outside conv/dense/BatchNorm layers: "
                         f"{sorted(set(params) - counted)}")
    return CostTable(layers=tuple(layers),
                     widths=tuple(models.mask_groups(model).items()))


def _counts(table: CostTable, masks) -> dict[str, int]:
    if masks is None:
        return dict(table.widths)
    kept = masks_lib.count_kept(masks)
    if not all(isinstance(k, int) for k in kept.values()):
        raise ValueError("model_cost takes one candidate's [C] masks; use masked_cost "
                         "for a [P, C] population")
    return kept


def model_cost(model: nn.Module, input_shape, masks: Mapping | None = None) -> dict:
    """Cost of one image through ``model`` as exact python ints.

    input_shape: (H, W, C); masks: None (unpruned) or one candidate's masks
    {group: [C_g]}, of which only the kept count #{c : m_c ≠ 0} per group matters.
    Returns {'macs', 'params', 'layers': [{'name', 'kind', 'in_group', 'out_group',
    'in_channels', 'out_channels', 'macs', 'params'}, ...]} in call order, with the
    kept channel counts of the groups owning a layer's input/output channel axis (None
    for an axis no group owns, e.g. the image channels or the classes).
    """
    if masks is not None:
        model_common.check_masks(masks, models.mask_groups(model))
    table = cost_table(model, tuple(input_shape))
    n = _counts(table, masks)
    layers = [{"name": layer.name, "kind": layer.kind,
               "in_group": layer.in_group, "out_group": layer.out_group,
               "in_channels": n.get(layer.in_group), "out_channels": n.get(layer.out_group),
               "macs": int(layer.macs.value(n)),
               "params": int(sum(t.value(n) for t in layer.params))}
              for layer in table.layers]
    return {"macs": sum(layer["macs"] for layer in layers),
            "params": sum(layer["params"] for layer in layers),
            "layers": layers}


def counts_cost(table: CostTable, counts: Mapping) -> dict[str, jax.Array]:
    """{'macs', 'params'} per image from kept counts {group: n_g} (scalars or arrays of
    any common leading shape, e.g. [P]); the monomials of the module docstring."""
    macs = sum(layer.macs.value(counts) for layer in table.layers)
    params = sum(t.value(counts) for layer in table.layers for t in layer.params)
    return {"macs": jnp.asarray(macs), "params": jnp.asarray(params)}


def masked_cost(table: CostTable, masks: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """{'macs', 'params'} under masks {group: [..., C_g]} with n_g = Σ_c m_g[c] (float).

    A jnp expression: jit/vmap-safe and differentiable in the masks (soft masks give the
    relaxed cost, bilinear in neighbouring groups' n_g); leading axes [P, C] give [P].
    For binary masks it equals ``model_cost(model, shape, masks)`` up to float32 rounding.
    """
    counts = {g: jnp.sum(jnp.asarray(masks[g], jnp.float32), axis=-1) for g, _ in table.widths}
    return counts_cost(table, counts)
