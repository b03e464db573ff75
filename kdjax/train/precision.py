"""Mixed precision for every pipeline: ``config.train.compute_dtype``.

"float32": everything in float32. "bfloat16": parameters, BN running statistics and
the optimizer state stay float32; each forward pass casts the floating parameters and
the images to bfloat16, so convolutions, dense layers and activations run in bfloat16
(exactly what Flax's ``dtype=bfloat16, param_dtype=float32`` does inside each layer,
here at one place for every zoo model). Flax's BatchNorm reduces its batch mean and
variance in float32 and updates the float32 running statistics; the model's outputs
(logits, features) are cast back to float32, so losses, softmaxes and KL terms are
computed in float32. Gradients reach the float32 parameters through the casts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.train.throughput import check_dtype


def compute_dtype(name: str) -> jnp.dtype:
    """The jnp dtype of config name "float32" | "bfloat16" (ValueError otherwise)."""
    check_dtype(name)
    return jnp.dtype(name)


def cast_floating(tree, dtype):
    """Every floating-point leaf of ``tree`` cast to ``dtype`` (others untouched)."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x,
        tree)


def _cast_params(variables, dtype):
    """Variables with every collection but ``batch_stats`` cast; a tuple/list of variable
    dicts (a teacher ensemble's members) is cast member by member."""
    if isinstance(variables, (tuple, list)):
        return type(variables)(_cast_params(v, dtype) for v in variables)
    return {k: v if k == "batch_stats" else cast_floating(v, dtype)
            for k, v in variables.items()}


def apply(model, variables: dict, images: jax.Array, dtype, **kwargs):
    """``model.apply(variables, images, **kwargs)`` computed in ``dtype``.

    Floating parameters and ``images`` are cast to ``dtype``; ``batch_stats`` is passed
    as it is. Floating outputs come back float32;
    with ``mutable=...`` the collection updates are returned untouched (float32).
    """
    out = model.apply(_cast_params(variables, dtype), images.astype(dtype), **kwargs)
    if kwargs.get("mutable"):
        out, updates = out
        return cast_floating(out, jnp.float32), updates
    return cast_floating(out, jnp.float32)
