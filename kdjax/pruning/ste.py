"""Differentiable binary channel masks (PDD's straight-through estimator).

Forward:  M(m) = (sign(m) + 1) / 2 with sign(0) := −1, i.e. M = 1 if m > 0 else 0.
Backward: ∂M/∂m = max(0, 1 − |m|)  (the ApproxSign surrogate, the derivative of the
piecewise-quadratic approximation of sign), so logits near 0 receive gradient and
can switch a channel on or off; logits far from 0 (|m| ≥ 1) are frozen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def pdd_mask(logits: jax.Array) -> jax.Array:
    """0/1 mask of the same shape as ``logits`` (any shape): 1[m > 0]."""
    return (logits > 0).astype(logits.dtype)


def _forward(logits):
    return pdd_mask(logits), logits


def _backward(logits, cotangent):
    return (cotangent * jnp.maximum(0.0, 1.0 - jnp.abs(logits)),)


pdd_mask.defvjp(_forward, _backward)
