"""EMO-PMS building blocks: feature selectors, constraint training, impairment (no I/O).

A sub-network ``s`` (kdjax.pruning.split.Subnet) maps the tap ``start`` (the image when
None) to the tap ``stop`` (the logits when None) of the unpruned network.

  selector    logits = GAP(f_s) W + b (f_s [B, H, W, C] or [B, C]), trained with
              min_θ CE(logits, y) on the frozen unpruned features; a sub-network ending at
              the logits has no selector (identity).
  constraint  K pruned copies of a sub-network trained at once (vmap over K):
              min_θk mean((g_s(f_{s-1}; θ_k, m_k) − f_s)²), f from the unpruned network in
              eval mode; BN statistics frozen, so an all-ones candidate stays unpruned.
  impairment  Δ_s(k) = mean CE of the whole network with only sub-network s replaced by
              candidate k, minus that of the unpruned network, on the same examples.

The ``*_step`` and loss functions are pure and jit/vmap/grad-safe; ``train_selectors``,
``constraint_train`` and ``impairments`` drive them over an iterator of batches or an
array of examples (jitted inside) and report through an optional callback, so logging
stays with the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from kdjax import losses, models

Params = Any  # a parameter pytree


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def span_io(images: jax.Array, logits: jax.Array, features: Mapping[str, jax.Array],
            subnet) -> tuple[jax.Array, jax.Array]:
    """(input, target) of a sub-network from one unpruned forward pass: input = the tap
    ``start`` (images when None), target = the tap ``stop`` (logits when None)."""
    h = images if subnet.start is None else features[subnet.start]
    target = logits if subnet.stop is None else features[subnet.stop]
    return h, target


def apply_span(model, variables: dict, h: jax.Array, masks: Mapping[str, ArrayLike],
               start: str | None, stop: str | None) -> jax.Array:
    """Output of taps (start, stop] of ``model`` (stop None: logits [B, K]), eval mode."""
    logits, features = model.apply(variables, h, masks=masks, train=False,
                                   start=start, stop=stop)
    return logits if stop is None else features[stop]


def with_params(variables: dict, params: Mapping[str, Params]) -> dict:
    """``variables`` with the top-level parameter modules of ``params`` replaced."""
    return {**variables, "params": {**variables["params"], **params}}


def take(tree: Params, i: int) -> Params:
    """Entry ``i`` of a pytree stacked on a leading axis."""
    return jax.tree.map(lambda a: a[i], tree)


def outside_ones(model, groups: Mapping[str, int]) -> dict[str, jax.Array]:
    """All-ones masks {group: [C]} for the model's groups NOT in ``groups``."""
    return {g: jnp.ones((c,), jnp.float32) for g, c in models.mask_groups(model).items()
            if g not in groups}


# --------------------------------------------------------------------------
# Feature selectors
# --------------------------------------------------------------------------


def selector_logits(params: Params | None, features: jax.Array) -> jax.Array:
    """Selector head: GAP (for [B, H, W, C]) + Dense -> [B, K]; ``params`` None = identity
    (the span ends at the logits)."""
    if params is None:
        return features
    pooled = jnp.mean(features, axis=(1, 2)) if features.ndim == 4 else features
    return pooled @ params["w"] + params["b"]


def selector_loss(params: Params | None, features: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean CE of the selector on features [B, ...] with integer labels [B]:
    −(1/B) Σ_b log softmax(selector_logits(features))[b, y_b]."""
    return losses.cross_entropy(selector_logits(params, features), labels)


def init_selectors(widths: Mapping[str, int], num_classes: int) -> dict:
    """Zero selector parameters {name: {'w' [C, K], 'b' [K]}} for feature widths {name: C}."""
    return {n: {"w": jnp.zeros((c, num_classes)), "b": jnp.zeros((num_classes,))}
            for n, c in widths.items()}


def selector_step(tx: optax.GradientTransformation, params: dict, opt_state,
                  features: Mapping[str, jax.Array], stops: Mapping[str, str],
                  labels: jax.Array) -> tuple[dict, Any, dict]:
    """One optimizer step on Σ_n selector_loss(params[n], features[stops[n]], labels).

    Returns (params, opt_state, {name: CE before the step})."""

    def loss_fn(p):
        per = {n: selector_loss(p[n], features[stops[n]], labels) for n in p}
        return sum(per.values()), per

    (_, per), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, per


def train_selectors(model, variables: dict, subnets: Sequence, batches: Iterator[dict],
                    steps: int, lr: float, num_classes: int) -> tuple[dict, dict]:
    """One selector per sub-network ending at a tap, trained with Adam(``lr``) for
    ``steps`` batches {'image', 'label'} on the frozen eval-mode features of ``model``.

    Returns ({subnet name: params, or None when the span ends at the logits},
    {name: train CE of the last step} (empty when steps = 0))."""
    stops = {s.name: s.stop for s in subnets if s.stop is not None}
    image = next(batches)["image"]
    shapes = jax.eval_shape(lambda v, x: model.apply(v, x)[1], variables,
                            jax.ShapeDtypeStruct((1, *image.shape[1:]), jnp.float32))
    params = init_selectors({n: shapes[t].shape[-1] for n, t in stops.items()}, num_classes)
    tx = optax.adam(lr)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, variables, images, labels):
        _, features = model.apply(variables, images, train=False)
        return selector_step(tx, params, opt_state, features, stops, labels)

    per = {}
    for _ in range(steps):
        batch = next(batches)
        params, opt_state, per = step(params, opt_state, variables, batch["image"],
                                      batch["label"])
    return {s.name: params.get(s.name) for s in subnets}, per


# --------------------------------------------------------------------------
# Cross-network constraint training (vmapped over K candidates)
# --------------------------------------------------------------------------


def constraint_loss(model, variables: dict, subnet, params: Params,
                    masks: Mapping[str, ArrayLike], h: jax.Array,
                    target: jax.Array) -> jax.Array:
    """mean((g_s(h; params, masks) − target)²) over every element, g_s = the span
    (subnet.start, subnet.stop] with the sub-network's modules replaced by ``params``
    and ``masks`` covering every group of the model."""
    out = apply_span(model, with_params(variables, params), h, masks, subnet.start,
                     subnet.stop)
    return jnp.mean(jnp.square(out - target))


def constraint_step(tx: optax.GradientTransformation, model, variables: dict, subnet,
                    stacked: Params, opt_state, cand_masks: Mapping[str, jax.Array],
                    images: jax.Array) -> tuple[Params, Any, jax.Array]:
    """One optimizer step for each of K candidates at once (jax.vmap).

    stacked: the sub-network's modules, leaves [K, ...]; opt_state: tx state of each
    (vmapped ``tx.init``); cand_masks: {group of the subnet: [K, C]}; images [B, ...].
    The target f_s and input f_{s-1} come from one unpruned eval-mode forward pass up to
    ``subnet.stop``. Returns (stacked, opt_state, loss before the step [K])."""
    logits, feats = model.apply(variables, images, train=False, stop=subnet.stop)
    h, target = span_io(images, logits, feats, subnet)
    ones = outside_ones(model, subnet.groups)

    def one(params, opt, masks):
        loss, grads = jax.value_and_grad(
            lambda p: constraint_loss(model, variables, subnet, p, {**ones, **masks}, h,
                                      target))(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    return jax.vmap(one)(stacked, opt_state, cand_masks)


def constraint_train(model, variables: dict, subnet, cand_masks: Mapping[str, jax.Array],
                     batches: Iterator[dict], steps: int, lr: float,
                     on_step: Callable[[int, jax.Array], None] | None = None) -> Params:
    """Train K pruned copies of a sub-network (``constraint_step``) for ``steps`` batches
    {'image'}: SGD (momentum 0.9, cosine decay from ``lr``), no weight decay.

    cand_masks: {group of the subnet: [K, C]}. ``on_step(i, loss [K])`` is called after
    every step i (0-based). Returns the trained modules {module: pytree [K, ...]}."""
    num = next(iter(cand_masks.values())).shape[0]
    own = {m: variables["params"][m] for m in subnet.modules}
    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (num, *a.shape)), own)
    tx = optax.sgd(optax.cosine_decay_schedule(lr, max(steps, 1)), momentum=0.9)
    opt_state = jax.vmap(tx.init)(stacked)
    step = jax.jit(lambda s, o, v, m, x: constraint_step(tx, model, v, subnet, s, o, m, x))
    for i in range(steps):
        stacked, opt_state, loss = step(stacked, opt_state, variables, cand_masks,
                                        next(batches)["image"])
        if on_step is not None:
            on_step(i, loss)
    return stacked


# --------------------------------------------------------------------------
# Impairment
# --------------------------------------------------------------------------


def with_unpruned(variables: dict, subnet, stacked: Params,
                  cand_masks: Mapping[str, jax.Array]) -> tuple[Params, dict]:
    """(params, masks) stacked [1 + K, ...]: entry 0 = the unpruned sub-network (its
    original modules, all-ones masks), entries 1..K = the candidates."""
    base_params = {m: variables["params"][m] for m in subnet.modules}
    base_masks = {g: jnp.ones((c,), jnp.float32) for g, c in subnet.groups.items()}
    cat = lambda b, c: jnp.concatenate([b[None], c])  # noqa: E731
    return jax.tree.map(cat, base_params, stacked), jax.tree.map(cat, base_masks, cand_masks)


def candidate_ce_sums(model, variables: dict, subnet, stacked: Params,
                      masks: Mapping[str, jax.Array], x: jax.Array, y: jax.Array,
                      w: jax.Array) -> jax.Array:
    """[N] weighted CE sums Σ_b w_b CE(logits_n[b], y_b) of the whole network with
    sub-network s replaced by candidate n (params/masks stacked [N, ...]); the unpruned
    prefix up to ``subnet.start`` is computed once."""
    h = x if subnet.start is None else model.apply(
        variables, x, stop=subnet.start)[1][subnet.start]
    ones = outside_ones(model, subnet.groups)

    def one(params, m):
        logits = apply_span(model, with_params(variables, params), h, {**ones, **m},
                            subnet.start, None)
        return jnp.sum(w * optax.softmax_cross_entropy_with_integer_labels(logits, y))

    return jax.vmap(one)(stacked, masks)


def impairment(ce_sums: ArrayLike, count: int) -> np.ndarray:
    """Δ [K] = ce_sums[1:] / count − ce_sums[0] / count (entry 0 = the unpruned network)."""
    mean = np.asarray(ce_sums, np.float64) / count
    return mean[1:] - mean[0]


def impairments(model, variables: dict, subnet, stacked: Params,
                cand_masks: Mapping[str, jax.Array], images: np.ndarray,
                labels: np.ndarray, batch_size: int) -> np.ndarray:
    """Δ_s(k) [K] on (images [N, ...], labels [N]): the unpruned network is an extra
    candidate 0 of the same vmapped call (one compilation); batches are padded to
    ``batch_size`` with zero weight."""
    params, masks = with_unpruned(variables, subnet, stacked, cand_masks)
    batch_ce = jax.jit(lambda v, p, m, x, y, w: candidate_ce_sums(model, v, subnet, p, m,
                                                                  x, y, w))
    total = np.zeros(1 + next(iter(cand_masks.values())).shape[0])
    for i in range(0, len(labels), batch_size):
        x, y = images[i:i + batch_size], labels[i:i + batch_size]
        pad = batch_size - len(y)
        w = np.concatenate([np.ones(len(y), np.float32), np.zeros(pad, np.float32)])
        x = np.concatenate([x, np.repeat(x[:1], pad, axis=0)])
        y = np.concatenate([y, np.repeat(y[:1], pad)])
        total += np.asarray(batch_ce(variables, params, masks, x, y, w), np.float64)
    return impairment(total, len(labels))
