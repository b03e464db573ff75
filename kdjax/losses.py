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
Logits: ``cross_entropy``, ``kd_loss``, ``dynamic_kd_loss``, ``dkd_loss``,
``entropy``, ``logit_standardize``.
Features (the classic distillation zoo): ``hint_loss`` (FitNet),
``attention_map`` / ``attention_transfer_loss`` (AT),
``similarity_preserving_loss`` (SP), ``correlation_congruence_loss`` (CC),
``vid_loss`` (VID), ``rkd_loss`` (RKD), ``pkt_loss`` (PKT), ``ab_loss`` (AB),
``factor_transfer_loss`` (FT), ``fsp_matrix`` / ``fsp_loss`` (FSP),
``nst_loss`` (NST), ``crd_nce_loss`` / ``crd_estimate_normalizer`` /
``crd_memory_update`` (CRD), ``gram_matrix`` / ``cross_layer_gram_loss``.
Helpers: ``weighted_mean``, ``avg_pool_to``.

Batch-level losses (SP, CC, RKD, PKT) compare relations *between* the examples
of a batch, so they have no per-example value and take no ``weights``; the
caller must not pad their inputs.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

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
    "logit_standardize",
    "similarity_preserving_loss",
    "correlation_congruence_loss",
    "vid_loss",
    "rkd_loss",
    "pkt_loss",
    "ab_loss",
    "factor_transfer_loss",
    "fsp_matrix",
    "fsp_loss",
    "nst_loss",
    "crd_estimate_normalizer",
    "crd_nce_loss",
    "crd_memory_update",
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


def _check_min_ndim(name: str, x, ndim: int) -> None:
    if jnp.ndim(x) < ndim:
        raise ValueError(
            f"{name} must have rank >= {ndim}, got shape {_shape(x)}."
        )


def _check_same_batch(name_a: str, a, name_b: str, b) -> None:
    if _shape(a)[:1] != _shape(b)[:1]:
        raise ValueError(
            f"batch sizes differ: {name_a} {_shape(a)}, {name_b} {_shape(b)}."
        )


def _check_same_shape(name_a: str, a, name_b: str, b, min_ndim: int = 0) -> None:
    _check_min_ndim(name_a, a, min_ndim)
    if _shape(a) != _shape(b):
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape; got "
            f"{_shape(a)} and {_shape(b)}."
        )


def _flatten_batch(x):
    """``[B, ...] -> [B, D]``."""
    return jnp.reshape(x, (_shape(x)[0], -1))


def _safe_sqrt(x):
    """``sqrt(x)`` for ``x >= 0`` with a zero (not NaN) gradient at ``x = 0``."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _l2_normalize(x, axis: int = -1):
    """``x / max(||x||_2, 1e-12)`` along ``axis`` (finite gradient at 0)."""
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(sq, _EPS * _EPS))


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


def logit_standardize(logits, eps=1e-7):
    """Logit standardisation (Sun et al., CVPR 2024): z-score every row.

    ``out_ik = (z_ik - mean_k z_ik) / (std_k z_ik + eps)`` with the population
    standard deviation ``std_k z_i = sqrt(mean_k (z_ik - mean_k z_ik)^2)``.
    Apply it to both the student's and the teacher's logits before any logit
    loss (e.g. ``kd_loss(logit_standardize(z_s), logit_standardize(z_t), T)``).
    The paper's code uses PyTorch's default (Bessel-corrected) std, i.e. its
    output is ours times ``sqrt((K - 1) / K)`` (0.995 for 100 classes).
    A constant row maps to zeros, with a finite gradient.

    Args:
      logits: ``[B, K]``.
      eps: added to the std.

    Returns:
      ``[B, K]``, rows with mean 0 and (population) std ``std / (std + eps)``.
    """
    _check_ndim("logits", logits, 2)
    centred = logits - jnp.mean(logits, axis=-1, keepdims=True)
    std = _safe_sqrt(jnp.mean(centred * centred, axis=-1, keepdims=True))
    return centred / (std + eps)


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


def _pooled_map_pair(student_feature, teacher_feature):
    """Checks two NHWC maps of one batch; pools the larger to the other's size."""
    _check_ndim("student_feature", student_feature, 4)
    _check_ndim("teacher_feature", teacher_feature, 4)
    _check_same_batch("student_feature", student_feature, "teacher_feature",
                      teacher_feature)
    return _match_spatial(student_feature, teacher_feature)


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
    return _l2_normalize(_flatten_batch(jnp.sum(jnp.abs(feature) ** p, axis=-1)))


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
    s, t = _pooled_map_pair(student_feature, teacher_feature)
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


def fsp_matrix(feature_a, feature_b):
    """FSP ("flow of solution procedure") matrix of two layers (Yim et al., 2017).

    The map with the larger spatial size is average-pooled (integer factor,
    :func:`avg_pool_to`) to the other's size, then
    ``G[b, i, j] = (1 / (H W)) sum_s A[b, s, i] B[b, s, j]`` over the ``H W``
    positions ``s`` (:func:`gram_matrix`).

    Args:
      feature_a: ``[B, Ha, Wa, Ca]``; feature_b: ``[B, Hb, Wb, Cb]``.

    Returns:
      ``[B, Ca, Cb]``.
    """
    _check_ndim("feature_a", feature_a, 4)
    _check_ndim("feature_b", feature_b, 4)
    return gram_matrix(*_match_spatial(feature_a, feature_b))


def _gram_pair_error(student_pair, teacher_pair):
    """Per-example ``mean_{jk} (G_s - G_t)^2`` of two FSP matrices -> ``[B]``."""
    gs = fsp_matrix(*student_pair)
    gt = fsp_matrix(*teacher_pair)
    if _shape(gs) != _shape(gt):
        raise ValueError(
            f"student Gram {_shape(gs)} (from "
            f"{[_shape(x) for x in student_pair]}) and teacher Gram "
            f"{_shape(gt)} (from {[_shape(x) for x in teacher_pair]}) differ: "
            "adapt the student channels to the teacher's first."
        )
    d = _flatten_batch(gs - gt)
    return jnp.mean(d * d, axis=-1)


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
    per_ex = _gram_pair_error((student_a, student_b), (teacher_a, teacher_b))
    return weighted_mean(per_ex, weights)


# --------------------------------------------------------------------------
# The classic distillation zoo (inputs already projected by the caller)
# --------------------------------------------------------------------------


def _check_embedding_pair(student_embedding, teacher_embedding) -> None:
    _check_ndim("student_embedding", student_embedding, 2)
    _check_ndim("teacher_embedding", teacher_embedding, 2)
    _check_same_batch("student_embedding", student_embedding,
                      "teacher_embedding", teacher_embedding)


def _check_nonnegative_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")


def similarity_preserving_loss(student_feature, teacher_feature):
    """Similarity-preserving loss (Tung & Mori, ICCV 2019). Batch-level.

    With ``F`` the feature flattened to ``[B, D]``: ``G = F F^T`` ``[B, B]``,
    each row L2-normalised (``G~_i = G_i / ||G_i||_2``), and
    ``loss = ||G~_s - G~_t||_F^2 / B^2``.

    Args:
      student_feature: ``[B, ...]``; teacher_feature: ``[B, ...]`` (rank >= 2;
        only the batch sizes must match).

    Returns:
      scalar.
    """
    _check_min_ndim("student_feature", student_feature, 2)
    _check_min_ndim("teacher_feature", teacher_feature, 2)
    _check_same_batch("student_feature", student_feature, "teacher_feature",
                      teacher_feature)

    def similarity(f):
        f = _flatten_batch(f)
        return _l2_normalize(f @ f.T)

    d = similarity(student_feature) - similarity(teacher_feature)
    return jnp.sum(d * d) / (_shape(d)[0] ** 2)


def correlation_congruence_loss(student_embedding, teacher_embedding,
                                gamma=0.4, order=2):
    """Correlation congruence (Peng et al., ICCV 2019). Batch-level.

    Embeddings are L2-normalised (``f_i <- f_i / ||f_i||``); the correlation
    between examples is the Gaussian RBF kernel
    ``exp(-gamma ||f_i - f_j||^2) = exp(-2 gamma) exp(2 gamma f_i.f_j)``,
    approximated by its Taylor series of order ``P``:
    ``C_ij = sum_{p=0..P} exp(-2 gamma) (2 gamma)^p / p! (f_i . f_j)^p``;
    ``loss = ||C_s - C_t||_F^2 / B^2``.
    (This is the paper's kernel; RepDistiller's ``Correlation`` loss is a
    different simplification.)

    Args:
      student_embedding: ``[B, Ds]``; teacher_embedding: ``[B, Dt]``.
      gamma: kernel width ``gamma``.
      order: Python int ``P >= 0``.

    Returns:
      scalar.
    """
    _check_embedding_pair(student_embedding, teacher_embedding)
    _check_nonnegative_int("order", order)

    def correlation(e):
        u = _l2_normalize(e)
        x = 2.0 * gamma * (u @ u.T)
        series = sum(x ** p / float(math.factorial(p)) for p in range(order + 1))
        return jnp.exp(-2.0 * gamma) * series

    d = correlation(student_embedding) - correlation(teacher_embedding)
    return jnp.sum(d * d) / (_shape(d)[0] ** 2)


def vid_loss(student_mean, teacher_feature, log_variance_param, eps=1e-6,
             weights=None):
    """Variational information distillation (Ahn et al., CVPR 2019).

    Gaussian negative log-likelihood (without the constant) of the teacher
    feature ``t`` under ``N(mu, sigma^2)``: ``mu`` is the student's regressed
    feature and the per-channel variance is
    ``sigma_c^2 = softplus(alpha_c) + eps``:
    ``l_i = mean_{positions, c} 0.5 ((t - mu)^2 / sigma_c^2 + log sigma_c^2)``.
    To start from a variance ``v0``, initialise ``alpha = log(exp(v0 - eps) - 1)``.

    Args:
      student_mean, teacher_feature: same shape ``[B, ..., C]`` (rank >= 2).
      log_variance_param: ``alpha``, ``[C]`` (the last axis).
      eps: variance floor.
      weights: optional ``[B]``.

    Returns:
      scalar, batch mean (or weighted mean) of ``l_i``.
    """
    _check_same_shape("student_mean", student_mean, "teacher_feature",
                      teacher_feature, min_ndim=2)
    channels = _shape(teacher_feature)[-1]
    if _shape(log_variance_param) != (channels,):
        raise ValueError(
            f"log_variance_param must have shape [C] = ({channels},) (the last "
            f"axis of the features), got {_shape(log_variance_param)}."
        )
    var = jax.nn.softplus(log_variance_param) + eps
    d = teacher_feature - student_mean
    nll = 0.5 * (d * d / var + jnp.log(var))
    return weighted_mean(jnp.mean(_flatten_batch(nll), axis=-1), weights)


def _huber(x):
    """Smooth L1 (``delta = 1``): ``0.5 x^2`` if ``|x| < 1``, else ``|x| - 0.5``."""
    a = jnp.abs(x)
    return jnp.where(a < 1.0, 0.5 * x * x, a - 0.5)


def _rkd_distance(e):
    """``[B, B]`` distances divided by their mean over the pairs ``i != j``."""
    b = _shape(e)[0]
    diff = e[:, None, :] - e[None, :, :]
    d = _safe_sqrt(jnp.sum(diff * diff, axis=-1))
    mean = jnp.sum(d) / (b * (b - 1))  # the diagonal is 0
    return d / jnp.maximum(mean, _EPS)


def _rkd_angle(e):
    """``[B, B, B]``, ``A[j, i, k]`` = cos of the angle e_i e_j e_k (at e_j)."""
    u = _l2_normalize(e[None, :, :] - e[:, None, :])  # u[j, i] ~ e_i - e_j
    return jnp.einsum("jid,jkd->jik", u, u)


def rkd_loss(student_embedding, teacher_embedding, distance_weight=25.0,
             angle_weight=50.0):
    """Relational knowledge distillation (Park et al., CVPR 2019). Batch-level.

    * Distance potential ``psi_D(i, j) = ||e_i - e_j|| / mu`` with ``mu`` the
      mean of ``||e_i - e_j||`` over the ``B (B - 1)`` pairs ``i != j``.
    * Angle potential ``psi_A(i, j, k) = <u_ji, u_jk>`` with
      ``u_ji = (e_i - e_j) / ||e_i - e_j||`` (cosine of the angle at ``e_j``).
    * ``loss = distance_weight * mean_{i != j} h(psi_D^s - psi_D^t)
      + angle_weight * mean_{i, j, k distinct} h(psi_A^s - psi_A^t)``,
      ``h`` the Huber loss with ``delta = 1`` (smooth L1).

    The means run over the paper's sets of distinct pairs/triplets (the paper
    writes sums; RepDistiller averages over all ``B^2`` / ``B^3`` entries,
    degenerate ones included, and its weights 25 / 50 assume averages).

    Args:
      student_embedding: ``[B, Ds]``; teacher_embedding: ``[B, Dt]``; ``B >= 3``.
      distance_weight, angle_weight: the two terms' weights.

    Returns:
      scalar.
    """
    _check_embedding_pair(student_embedding, teacher_embedding)
    b = _shape(student_embedding)[0]
    if b < 3:
        raise ValueError(f"rkd_loss needs a batch of at least 3, got {b}.")
    idx = jnp.arange(b)
    pairs = idx[:, None] != idx[None, :]
    triplets = pairs[:, :, None] & pairs[:, None, :] & pairs[None, :, :]
    h_d = _huber(_rkd_distance(student_embedding)
                 - _rkd_distance(teacher_embedding))
    h_a = _huber(_rkd_angle(student_embedding) - _rkd_angle(teacher_embedding))
    loss_d = jnp.sum(jnp.where(pairs, h_d, 0.0)) / (b * (b - 1))
    loss_a = jnp.sum(jnp.where(triplets, h_a, 0.0)) / (b * (b - 1) * (b - 2))
    return distance_weight * loss_d + angle_weight * loss_a


def pkt_loss(student_embedding, teacher_embedding, eps=1e-7):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018). Batch-level.

    Rows are L2-normalised; the cosine kernel mapped to ``[0, 1]``,
    ``K_ij = (cos(e_i, e_j) + 1) / 2`` (``j = i`` included, as in the authors'
    code), is row-normalised to conditional probabilities
    ``P_ij = K_ij / sum_j K_ij``; then
    ``loss = mean_i sum_j P^t_ij log((P^t_ij + eps) / (P^s_ij + eps))``.
    RepDistiller averages over all ``B^2`` entries instead, i.e. its value is
    this one divided by ``B`` (its weight 30000 assumes that).

    Args:
      student_embedding: ``[B, Ds]``; teacher_embedding: ``[B, Dt]``.
      eps: smoothing inside the log.

    Returns:
      scalar.
    """
    _check_embedding_pair(student_embedding, teacher_embedding)

    def conditional(e):
        u = _l2_normalize(e)
        k = (u @ u.T + 1.0) / 2.0
        return k / jnp.sum(k, axis=-1, keepdims=True)

    p_t = conditional(teacher_embedding)
    p_s = conditional(student_embedding)
    kl = jnp.sum(p_t * jnp.log((p_t + eps) / (p_s + eps)), axis=-1)
    return jnp.mean(kl)


def ab_loss(student_preact, teacher_preact, margin=1.0, weights=None):
    """Activation-boundary loss (Heo et al., AAAI 2019).

    Per element, with the student's (connected) pre-activation ``s``, the
    teacher's pre-activation ``t`` and margin ``m``:
    ``e = (s + m)^2 1[s > -m] 1[t <= 0] + (s - m)^2 1[s <= m] 1[t > 0]``;
    ``l_i = mean of e over the non-batch elements``.

    Args:
      student_preact, teacher_preact: same shape ``[B, ..., C]`` (rank >= 2).
      margin: scalar or per-channel ``[C]`` (RepDistiller derives it from the
        teacher's BN statistics).
      weights: optional ``[B]``.

    Returns:
      scalar, batch mean (or weighted mean) of ``l_i``.
    """
    _check_same_shape("student_preact", student_preact, "teacher_preact",
                      teacher_preact, min_ndim=2)
    channels = _shape(student_preact)[-1]
    if _shape(margin) not in ((), (channels,)):
        raise ValueError(
            f"margin must be a scalar or [C] = ({channels},), got "
            f"{_shape(margin)}."
        )
    s, t, m = student_preact, teacher_preact, margin
    below = jnp.where((s > -m) & (t <= 0), (s + m) ** 2, 0.0)
    above = jnp.where((s <= m) & (t > 0), (s - m) ** 2, 0.0)
    return weighted_mean(jnp.mean(_flatten_batch(below + above), axis=-1),
                         weights)


def factor_transfer_loss(student_factor, teacher_factor, p=1, weights=None):
    """Factor transfer (Kim, Park & Kwak, NeurIPS 2018).

    Each factor is flattened to ``[B, D]`` and L2-normalised per example;
    ``l_i = (1/D) sum_d |f_s,id / ||f_s,i|| - f_t,id / ||f_t,i|| |^p``
    (``p = 1``: the paper's L1 distance, averaged over the ``D`` elements).

    Args:
      student_factor: the translator's output; teacher_factor: the
        paraphraser's factor; same shape ``[B, ...]`` (rank >= 2).
      p: exponent (1 or 2 in the paper).
      weights: optional ``[B]``.

    Returns:
      scalar, batch mean (or weighted mean) of ``l_i``.
    """
    _check_same_shape("student_factor", student_factor, "teacher_factor",
                      teacher_factor, min_ndim=2)
    d = (_l2_normalize(_flatten_batch(student_factor))
         - _l2_normalize(_flatten_batch(teacher_factor)))
    return weighted_mean(jnp.mean(jnp.abs(d) ** p, axis=-1), weights)


def fsp_loss(student_pairs: Sequence, teacher_pairs: Sequence, weights=None):
    """FSP distillation loss (Yim et al., CVPR 2017).

    For the ``n``-th pair, ``G^s_n = fsp_matrix(*student_pairs[n])`` and
    ``G^t_n = fsp_matrix(*teacher_pairs[n])`` (equal shapes ``[B, Ca, Cb]``);
    ``l_i = mean_n mean_{jk} (G^s_n[i, j, k] - G^t_n[i, j, k])^2``.
    (RepDistiller sums the pairs' losses instead of averaging them.)

    Args:
      student_pairs, teacher_pairs: equally long non-empty sequences of
        ``(feature_a, feature_b)`` NHWC tuples.
      weights: optional ``[B]``.

    Returns:
      scalar, batch mean (or weighted mean) of ``l_i``.
    """
    if len(student_pairs) != len(teacher_pairs) or not student_pairs:
        raise ValueError(
            "fsp_loss needs equally many (non-zero) student and teacher pairs; "
            f"got {len(student_pairs)} and {len(teacher_pairs)}."
        )
    for name, pairs in (("student_pairs", student_pairs),
                        ("teacher_pairs", teacher_pairs)):
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"{name} must hold (feature_a, feature_b) tuples.")
    per_pair = [_gram_pair_error(s, t)
                for s, t in zip(student_pairs, teacher_pairs)]
    return weighted_mean(sum(per_pair) / len(per_pair), weights)


def nst_loss(student_feature, teacher_feature, weights=None):
    """Neuron selectivity transfer (Huang & Wang, 2017): polynomial MMD.

    The larger map is average-pooled to the other's spatial size
    (:func:`avg_pool_to`); each channel's map becomes a vector over the ``HW``
    positions, L2-normalised: ``s_c`` (``Cs`` of them), ``t_c`` (``Ct``). With
    ``k(x, y) = (x . y)^2``:
    ``l_i = mean_{c,c'} k(s_c, s_c') + mean_{c,c'} k(t_c, t_c')
    - 2 mean_{c,c'} k(s_c, t_c')``.

    Args:
      student_feature: ``[B, Hs, Ws, Cs]``; teacher_feature: ``[B, Ht, Wt, Ct]``.
      weights: optional ``[B]``.

    Returns:
      scalar, batch mean (or weighted mean) of ``l_i``.
    """
    s, t = _pooled_map_pair(student_feature, teacher_feature)

    def channel_vectors(f):  # [B, H, W, C] -> [B, C, HW], unit rows
        b, h, w, c = _shape(f)
        return _l2_normalize(jnp.swapaxes(f.reshape(b, h * w, c), 1, 2))

    def mean_kernel(x, y):
        return jnp.mean(jnp.einsum("bid,bjd->bij", x, y) ** 2, axis=(1, 2))

    vs, vt = channel_vectors(s), channel_vectors(t)
    per_ex = mean_kernel(vs, vs) + mean_kernel(vt, vt) - 2.0 * mean_kernel(vs, vt)
    return weighted_mean(per_ex, weights)


def _check_crd_inputs(anchor, positive, negatives) -> None:
    _check_ndim("anchor", anchor, 2)
    _check_same_shape("anchor", anchor, "positive", positive)
    _check_ndim("negatives", negatives, 3)
    b, d = _shape(anchor)
    if _shape(negatives)[0] != b or _shape(negatives)[2] != d:
        raise ValueError(
            f"negatives must have shape [B, N, D] = [{b}, N, {d}], got "
            f"{_shape(negatives)}."
        )


def _crd_scores(anchor, positive, negatives, temperature):
    """``(a.x_pos / T [B], a.x_neg / T [B, N])``."""
    pos = jnp.sum(anchor * positive, axis=-1) / temperature
    neg = jnp.einsum("bd,bnd->bn", anchor, negatives) / temperature
    return pos, neg


def crd_estimate_normalizer(anchor, positive, negatives, num_data,
                            temperature=0.07):
    """CRD's normalisation constant, estimated once on one batch.

    ``Z = num_data * mean(exp(a . x / T))`` over the ``B (N + 1)`` positive and
    negative scores (RepDistiller estimates it on the first batch and freezes
    it). Computed in log space; no gradient flows through it.

    Args: as :func:`crd_nce_loss`.

    Returns:
      scalar ``Z > 0``.
    """
    _check_crd_inputs(anchor, positive, negatives)
    pos, neg = _crd_scores(anchor, positive, negatives, temperature)
    scores = jnp.concatenate([pos[:, None], neg], axis=1)
    log_z = (jnp.log(num_data) + jax.nn.logsumexp(scores)
             - jnp.log(scores.size))
    return jax.lax.stop_gradient(jnp.exp(log_z))


def crd_nce_loss(anchor, positive, negatives, normalizer, num_data,
                 temperature=0.07, weights=None):
    """Contrastive representation distillation, one direction (Tian et al., 2020).

    Scores ``P(x) = exp(a . x / T) / Z`` with ``Z = normalizer`` (an explicit
    argument: the caller estimates it once, e.g. with
    :func:`crd_estimate_normalizer`, and keeps it fixed); noise probability
    ``P_n = 1 / num_data``; ``N`` negatives per example:
    ``l_i = -log(P(x+) / (P(x+) + N P_n))
    - sum_n log(N P_n / (P(x-_n) + N P_n))``.
    Computed in log space as ``softplus(log(N P_n) - log P(x+))
    + sum_n softplus(log P(x-_n) - log(N P_n))`` (same value, no epsilon).
    The full CRD objective is the sum of two directions: teacher anchors
    against the student memory bank and student anchors against the teacher's.

    Args:
      anchor: ``[B, D]``, L2-normalised embeddings (not normalised here).
      positive: ``[B, D]``, the other side's embedding of the same example
        (RepDistiller: that side's memory-bank row at the example's index).
      negatives: ``[B, N, D]``, rows drawn from a memory bank by the caller.
      normalizer: scalar ``Z > 0``.
      num_data: the dataset size (scalar).
      temperature: ``T``.
      weights: optional ``[B]``.

    Returns:
      scalar, batch mean (or weighted mean) of ``l_i``.
    """
    _check_crd_inputs(anchor, positive, negatives)
    _check_scalar("normalizer", normalizer)
    _check_scalar("num_data", num_data)
    pos, neg = _crd_scores(anchor, positive, negatives, temperature)
    log_z = jnp.log(normalizer)
    log_noise = jnp.log(_shape(negatives)[1] / num_data)  # log(N P_n)
    per_ex = (jax.nn.softplus(log_noise - (pos - log_z))
              + jnp.sum(jax.nn.softplus((neg - log_z) - log_noise), axis=-1))
    return weighted_mean(per_ex, weights)


def crd_memory_update(bank, indices, new, momentum=0.5):
    """CRD memory-bank update: momentum average, then re-L2-normalise.

    ``bank[idx_b] <- normalise(momentum * bank[idx_b] + (1 - momentum) new_b)``;
    other rows unchanged. ``new`` enters without gradient. ``indices`` must
    be distinct (repeated indices: which write wins is unspecified).

    Args:
      bank: ``[num_data, D]``; indices: ``[B]`` integer dataset indices;
      new: ``[B, D]``; momentum: scalar in ``[0, 1]``.

    Returns:
      the updated ``[num_data, D]`` bank (a new array).
    """
    _check_ndim("bank", bank, 2)
    _check_ndim("new", new, 2)
    if _shape(indices) != _shape(new)[:1]:
        raise ValueError(
            f"indices must have shape [B] = {_shape(new)[:1]}, got "
            f"{_shape(indices)}."
        )
    if not jnp.issubdtype(jnp.result_type(indices), jnp.integer):
        raise ValueError(
            f"indices must be integers, got dtype {jnp.result_type(indices)}."
        )
    if _shape(new)[1] != _shape(bank)[1]:
        raise ValueError(
            f"new rows {_shape(new)} and bank {_shape(bank)} differ in D."
        )
    bank = jnp.asarray(bank)
    rows = momentum * bank[indices] + (1.0 - momentum) * jax.lax.stop_gradient(new)
    return bank.at[indices].set(_l2_normalize(rows).astype(bank.dtype))
