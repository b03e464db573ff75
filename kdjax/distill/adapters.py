"""Trainable pieces distillation methods own (flax modules) and how they are run.

An adapter's variables live in the method's pytrees: its ``params`` in the method params
(trained with the student), its BatchNorm ``batch_stats`` (if any) in the method state.
All modules map NHWC ``[B, H, W, C]`` maps or ``[B, C]`` vectors, as stated per class.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models import common


def _bn_act(x, train: bool, act):
    """BatchNorm (PyTorch momentum/epsilon) then ``act`` (None: identity)."""
    x = common.batch_norm(train)(x)
    return x if act is None else act(x)


def leaky_relu(x):
    """LeakyReLU with slope 0.1 (FT's paraphraser and translator)."""
    return nn.leaky_relu(x, 0.1)


class HintRegressor(nn.Module):
    """FitNet regressor: student map ``[B, Hs, Ws, Cs]`` → teacher shape ``[B, Ht, Wt, Ct]``.

    Hs = Ht: conv3x3; Hs = 2·Ht: conv3x3 stride 2; 2·Hs = Ht: transposed conv 4x4 stride 2;
    then BN and ReLU (RepDistiller's ``ConvReg``).
    """

    out_shape: tuple[int, int, int]   # (Ht, Wt, Ct)

    @nn.compact
    def __call__(self, x, train: bool = True):
        ht, wt, ct = self.out_shape
        hs = x.shape[1]
        if hs == ht:
            x = common.conv3x3(ct, use_bias=True)(x)
        elif hs == 2 * ht:
            x = common.conv3x3(ct, stride=2, use_bias=True)(x)
        elif 2 * hs == ht:
            x = nn.ConvTranspose(ct, (4, 4), strides=(2, 2), padding="SAME")(x)
        else:
            raise ValueError(f"FitNet regressor: student height {hs} and teacher height {ht} "
                             f"differ by a factor other than 1 or 2")
        return _bn_act(x, train, nn.relu)


class Connector(nn.Module):
    """AB connector: conv1x1 + BN, ``[B, H, W, Cs]`` → ``[B, H, W, Ct]``."""

    channels: int

    @nn.compact
    def __call__(self, x, train: bool = True):
        return _bn_act(common.conv1x1(self.channels)(x), train, None)


class VIDRegressor(nn.Module):
    """VID mean regressor: conv1x1-ReLU-conv1x1-ReLU-conv1x1, ``[B,H,W,Cs]`` → ``[B,H,W,Ct]``
    (hidden width = Ct, as RepDistiller's ``VIDLoss(s, t, t)``)."""

    channels: int

    @nn.compact
    def __call__(self, x, train: bool = True):
        del train
        x = nn.relu(common.conv1x1(self.channels)(x))
        x = nn.relu(common.conv1x1(self.channels)(x))
        return common.conv1x1(self.channels)(x)


class Paraphraser(nn.Module):
    """FT paraphraser on a teacher map ``[B, H, W, C]``: an encoder of three conv3x3-BN-
    LeakyReLU layers (C → C → k·C → k·C) giving the factor ``[B, H, W, k·C]``, and a decoder
    of three transposed convs (k·C → k·C → C → C) reconstructing the map."""

    rate: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = True, decode: bool = True):
        c = x.shape[-1]
        k = int(round(c * self.rate))
        h = x
        for width in (c, k, k):
            h = _bn_act(common.conv3x3(width, use_bias=True)(h), train, leaky_relu)
        factor = h
        if not decode:
            return factor
        for width in (k, c, c):
            h = nn.ConvTranspose(width, (3, 3), padding="SAME")(h)
            h = _bn_act(h, train, leaky_relu)
        return factor, h


class Translator(nn.Module):
    """FT translator on a student map ``[B, H, W, Cs]`` → factor ``[B, H, W, factor_channels]``:
    three conv3x3-BN-LeakyReLU layers (Cs → Cs → k → k)."""

    factor_channels: int

    @nn.compact
    def __call__(self, x, train: bool = True):
        for width in (x.shape[-1], self.factor_channels, self.factor_channels):
            x = _bn_act(common.conv3x3(width, use_bias=True)(x), train, leaky_relu)
        return x


class Embed(nn.Module):
    """Linear embedding head ``[B, C]`` → ``[B, dim]``, optionally L2-normalised (CRD)."""

    dim: int
    normalize: bool = False

    @nn.compact
    def __call__(self, x, train: bool = True):
        del train
        x = nn.Dense(self.dim)(x.reshape(x.shape[0], -1))
        if self.normalize:
            x = x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-24))
        return x


def init_module(module: nn.Module, rng: jax.Array, example: Any) -> tuple[dict, dict]:
    """(params, batch_stats) of ``module`` for an input shaped like ``example`` (an array or
    a ``jax.ShapeDtypeStruct``); batch_stats is {} for modules without BatchNorm."""
    x = jnp.zeros(example.shape, example.dtype)
    variables = module.init(rng, x, train=False)
    return variables["params"], variables.get("batch_stats", {})


def run_module(module: nn.Module, params, batch_stats, x, train: bool, **kwargs):
    """Apply ``module``; returns (output, new batch_stats). BatchNorm uses batch
    statistics and updates its running ones when ``train``."""
    if not batch_stats:
        return module.apply({"params": params}, x, train=train, **kwargs), batch_stats
    variables = {"params": params, "batch_stats": batch_stats}
    if not train:
        return module.apply(variables, x, train=False, **kwargs), batch_stats
    out, updates = module.apply(variables, x, train=True, mutable=["batch_stats"], **kwargs)
    return out, updates["batch_stats"]
