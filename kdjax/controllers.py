"""The DynamicKD entropy controller, kept in optimizer state.

DynamicKD (see ``docs/dynamic_kd.md``) scales the student's logits inside the
distillation term by a positive controller ``c``::

    L_KD(c) = T^2 * KL(p_t || q_c),   p_t = softmax(z_t / T),
                                      q_c = softmax(c * z_s / T).

The controller is stored as ``theta = log c`` in an optax transformation's
state (:class:`EntropyControllerState`). The transformation is chained with
the model optimizer, passes the model updates through untouched and only
updates its own state, so ``c`` is checkpointed and restored with the rest of
the optimizer state. The loss reads ``c`` with :func:`controller_value`.

Closed forms (derived for one sample; the batch loss is the weighted mean of
the per-sample losses, so its derivatives are the same weighted means).
With ``d log q_k / dc = (z_s,k - E_q[z_s]) / T``::

    dL_KD/dc   = -T^2 * sum_k p_t,k (z_s,k - E_q[z_s]) / T
               = T * (E_{q_c}[z_s] - E_{p_t}[z_s])
    d2L_KD/dc2 = T * d E_{q_c}[z_s] / dc = T * Var_{q_c}(z_s) / T
               = Var_{q_c}(z_s) >= 0          (L_KD is convex in c)

For a per-class controller ``c`` in ``R^K`` (``q = softmax(c * z_s / T)``
elementwise), ``dL_KD/dc_k = T * z_s,k * (q_k - p_t,k)``; summing over ``k``
gives the scalar formula. :func:`kd_controller_grad` evaluates these.

Update rules of :func:`entropy_controller`:

* ``mode="gradient"`` (default): with ``controller_grad = dL_KD/dc`` passed as
  an extra argument, ``dL/dtheta = c * dL/dc`` and
  ``theta <- clip(theta - lr * c * dL/dc, log lo, log hi)``. No weight decay.
  Its fixed point is the moment-matching value ``E_{q_c}[z_s] = E_{p_t}[z_s]``
  (batch mean).
* ``mode="entropy_feedback"`` (ablation): with ``student_entropy = H(q_c)``
  and ``teacher_entropy = H(p_t)`` (batch means) as extra arguments,
  ``c <- clip(c * exp(eta * (H(q_c) - H(p_t))))``: a student that is more
  uncertain than the teacher gets a larger ``c`` (sharper ``q_c``, lower
  entropy), and vice versa.

During the first ``warmup_steps`` updates ``c`` stays at its initial value
(``count`` still increments). A non-finite proposed value leaves ``c``
unchanged.

Example (a user's train step in a plain JAX project; this exact code is run by
``tests/test_controllers.py``)::

    import jax, jax.numpy as jnp, optax
    from kdjax.losses import cross_entropy, dynamic_kd_loss
    from kdjax.controllers import (controller_value, entropy_controller,
                                   kd_controller_grad)

    def model(params, x):                      # any function of (params, x)
        return x @ params["w"] + params["b"]

    T, gamma, alpha = 4.0, 0.1, 0.9
    opt = optax.chain(optax.sgd(0.05, momentum=0.9),
                      entropy_controller(learning_rate=0.05))

    @jax.jit
    def train_step(params, opt_state, x, y, teacher_logits):
        c = controller_value(opt_state)        # read c from the optimizer state
        def loss_fn(params):
            z = model(params, x)
            kd = dynamic_kd_loss(z, teacher_logits, c, T)
            return gamma * cross_entropy(z, y) + alpha * kd, (z, kd)
        (_, (z, kd)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        g_c = kd_controller_grad(z, teacher_logits, c, T)   # dL_KD/dc
        updates, opt_state = opt.update(grads, opt_state, params,
                                        controller_grad=g_c)
        return optax.apply_updates(params, updates), opt_state, kd

    kx, kt, kw = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (64, 8))
    teacher_logits = 3.0 * x @ jax.random.normal(kt, (8, 10))
    y = jnp.argmax(teacher_logits, axis=-1)
    params = {"w": 0.1 * jax.random.normal(kw, (8, 10)), "b": jnp.zeros(10)}
    opt_state = opt.init(params)
    for step in range(20):
        params, opt_state, kd = train_step(params, opt_state, x, y,
                                           teacher_logits)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from kdjax import losses as _losses

__all__ = [
    "EntropyControllerState",
    "entropy_controller",
    "controller_state",
    "controller_value",
    "kd_controller_grad",
    "controller_entropies",
]

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]


class EntropyControllerState(NamedTuple):
    """State of :func:`entropy_controller` (a plain pytree of arrays).

    Attributes:
      log_c: ``theta = log c``; float32 ``[]`` (scalar) or ``[K]`` (per class).
      count: int32 ``[]``, number of updates seen so far.
    """

    log_c: jax.Array
    count: jax.Array


def _is_concrete_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def entropy_controller(
    learning_rate: ScalarOrSchedule = 1e-2,
    init: float = 1.0,
    clip: Tuple[float, float] = (0.1, 10.0),
    kind: str = "scalar",
    num_classes: Optional[int] = None,
    mode: str = "gradient",
    feedback_rate: float = 1e-2,
    warmup_steps: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """The DynamicKD entropy controller as an optax transformation.

    Chain it after the model optimizer, e.g.
    ``optax.chain(optax.sgd(0.05), entropy_controller(...))``. Its update
    returns ``updates`` unchanged and only advances its own
    :class:`EntropyControllerState`. Read ``c`` with :func:`controller_value`.

    Extra keyword arguments of ``update(updates, state, params, **extra)``:

    * ``mode="gradient"``: ``controller_grad`` = ``dL_KD/dc`` (shape ``[]`` for
      ``kind="scalar"``, ``[K]`` for ``kind="per_class"``), e.g. from
      :func:`kd_controller_grad` or ``jax.grad`` of
      :func:`kdjax.losses.dynamic_kd_loss` w.r.t. the controller. Update:
      ``theta <- clip(theta - lr * c * controller_grad)``.
    * ``mode="entropy_feedback"``: ``student_entropy = H(q_c)`` and
      ``teacher_entropy = H(p_t)`` (scalars, batch means; see
      :func:`controller_entropies`). Update:
      ``theta <- clip(theta + feedback_rate * (H(q_c) - H(p_t)))``. For
      ``kind="per_class"`` pass ``[K]`` per-class entropies to move each class
      on its own; scalar entropies move every class by the same factor (the
      DynamicKD pipeline therefore rejects per_class with this mode).

    Other extra arguments are ignored. Clipping is ``c in [clip[0], clip[1]]``
    (done on ``theta`` in log space). While ``count < warmup_steps`` the update
    leaves ``c`` unchanged; ``count`` always increments.

    Args:
      learning_rate: step size on ``theta`` (gradient mode); a float or a
        schedule ``count -> lr``.
      init: initial ``c > 0`` (default 1, i.e. vanilla KD).
      clip: ``(lo, hi)`` with ``0 < lo <= hi``.
      kind: ``"scalar"`` or ``"per_class"`` (then ``num_classes`` is required).
      num_classes: ``K`` for ``kind="per_class"``.
      mode: ``"gradient"`` or ``"entropy_feedback"``.
      feedback_rate: ``eta`` of the entropy-feedback mode.
      warmup_steps: number of initial updates during which ``c`` is frozen.

    Returns:
      an ``optax.GradientTransformationExtraArgs``. When wrapping with
      ``optax.inject_hyperparams``, numeric arguments become arrays;
      ``num_classes`` is only used at ``init`` (outside ``jit``) so this works,
      or list it in ``static_args``.
    """
    if kind not in ("scalar", "per_class"):
        raise ValueError(f"kind must be 'scalar' or 'per_class', got {kind!r}.")
    if mode not in ("gradient", "entropy_feedback"):
        raise ValueError(
            f"mode must be 'gradient' or 'entropy_feedback', got {mode!r}."
        )
    if kind == "per_class" and num_classes is None:
        raise ValueError("kind='per_class' needs num_classes.")
    lo, hi = clip
    if _is_concrete_number(lo) and _is_concrete_number(hi):
        if not 0 < lo <= hi:
            raise ValueError(f"clip must satisfy 0 < lo <= hi, got {clip}.")
    if _is_concrete_number(init) and _is_concrete_number(lo) and (
            _is_concrete_number(hi)) and not lo <= init <= hi:
        raise ValueError(f"init={init} lies outside clip={clip}.")

    def init_fn(params):
        del params
        shape = () if kind == "scalar" else (int(num_classes),)
        log_c = jnp.full(shape, jnp.log(jnp.asarray(init, jnp.float32)),
                         jnp.float32)
        return EntropyControllerState(log_c=log_c,
                                      count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, controller_grad=None,
                  student_entropy=None, teacher_entropy=None, **extra_args):
        del params, extra_args
        log_c = state.log_c
        if mode == "gradient":
            if controller_grad is None:
                raise ValueError(
                    "entropy_controller(mode='gradient').update needs the extra "
                    "argument controller_grad=dL_KD/dc."
                )
            g = jnp.asarray(controller_grad)
            if jnp.shape(g) != jnp.shape(log_c):
                raise ValueError(
                    f"controller_grad must have shape {jnp.shape(log_c)} "
                    f"(kind={kind!r}), got {jnp.shape(g)}."
                )
            lr = (learning_rate(state.count) if callable(learning_rate)
                  else learning_rate)
            proposed = log_c - lr * jnp.exp(log_c) * g.astype(log_c.dtype)
        else:
            if student_entropy is None or teacher_entropy is None:
                raise ValueError(
                    "entropy_controller(mode='entropy_feedback').update needs "
                    "the extra arguments student_entropy and teacher_entropy."
                )
            hs = jnp.asarray(student_entropy)
            ht = jnp.asarray(teacher_entropy)
            for name, h in (("student_entropy", hs), ("teacher_entropy", ht)):
                if jnp.ndim(h) != 0 and jnp.shape(h) != jnp.shape(log_c):
                    raise ValueError(
                        f"{name} must be a scalar (or {jnp.shape(log_c)}), got "
                        f"shape {jnp.shape(h)}."
                    )
            proposed = log_c + feedback_rate * (hs - ht).astype(log_c.dtype)
        proposed = jnp.clip(proposed, jnp.log(jnp.asarray(lo, log_c.dtype)),
                            jnp.log(jnp.asarray(hi, log_c.dtype)))
        active = (state.count >= warmup_steps) & jnp.all(jnp.isfinite(proposed))
        new_log_c = jnp.where(active, proposed, log_c).astype(log_c.dtype)
        new_count = optax.safe_increment(state.count)
        return updates, EntropyControllerState(log_c=new_log_c, count=new_count)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find_states(opt_state: Any) -> list[EntropyControllerState]:
    is_ctrl = lambda x: isinstance(x, EntropyControllerState)  # noqa: E731
    leaves = jax.tree.leaves(opt_state, is_leaf=is_ctrl)
    return [leaf for leaf in leaves if is_ctrl(leaf)]


def controller_state(opt_state: Any, index: Optional[int] = None
                     ) -> EntropyControllerState:
    """Finds the :class:`EntropyControllerState` inside any optax state.

    Searches the whole pytree (``optax.chain`` tuples, ``inject_hyperparams``
    states, masked/multi-transform states, dicts...). Raises ValueError when
    none is found, or when several are found and ``index`` (their position in
    pytree flattening order) is not given.
    """
    found = _find_states(opt_state)
    if not found:
        raise ValueError(
            "no EntropyControllerState found in the optimizer state; chain "
            "kdjax.controllers.entropy_controller(...) into the optimizer."
        )
    if index is None:
        if len(found) > 1:
            raise ValueError(
                f"{len(found)} EntropyControllerStates found in the optimizer "
                "state; pass index= to choose one."
            )
        return found[0]
    return found[index]


def controller_value(opt_state: Any, index: Optional[int] = None) -> jax.Array:
    """Current controller ``c = exp(log_c)`` read from an optimizer state.

    Returns a float32 ``[]`` (scalar controller) or ``[K]`` (per class). See
    :func:`controller_state` for how the state is found.
    """
    return jnp.exp(controller_state(opt_state, index).log_c)


def kd_controller_grad(student_logits: jax.Array, teacher_logits: jax.Array,
                       controller: ArrayLike, temperature: ArrayLike,
                       weights: Optional[ArrayLike] = None,
                       controller_kind: Optional[str] = None) -> jax.Array:
    """Closed-form ``d dynamic_kd_loss / d controller`` (no second ``jax.grad``).

    With ``q = softmax(c * z_s / T)``, ``p = softmax(z_t / T)`` and normalised
    batch weights ``w_i`` (``1/B``, or ``weights_i / max(sum weights, eps)``),
    the derivative w.r.t. a controller entry broadcast to element ``(i, k)`` is
    ``w_i * T * z_s,ik * (q_ik - p_ik)``; it is summed over the axes the
    controller is broadcast along:

    * scalar ``c``: ``sum_i w_i * T * (E_{q_i}[z_s,i] - E_{p_i}[z_s,i])`` → ``[]``;
    * per class ``[K]``: ``sum_i w_i * T * z_s,ik (q_ik - p_ik)`` → ``[K]``;
    * per sample ``[B]``/``[B, 1]``: ``w_i * T * (E_q - E_p)_i`` → same shape.

    The result has the controller's shape. The student logits are treated as
    given (call it on ``stop_gradient``-ed values if used inside a loss).

    Args:
      student_logits, teacher_logits: ``[B, K]``.
      controller: as in :func:`kdjax.losses.dynamic_kd_loss`.
      temperature: scalar ``T > 0``.
      weights: optional ``[B]``.
      controller_kind: optional, as in :func:`kdjax.losses.dynamic_kd_loss`.
    """
    _losses._check_logits_pair(student_logits, teacher_logits)
    _losses._check_scalar("temperature", temperature)
    b, k = jnp.shape(student_logits)
    c_in = jnp.asarray(controller)
    c, kind = _losses._broadcast_controller(c_in, b, k, controller_kind)
    t = temperature
    q = jax.nn.softmax(c * student_logits / t, axis=-1)
    p = jax.nn.softmax(teacher_logits / t, axis=-1)
    if weights is None:
        w = jnp.full((b,), 1.0 / b, student_logits.dtype)
    else:
        weights = jnp.asarray(weights)
        if jnp.shape(weights) != (b,):
            raise ValueError(
                f"weights must have shape [B] = {(b,)}, got {jnp.shape(weights)}."
            )
        weights = weights.astype(student_logits.dtype)
        w = weights / jnp.maximum(jnp.sum(weights), _losses._EPS)
    elem = (w[:, None] * t) * student_logits * (q - p)  # [B, K]
    if kind == "scalar":
        g = jnp.sum(elem)
    elif kind == "per_class":
        g = jnp.sum(elem, axis=0)
    else:
        g = jnp.sum(elem, axis=1)
    return g.reshape(jnp.shape(c_in)).astype(jnp.result_type(c_in, elem))


def controller_entropies(student_logits: jax.Array, teacher_logits: jax.Array,
                         controller: ArrayLike, temperature: ArrayLike,
                         weights: Optional[ArrayLike] = None,
                         controller_kind: Optional[str] = None
                         ) -> Tuple[jax.Array, jax.Array]:
    """``(H(q_c), H(p_t))``: batch (weighted) means of the per-example entropies.

    ``q_c = softmax(c * z_s / T)``, ``p_t = softmax(z_t / T)``, entropies in
    nats. These are the extra arguments of the entropy-feedback mode and the
    quantities DynamicKD logs every step. Returns two scalars.
    """
    _losses._check_logits_pair(student_logits, teacher_logits)
    b, k = jnp.shape(student_logits)
    c, _ = _losses._broadcast_controller(controller, b, k, controller_kind)
    hs = _losses.entropy(c * student_logits, temperature)
    ht = _losses.entropy(teacher_logits, temperature)
    return (_losses.weighted_mean(hs, weights),
            _losses.weighted_mean(ht, weights))
