"""Test helpers shared by several test files (independent of the code under test)."""

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(model, seed=0, in_channels=3):
    """Random variables of the right shapes, filled with numpy (no per-shape XLA compiles).

    Kernels are He-scaled over fan-in; BN statistics, scales and biases are random, so
    masked channels would leak if masking were wrong and BN statistics matter for
    compaction.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, 8, 8, in_channels), jnp.float32))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("var", "scale"):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        elif name in ("mean", "bias"):
            value = 0.3 * rng.standard_normal(leaf.shape)
        else:
            value = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def np_softmax(x):
    """float64 softmax over the last axis."""
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_log_softmax(x):
    """float64 log-softmax over the last axis."""
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
