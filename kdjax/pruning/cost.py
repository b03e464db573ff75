"""Analytic cost of a model: parameters and multiply-accumulates (MACs) per image.

MACs count convolutions and dense layers only (the convention of the published
tables): a conv with kernel [kh, kw, Cin/groups, Cout] producing an [Ho, Wo] map
costs Ho·Wo·kh·kw·(Cin/groups)·Cout; a dense layer [Din, Dout] costs Din·Dout.
Parameters count the ``params`` collection (BN scale/bias included, running
statistics not).

Layers are found by intercepting every ``nn.Conv``/``nn.Dense`` call of one
abstract forward pass (``jax.eval_shape``), so nothing is computed and any zoo
model — including a compacted one with per-group widths — is measured the same way.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def layer_costs(model: nn.Module, input_shape) -> list[dict]:
    """Per conv/dense layer: {'name', 'kind', 'kernel', 'output', 'macs'} for one image.

    input_shape: (H, W, C) of one image. Order = call order of the forward pass.
    """
    records: list[dict] = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (nn.Conv, nn.Dense)):
            kernel = module.variables["params"]["kernel"].shape
            if isinstance(module, nn.Conv):
                spatial = math.prod(out.shape[1:-1])
                macs = spatial * math.prod(kernel)
                kind = "conv"
            else:
                macs = math.prod(kernel)
                kind = "dense"
            records.append({"name": "/".join(module.path), "kind": kind,
                            "kernel": tuple(kernel), "output": tuple(out.shape[1:]),
                            "macs": int(macs)})
        return out

    def forward(x):
        with nn.intercept_methods(interceptor):
            return model.init_with_output(jax.random.PRNGKey(0), x)

    jax.eval_shape(forward, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    return records


def count_params(params) -> int:
    """Number of scalars in a params pytree."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


def model_cost(model: nn.Module, input_shape, masks=None) -> dict:
    """Totals for one image: {'macs', 'params', 'layers': layer_costs(...)}.

    With binary ``masks`` ({group: [C]}), the cost of the masked model counts only kept
    channels: it is measured on the model with widths = kept channels per group, which
    removes a pruned channel everywhere it appears (the producing conv's filter and BN
    entries, the consuming layers' input slices, and all residual partners of a stream).
    """
    if masks is not None:
        from kdjax.pruning.compact import with_widths
        from kdjax.pruning.masks import count_kept

        model = with_widths(model, count_kept(masks))
    layers = layer_costs(model, input_shape)
    shapes = jax.eval_shape(
        lambda x: model.init(jax.random.PRNGKey(0), x),
        jax.ShapeDtypeStruct((1, *input_shape), jnp.float32),
    )
    return {
        "macs": sum(layer["macs"] for layer in layers),
        "params": count_params(shapes["params"]),
        "layers": layers,
    }


def layer_table(model: nn.Module, input_shape) -> list[dict]:
    """layer_costs(...) plus, per layer, the mask groups owning the kernel's input and
    output channel axes ('in_group', 'out_group'; None when no group owns them) and the
    full channel counts ('in_channels', 'out_channels')."""
    from kdjax.pruning.compact import axis_owners

    owners = axis_owners(model)["params"]
    table = []
    for layer in layer_costs(model, input_shape):
        node = owners
        for part in layer["name"].split("/"):
            node = node[part]
        kernel_owner = node["kernel"]
        table.append({**layer, "in_group": kernel_owner[-2], "out_group": kernel_owner[-1],
                      "in_channels": layer["kernel"][-2], "out_channels": layer["kernel"][-1]})
    return table


def masked_macs(table: list[dict], masks: dict) -> jax.Array:
    """MACs per image under (soft or binary) masks, as a jnp expression.

    MACs = Σ_layers MACs_full · (kept_in / C_in) · (kept_out / C_out), with kept counts
    Σ_c mask[c] of the groups owning the layer's input/output channels (a factor 1 where
    no group owns the axis). Masks may carry leading population axes ([P, C] -> [P]),
    so this vmaps and jits; for binary masks it equals model_cost(model, shape, masks).
    """
    total = 0.0
    for layer in table:
        factor = layer["macs"]
        if layer["in_group"] is not None:
            factor = factor * jnp.sum(masks[layer["in_group"]], axis=-1) / layer["in_channels"]
        if layer["out_group"] is not None:
            factor = factor * jnp.sum(masks[layer["out_group"]], axis=-1) / layer["out_channels"]
        total = total + factor
    return total
