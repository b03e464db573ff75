"""Differentiable binary channel masks: PDD's straight-through estimator (jax.custom_vjp).

Forward:  M(m) = (sign(m) + 1) / 2 with sign(0) := −1, i.e. M = 1 if m > 0 else 0, so
          M ∈ {0, 1} exactly (docs/pdd.md: M ∈ {0, 1}; a logit of exactly 0 is "off").
Backward: ∂M/∂m := max(0, 1 − |m|), the ApproxSign surrogate (the derivative of the
          piecewise-quadratic approximation of sign, halved like M): logits near 0
          receive gradient and can switch a channel on or off; |m| ≥ 1 is frozen.

Elementwise over any shape, so one call gates a whole mask pytree leaf [C] or a
population [P, C]; jit/vmap/grad-safe.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def pdd_mask(logits: jax.Array) -> jax.Array:
    """0/1 mask 1[m > 0], same shape and dtype as the float ``logits``; see module docstring."""
    return (logits > 0).astype(logits.dtype)


def _forward(logits):
    return pdd_mask(logits), logits


def _backward(logits, cotangent):
    return (cotangent * jnp.maximum(0.0, 1.0 - jnp.abs(logits)).astype(cotangent.dtype),)


pdd_mask.defvjp(_forward, _backward)
