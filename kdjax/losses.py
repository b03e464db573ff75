"""Pure knowledge-distillation losses for JAX.

This module is meant to be imported by other JAX projects: it depends on
``jax`` and ``jax.numpy`` only (no flax, tfds, clu, grain, TensorFlow).
Every function is a pure function of arrays, safe under ``jax.jit``,
``jax.vmap`` and ``jax.grad``.

Conventions
-----------
* Logits are ``[B, K]`` (batch, classes). Feature maps are NHWC ``[B, H, W, C]``.
* ``temperature`` is a Python or JAX scalar ``T > 0``.
* Reductions: a per-example loss ``l_i`` is reduced to a scalar by the batch
  mean, or, when ``weights`` ``[B]`` is given, by the weighted mean
  ``sum_i w_i l_i / max(sum_i w_i, eps)`` (``eps = 1e-12``). A zero weight
  therefore removes the example entirely (e.g. padding examples); all-zero
  weights give a loss of 0.
* Shapes are checked at trace time. Mismatches raise ``ValueError`` naming the
  shapes; nothing is broadcast silently.

Functions
---------
``cross_entropy``, ``kd_loss``, ``dynamic_kd_loss``, ``dkd_loss``, ``hint_loss``,
``attention_map``, ``attention_transfer_loss``, ``gram_matrix``,
``cross_layer_gram_loss``, ``entropy``, and helpers ``weighted_mean``,
``avg_pool_to``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

__all__ = [
    "weighted_mean",
    "cross_entropy",
    "kd_loss",
    "dynamic_kd_loss",
    "dkd_loss",
    "hint_loss",
    "attention_map",
    "attention_transfer_loss",
    "gram_matrix",
    "avg_pool_to",
    "cross_layer_gram_loss",
    "entropy",
]

_EPS = 1e-12


# --------------------------------------------------------------------------
# Shape checks and reductions
# --------------------------------------------------------------------------


def _shape(x) -> tuple:
    return tuple(jnp.shape(x))


def _check_ndim(name: str, x, ndim: int) -> None:
    if jnp.ndim(x) != ndim:
        raise ValueError(
            f"{name} must have rank {ndim}, got shape {_shape(x)}."
        )


def _check_logits_pair(student_logits, teacher_logits) -> None:
    _check_ndim("student_logits", student_logits, 2)
    _check_ndim("teacher_logits", teacher_logits, 2)
    if _shape(student_logits) != _shape(teacher_logits):
        raise ValueError(
            "student_logits and teacher_logits must have the same shape [B, K];"
            f" got {_shape(student_logits)} and {_shape(teacher_logits)}."
        )


def _check_labels(labels, batch: int, num_classes: int) -> None:
    if jnp.ndim(labels) != 1 or _shape(labels)[0] != batch:
        raise ValueError(
            f"labels must have shape [B] = [{batch}] (integer class ids); "
            f"got shape {_shape(labels)}."
        )
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(
            f"labels must be integers, got dtype {jnp.result_type(labels)}."
        )
    del num_classes


def _check_scalar(name: str, x) -> None:
    if jnp.ndim(x) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {_shape(x)}.")


def weighted_mean(values: jax.Array, weights: Optional[jax.Array] = None):
    """Batch reduction used by every loss in this module.

    ``values``: ``[B]`` per-example losses. Returns ``mean_i values_i`` when
    ``weights`` is None, else ``sum_i w_i values_i / max(sum_i w_i, 1e-12)``
    with ``weights`` of shape exactly ``[B]``.
    """
    _check_ndim("per-example values", values, 1)
    if weights is None:
        return jnp.mean(values)
    weights = jnp.asarray(weights)
    if _shape(weights) != _shape(values):
        raise ValueError(
            f"weights must have shape [B] = {_shape(values)}, got "
            f"{_shape(weights)}."
        )
    weights = weights.astype(values.dtype)
    # where() so that a zero-weight example with a non-finite loss is ignored.
    contrib = jnp.where(weights != 0, weights * values, 0.0)
    return jnp.sum(contrib) / jnp.maximum(jnp.sum(weights), _EPS)


def _kl_rows(teacher_scaled, student_scaled):
    """Per-row KL(softmax(a) || softmax(b)) for already temperature-scaled rows."""
    log_p = jax.nn.log_softmax(teacher_scaled, axis=-1)
    log_q = jax.nn.log_softmax(student_scaled, axis=-1)
    p = jnp.exp(log_p)
    return jnp.sum(p * (log_p - log_q), axis=-1)


# --------------------------------------------------------------------------
# Logit losses
# --------------------------------------------------------------------------


def cross_entropy(logits, labels, weights=None):
    """Softmax cross-entropy with integer labels.

    ``l_i = -log softmax(z_i)[y_i] = logsumexp(z_i) - z_i[y_i]``.

    Args:
      logits: ``[B, K]``.
      labels: ``[B]`` integer class ids in ``[0, K)``.
      weights: optional ``[B]``.

    Returns:
      scalar, batch mean (or weighted mean) of ``l_i``.
    """
    _check_ndim("logits", logits, 2)
    b, k = _shape(logits)
    _check_labels(labels, b, k)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    per_ex = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    return weighted_mean(per_ex, weights)


def kd_loss(student_logits, teacher_logits, temperature, weights=None):
    """Hinton knowledge distillation loss.

    ``l_i = T^2 * KL(p_t,i || p_s,i)`` with ``p = softmax(z / T)``, i.e.
    ``T^2 * sum_k p_t,ik (log p_t,ik - log p_s,ik)``.

    Gradient w.r.t. the student logits (unweighted): ``T (p_s - p_t) / B``.
    The teacher logits are used as given (wrap them in
    ``jax.lax.stop_gradient`` if the teacher should not be trained).

    Args:
      student_logits, teacher_logits: ``[B, K]`` each (same shape).
      temperature: scalar ``T > 0``.
      weights: optional ``[B]``.

    Returns:
      scalar, batch mean (or weighted mean) of ``l_i``.
    """
    _check_logits_pair(student_logits, teacher_logits)
    _check_scalar("temperature", temperature)
    t = temperature
    per_ex = _kl_rows(teacher_logits / t, student_logits / t) * (t * t)
    return weighted_mean(per_ex, weights)


def _broadcast_controller(controller, batch: int, num_classes: int,
                          controller_kind: Optional[str]):
    """Returns (controller reshaped to broadcast against [B, K], kind)."""
    c = jnp.asarray(controller)
    shape = _shape(c)
    if controller_kind is None:
        if c.ndim == 0:
            controller_kind = "scalar"
        elif shape == (batch, 1):
            controller_kind = "per_sample"
        elif shape == (1, num_classes) and batch != 1:
            controller_kind = "per_class"
        elif c.ndim == 1 and shape[0] == num_classes and batch != num_classes:
            controller_kind = "per_class"
        elif c.ndim == 1 and shape[0] == batch and batch != num_classes:
            controller_kind = "per_sample"
        elif c.ndim == 1 and shape[0] == batch == num_classes:
            raise ValueError(
                f"controller of shape {shape} is ambiguous for logits of shape "
                f"[{batch}, {num_classes}] (B == K): pass "
                "controller_kind='per_class' or 'per_sample', or use shape "
                "[1, K] (per class) / [B, 1] (per sample)."
            )
        else:
            raise ValueError(
                f"controller must be a scalar, [K]={num_classes} (per class) or "
                f"[B]={batch} / [B, 1] (per sample); got shape {shape} for "
                f"logits [{batch}, {num_classes}]."
            )
    if controller_kind == "scalar":
        if c.ndim != 0:
            raise ValueError(f"scalar controller must have shape (), got {shape}.")
        return c, "scalar"
    if controller_kind == "per_class":
        if shape not in ((num_classes,), (1, num_classes)):
            raise ValueError(
                f"per-class controller must have shape [K]=[{num_classes}] or "
                f"[1, K]; got {shape}."
            )
        return c.reshape(1, num_classes), "per_class"
    if controller_kind == "per_sample":
        if shape not in ((batch,), (batch, 1)):
            raise ValueError(
                f"per-sample controller must have shape [B]=[{batch}] or "
                f"[B, 1]; got {shape}."
            )
        return c.reshape(batch, 1), "per_sample"
    raise ValueError(
        "controller_kind must be None, 'scalar', 'per_class' or 'per_sample'; "
        f"got {controller_kind!r}."
    )


def dynamic_kd_loss(student_logits, teacher_logits, controller, temperature,
                    weights=None, controller_kind: Optional[str] = None):
    """DynamicKD loss: KD against a controller-scaled student distribution.

    ``l_i = T^2 * KL(softmax(z_t,i / T) || softmax(c * z_s,i / T))``.

    The controller ``c > 0`` multiplies the student logits inside the
    distillation term only (CE and inference use the raw logits). With
    ``c = 1`` (of any supported shape) this equals :func:`kd_loss` exactly.

    For a scalar ``c`` and one sample, with ``q_c = softmax(c z_s / T)`` and
    ``p_t = softmax(z_t / T)``:
    ``dl/dc = T (E_{q_c}[z_s] - E_{p_t}[z_s])`` and
    ``d2l/dc2 = Var_{q_c}(z_s) >= 0`` (convex in ``c``); the batch loss is the
    (weighted) mean of the per-sample losses.
    See :func:`kdjax.controllers.kd_controller_grad`.

    Args:
      student_logits, teacher_logits: ``[B, K]`` each.
      controller: scalar ``[]``; per-class ``[K]`` or ``[1, K]``; per-sample
        ``[B]`` or ``[B, 1]``. A 1-D controller with ``B == K`` is ambiguous and
        raises unless ``controller_kind`` is given.
      temperature: scalar ``T > 0``.
      weights: optional ``[B]``.
      controller_kind: optional ``'scalar' | 'per_class' | 'per_sample'`` to
        state the controller's meaning explicitly.

    Returns:
      scalar, batch mean (or weighted mean) of ``l_i``.
    """
    _check_logits_pair(student_logits, teacher_logits)
    _check_scalar("temperature", temperature)
    b, k = _shape(student_logits)
    c, _ = _broadcast_controller(controller, b, k, controller_kind)
    t = temperature
    per_ex = _kl_rows(teacher_logits / t, (c * student_logits) / t) * (t * t)
    return weighted_mean(per_ex, weights)


def dkd_loss(student_logits, teacher_logits, labels, alpha, beta, temperature,
             weights=None):
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022).

    With ``p = softmax(z / T)`` and target class ``y``:

    * binary distributions ``b = [p_y, 1 - p_y]``;
      ``TCKD = T^2 * KL(b_t || b_s)``;
    * non-target distributions ``p_hat_k = p_k / (1 - p_y)`` for ``k != y``
      (= softmax over the non-target logits);
      ``NCKD = T^2 * KL(p_hat_t || p_hat_s)``;
    * ``l_i = alpha * TCKD_i + beta * NCKD_i``.

    Everything is computed in log space (``log p_y = z_y/T - lse(z/T)``,
    ``log(1 - p_y) = lse_{k != y}(z/T) - lse(z/T)``), so it is finite and has
    finite gradients for extreme logits. Requires ``K >= 2``.

    Args:
      student_logits, teacher_logits: ``[B, K]``.
      labels: ``[B]`` integer class ids.
      alpha, beta: scalar weights of TCKD and NCKD.
      temperature: scalar ``T > 0``.
      weights: optional ``[B]``.

    Returns:
      scalar, batch mean (or weighted mean) of ``l_i``.
    """
    _check_logits_pair(student_logits, teacher_logits)
    b, k = _shape(student_logits)
    _check_labels(labels, b, k)
    _check_scalar("temperature", temperature)
    if k < 2:
        raise ValueError(f"dkd_loss needs K >= 2 classes, got logits {(b, k)}.")
    t = temperature
    onehot = jax.nn.one_hot(labels, k, dtype=bool)

    def parts(z):
        x = z / t
        lse_all = jax.nn.logsumexp(x, axis=-1)
        x_nt = jnp.where(onehot, -jnp.inf, x)
        lse_nt = jax.nn.logsumexp(x_nt, axis=-1)
        x_y = jnp.sum(jnp.where(onehot, x, 0.0), axis=-1)
        log_bin = jnp.stack([x_y - lse_all, lse_nt - lse_all], axis=-1)  # [B,2]
        # log p_hat, set to 0 at the target (its probability is set to 0).
        log_hat = jnp.where(onehot, 0.0, x - lse_nt[:, None])
        return log_bin, log_hat

    log_bin_t, log_hat_t = parts(teacher_logits)
    log_bin_s, log_hat_s = parts(student_logits)
    tckd = jnp.sum(jnp.exp(log_bin_t) * (log_bin_t - log_bin_s), axis=-1)
    p_hat_t = jnp.where(onehot, 0.0, jnp.exp(log_hat_t))
    nckd = jnp.sum(p_hat_t * (log_hat_t - log_hat_s), axis=-1)
    per_ex = (alpha * tckd + beta * nckd) * (t * t)
    return weighted_mean(per_ex, weights)


def entropy(logits, temperature=1.0):
    """Per-example Shannon entropy in nats of ``softmax(z / T)``.

    ``H_i = -sum_k p_ik log p_ik``, ``p_i = softmax(z_i / T)``.

    Args:
      logits: ``[B, K]``.
      temperature: scalar ``T > 0``.

    Returns:
      ``[B]`` (no reduction).
    """
    _check_ndim("logits", logits, 2)
    _check_scalar("temperature", temperature)
    log_p = jax.nn.log_softmax(logits / temperature, axis=-1)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


# --------------------------------------------------------------------------
# Feature losses
# --------------------------------------------------------------------------


def hint_loss(student_feature, teacher_feature, weights=None):
    """FitNets hint loss: mean squared error of (adapted) features.

    ``l_i = mean_{j} (s_ij - t_ij)^2`` over all non-batch elements ``j``.
    The student feature must already be mapped to the teacher's shape
    (e.g. by a regressor/adapter owned by the caller).

    Args:
      student_feature, teacher_feature: same shape ``[B, ...]`` (rank >= 1).
      weights: optional ``[B]``.

    Returns:
      scalar, batch mean (or weighted mean) of ``l_i``.
    """
    if _shape(student_feature) != _shape(teacher_feature):
        raise ValueError(
            "hint_loss needs student and teacher features of the same shape; "
            f"got {_shape(student_feature)} and {_shape(teacher_feature)}."
        )
    if jnp.ndim(student_feature) < 1:
        raise ValueError("hint_loss features need a batch axis.")
    b = _shape(student_feature)[0]
    diff = (student_feature - teacher_feature).reshape(b, -1)
    per_ex = jnp.mean(diff * diff, axis=-1)
    return weighted_mean(per_ex, weights)


def avg_pool_to(feature, height: int, width: int):
    """Average-pools an NHWC map ``[B, H, W, C]`` to ``[B, height, width, C]``.

    ``H`` and ``W`` must be integer multiples of ``height`` and ``width``
    (non-overlapping windows of ``H/height x W/width``); raises ValueError
    otherwise.
    """
    _check_ndim("feature", feature, 4)
    b, h, w, c = _shape(feature)
    if height <= 0 or width <= 0 or h % height or w % width:
        raise ValueError(
            f"cannot average-pool a map of spatial size {(h, w)} to "
            f"{(height, width)}: sizes must be integer multiples."
        )
    fh, fw = h // height, w // width
    if fh == 1 and fw == 1:
        return feature
    return feature.reshape(b, height, fh, width, fw, c).mean(axis=(2, 4))


def _match_spatial(a, b):
    """Pools the larger of two NHWC maps to the other's spatial size."""
    ha, wa = _shape(a)[1:3]
    hb, wb = _shape(b)[1:3]
    if (ha, wa) == (hb, wb):
        return a, b
    if ha >= hb and wa >= wb:
        return avg_pool_to(a, hb, wb), b
    if hb >= ha and wb >= wa:
        return a, avg_pool_to(b, ha, wa)
    raise ValueError(
        f"spatial sizes {(ha, wa)} and {(hb, wb)} are not ordered: neither map "
        "is at least as large as the other in both dimensions."
    )


def attention_map(feature, p=2):
    """Attention-transfer spatial map (Zagoruyko & Komodakis, 2017).

    ``Q_b = v_b / ||v_b||_2`` with ``v_b[s] = sum_c |F[b, s, c]|^p`` over the
    flattened spatial positions ``s`` (the norm is floored at ``1e-12`` in a
    gradient-safe way).

    Args:
      feature: NHWC ``[B, H, W, C]``.
      p: exponent (default 2).

    Returns:
      ``[B, H * W]``, each row of unit L2 norm (or zero for an all-zero map).
    """
    _check_ndim("feature", feature, 4)
    b = _shape(feature)[0]
    v = jnp.sum(jnp.abs(feature) ** p, axis=-1).reshape(b, -1)
    sq = jnp.sum(v * v, axis=-1, keepdims=True)
    return v / jnp.sqrt(jnp.maximum(sq, _EPS * _EPS))


def attention_transfer_loss(student_feature, teacher_feature, p=2,
                            weights=None):
    """Attention-transfer loss.

    ``l_i = mean_s (Q_s[i, s] - Q_t[i, s])^2`` with ``Q`` from
    :func:`attention_map`; the mean runs over the ``H * W`` spatial positions.

    Spatial sizes: if they differ, the larger *feature map* is average-pooled
    (integer factor per axis, see :func:`avg_pool_to`) to the smaller size
    before the attention map is taken; non-integer ratios raise ValueError.
    Channel counts may differ (the map sums over channels). Batch sizes must
    match.

    Args:
      student_feature: ``[B, Hs, Ws, Cs]``; teacher_feature: ``[B, Ht, Wt, Ct]``.
      p: exponent (default 2).
      weights: optional ``[B]``.

    Returns:
      scalar, batch mean (or weighted mean) of ``l_i``.
    """
    _check_ndim("student_feature", student_feature, 4)
    _check_ndim("teacher_feature", teacher_feature, 4)
    if _shape(student_feature)[0] != _shape(teacher_feature)[0]:
        raise ValueError(
            f"batch sizes differ: student {_shape(student_feature)}, teacher "
            f"{_shape(teacher_feature)}."
        )
    s, t = _match_spatial(student_feature, teacher_feature)
    d = attention_map(s, p) - attention_map(t, p)
    return weighted_mean(jnp.mean(d * d, axis=-1), weights)


def gram_matrix(feature_a, feature_b):
    """Cross-layer Gram matrix of two NHWC maps with equal ``B, H, W``.

    ``G[b, i, j] = (1 / (H W)) sum_{s,t} A[b, s, t, i] B[b, s, t, j]``.

    Args:
      feature_a: ``[B, H, W, Ca]``; feature_b: ``[B, H, W, Cb]``.

    Returns:
      ``[B, Ca, Cb]``.
    """
    _check_ndim("feature_a", feature_a, 4)
    _check_ndim("feature_b", feature_b, 4)
    if _shape(feature_a)[:3] != _shape(feature_b)[:3]:
        raise ValueError(
            "gram_matrix needs equal [B, H, W]; got "
            f"{_shape(feature_a)} and {_shape(feature_b)}."
        )
    _, h, w, _ = _shape(feature_a)
    return jnp.einsum("bhwi,bhwj->bij", feature_a, feature_b) / (h * w)


def cross_layer_gram_loss(student_a, student_b, teacher_a, teacher_b,
                          weights=None):
    """Cross-layer Gram-matrix distillation loss (Chou, Chiu & Liao, 2021).

    For each pair, the map with the larger spatial size is average-pooled
    (integer factor, :func:`avg_pool_to`) to the smaller one; then
    ``G_s = gram(student_a, student_b)``, ``G_t = gram(teacher_a, teacher_b)``
    and ``l_i = mean_{jk} (G_s[i, j, k] - G_t[i, j, k])^2``.

    The student and teacher pairs may have different resolutions from each
    other, but ``G_s`` and ``G_t`` must have the same shape ``[B, Ca, Cb]``
    (the student side is assumed already projected to the teacher's channel
    counts by 1x1 adapters); otherwise ValueError.

    Args:
      student_a, student_b, teacher_a, teacher_b: NHWC maps.
      weights: optional ``[B]``.

    Returns:
      scalar, batch mean (or weighted mean) of ``l_i``.
    """
    for name, x in (("student_a", student_a), ("student_b", student_b),
                    ("teacher_a", teacher_a), ("teacher_b", teacher_b)):
        _check_ndim(name, x, 4)
    sa, sb = _match_spatial(student_a, student_b)
    ta, tb = _match_spatial(teacher_a, teacher_b)
    gs = gram_matrix(sa, sb)
    gt = gram_matrix(ta, tb)
    if _shape(gs) != _shape(gt):
        raise ValueError(
            f"student Gram {_shape(gs)} (from {_shape(student_a)}, "
            f"{_shape(student_b)}) and teacher Gram {_shape(gt)} (from "
            f"{_shape(teacher_a)}, {_shape(teacher_b)}) differ: adapt the "
            "student channels to the teacher's first."
        )
    d = (gs - gt).reshape(_shape(gs)[0], -1)
    return weighted_mean(jnp.mean(d * d, axis=-1), weights)
