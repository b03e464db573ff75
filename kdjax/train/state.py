"""The training state pytree and the compiled train/eval steps shared by all pipelines."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from kdjax.train import precision


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree of arrays.

    step: int32 scalar, number of optimizer updates applied.
    params / batch_stats: the model's Flax variable collections.
    opt_state: optax state (may hold controllers, see kdjax.controllers).
    rng: PRNG key for stochastic parts of a step (split per step, never reused).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, variables, tx: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
        """Fresh state from initialised model variables and an optimizer."""
        params = variables["params"]
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            rng=rng,
        )

    @property
    def variables(self) -> dict:
        """The ``{'params', 'batch_stats'}`` dict that ``model.apply`` takes."""
        return {"params": self.params, "batch_stats": self.batch_stats}


# An objective maps the student's outputs to a scalar loss:
#   objective(logits [B,K], features, batch, teacher_logits [B,K] | None, opt_state)
#     -> (loss, metrics: dict[str, scalar], optimizer_extra_args: dict)
Objective = Callable[..., tuple[jax.Array, dict, dict]]


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

    The student runs in train mode (BN batch statistics updated); the teacher, if
    given, runs in eval mode inside the same compiled program and its logits are
    constants for the gradient. ``objective`` returns the loss, metrics to log and
    the extra keyword arguments for ``tx.update`` (e.g. a controller's measured
    gradient). metrics always include 'loss' and 'accuracy' (batch top-1).
    """

    dtype = precision.compute_dtype(compute_dtype)

    def step(state: TrainState, batch: dict, teacher_variables=None):
        images, labels = batch["image"], batch["label"]
        teacher_logits = None
        if teacher is not None:
            teacher_logits, _ = precision.apply(teacher, teacher_variables, images, dtype,
                                                train=False)
            teacher_logits = jax.lax.stop_gradient(teacher_logits)

        def loss_fn(params):
            (logits, features), updates = precision.apply(
                model,
                {"params": params, "batch_stats": state.batch_stats},
                images,
                dtype,
                train=True,
                mutable=["batch_stats"],
            )
            loss, metrics, opt_extra = objective(
                logits, features, batch, teacher_logits, state.opt_state
            )
            return loss, (logits, updates["batch_stats"], metrics, opt_extra)

        grads, (logits, batch_stats, metrics, opt_extra) = jax.grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params, **opt_extra)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            rng=jax.random.fold_in(state.rng, state.step),
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
