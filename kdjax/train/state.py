"""The training state pytree and the compiled train/eval steps shared by all pipelines."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from kdjax.distill.base import Aux, Outputs
from kdjax.train import precision


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree of arrays.

    step: int32 scalar, number of optimizer updates applied.
    params / batch_stats: the model's Flax variable collections.
    distill_params: trainable pytree of the distillation method (adapters, heads; {} if
      none), optimised with the student: the optimizer runs over
      ``{"model": params, "distill": distill_params}``.
    distill_state: the method's non-gradient pytree (e.g. CRD memory banks; {} if none).
    opt_state: optax state (may hold controllers, see kdjax.controllers).
    rng: PRNG key for stochastic parts of a step (split per step, never reused).
    Checkpoints hold all of it; ``best/`` and exported students hold only the model's
    params and batch_stats.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    distill_params: Any = flax.struct.field(default_factory=dict)
    distill_state: Any = flax.struct.field(default_factory=dict)

    @classmethod
    def create(cls, variables, tx: optax.GradientTransformation, rng: jax.Array,
               distill_params=None, distill_state=None) -> "TrainState":
        """Fresh state from initialised model variables, an optimizer and (optionally) a
        distillation method's initial params and state."""
        params = variables["params"]
        distill_params = {} if distill_params is None else distill_params
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(trainable(params, distill_params)),
            rng=rng,
            distill_params=distill_params,
            distill_state={} if distill_state is None else distill_state,
        )

    @property
    def variables(self) -> dict:
        """The ``{'params', 'batch_stats'}`` dict that ``model.apply`` takes."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def trainable(params, distill_params) -> dict:
    """The pytree the optimizer runs over: ``{"model": params, "distill": distill_params}``."""
    return {"model": params, "distill": distill_params}


# An objective (kdjax.distill.Objective) maps both networks' outputs to a scalar loss:
#   objective(student: Outputs, teacher: Outputs | None, batch, aux: Aux)
#     -> (loss, metrics: dict[str, scalar], new distill_state, optimizer_extra_args: dict)
Objective = Callable[..., tuple[jax.Array, dict, Any, dict]]


def per_example_hits(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Top-1 and top-5 hits per example as float32 [B] (top-k with k = min(5, K))."""
    k = min(5, logits.shape[-1])
    topk = jax.lax.top_k(logits, k)[1]
    hit5 = jnp.any(topk == labels[:, None], axis=-1)
    hit1 = topk[:, 0] == labels
    return hit1.astype(jnp.float32), hit5.astype(jnp.float32)


def make_train_step(model, tx: optax.GradientTransformation, objective: Objective, teacher=None,
                    compute_dtype: str = "float32"):
    """Build ``step(state, batch, teacher_variables) -> (state, metrics)``.

    Student and teacher forward passes run in ``compute_dtype`` (kdjax.train.precision:
    float32 parameters, statistics and outputs, so the objective sees float32).

    The student runs in train mode (BN batch statistics updated); the teacher, if given,
    runs in eval mode inside the same compiled program, and its ``Outputs(logits,
    features)`` are constants for the gradient (``stop_gradient``). ``objective`` gets
    both ``Outputs``, the batch and ``Aux(distill_params, distill_state, opt_state,
    step)``; it returns the loss, metrics to log, the method's new state and the extra
    keyword arguments for ``tx.update`` (e.g. a controller's measured gradient). The
    gradient is taken w.r.t. the student's params and the method's params together.
    metrics always include 'loss' and 'accuracy' (batch top-1).
    """

    dtype = precision.compute_dtype(compute_dtype)

    def step(state: TrainState, batch: dict, teacher_variables=None):
        images, labels = batch["image"], batch["label"]
        teacher_out = None
        if teacher is not None:
            teacher_out = jax.lax.stop_gradient(Outputs(*precision.apply(
                teacher, teacher_variables, images, dtype, train=False)))

        def loss_fn(variables):
            (logits, features), updates = precision.apply(
                model,
                {"params": variables["model"], "batch_stats": state.batch_stats},
                images,
                dtype,
                train=True,
                mutable=["batch_stats"],
            )
            aux = Aux(variables["distill"], state.distill_state, state.opt_state, state.step)
            loss, metrics, distill_state, opt_extra = objective(
                Outputs(logits, features), teacher_out, batch, aux)
            return loss, (logits, updates["batch_stats"], metrics, distill_state, opt_extra)

        current = trainable(state.params, state.distill_params)
        grads, (logits, batch_stats, metrics, distill_state, opt_extra) = jax.grad(
            loss_fn, has_aux=True)(current)
        updates, opt_state = tx.update(grads, state.opt_state, current, **opt_extra)
        new = optax.apply_updates(current, updates)
        new_state = state.replace(
            step=state.step + 1,
            params=new["model"],
            batch_stats=batch_stats,
            opt_state=opt_state,
            rng=jax.random.fold_in(state.rng, state.step),
            distill_params=new["distill"],
            distill_state=distill_state,
        )
        metrics = dict(metrics)
        metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == labels)
        return new_state, metrics

    return step


def make_eval_step(model, compute_dtype: str = "float32"):
    """Build ``eval_step(variables, batch) -> per-example results`` (forward pass in
    ``compute_dtype``, metrics in float32).

    batch: {'image' [B,H,W,C], 'label' [B], 'mask' [B]}; padded examples have mask 0.
    Returns {'loss', 'top1', 'top5', 'count'}, each float32 [B] already multiplied by the
    mask, so summing over all batches and dividing by Σ count gives the split's metrics.
    Results stay sharded like the batch: the step needs no cross-device collective.
    """

    dtype = precision.compute_dtype(compute_dtype)

    def eval_step(variables, batch):
        logits, _ = precision.apply(model, variables, batch["image"], dtype, train=False)
        weights = batch["mask"]
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        hit1, hit5 = per_example_hits(logits, batch["label"])
        return {"loss": weights * per_example, "top1": weights * hit1,
                "top5": weights * hit5, "count": weights}

    return eval_step
