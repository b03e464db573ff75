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


def model_cost(model: nn.Module, input_shape) -> dict:
    """Totals for one image: {'macs', 'params', 'layers': layer_costs(...)}."""
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
