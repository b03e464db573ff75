"""An offline ensemble of teachers seen as one teacher (no flax: only jax and the members'
own ``apply``).

The ensemble's target is the mean of the members' temperature-softened probabilities,
``p̄ = (1/N) Σ_n softmax(z_n / T)``. It is handed to a logit method (vanilla KD) as the
logits ``T·log p̄``, whose softened softmax at the same ``T`` is ``p̄`` itself, so
``kd_loss(z_s, T·log p̄, T) = T²·KL(p̄ ‖ softmax(z_s / T))``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


def ensemble_log_probs(teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """``log p̄`` with ``p̄[b, k] = (1/N) Σ_n softmax(z[n, b] / T)[k]``, computed as
    ``logsumexp_n log_softmax(z[n, b] / T) − log N`` (finite even where a member's
    probability underflows).

    Args:
      teacher_logits: ``[N, B, K]``, N ≥ 1 members.
      temperature: T > 0.

    Returns:
      ``[B, K]`` log-probabilities (each row's exp sums to 1).
    """
    if jnp.ndim(teacher_logits) != 3 or jnp.shape(teacher_logits)[0] < 1:
        raise ValueError(
            f"teacher_logits must be [N, B, K] with N >= 1; got shape {jnp.shape(teacher_logits)}")
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    members = jnp.shape(teacher_logits)[0]
    return jax.scipy.special.logsumexp(log_p, axis=0) - math.log(members)


def ensemble_logits(teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """``T·log p̄`` ``[B, K]``: logits whose softmax at temperature ``T`` is the ensemble
    target ``p̄`` of :func:`ensemble_log_probs` (at ``T = 1`` they are the ensemble's own
    log-probabilities, so argmax and cross-entropy are the ensemble's)."""
    return temperature * ensemble_log_probs(teacher_logits, temperature)


@dataclasses.dataclass(frozen=True)
class TeacherEnsemble:
    """N teachers (any architectures with the same classes) run as one network.

    ``apply(variables, x, train=False)`` takes a tuple with each member's
    ``{'params', 'batch_stats'}``, runs every member in eval mode on ``x`` and returns
    ``(ensemble_logits(stack(z_n), temperature) [B, K], {})`` — the call a train or eval
    step makes on a teacher or a model, so the whole ensemble forward is compiled into
    that step. It has no parameters of its own and is never trained or checkpointed.
    """

    members: tuple[Any, ...]
    temperature: float = 1.0

    def taps(self) -> tuple[str, ...]:
        """No feature taps: only logit methods can distill from an ensemble."""
        return ()

    def apply(self, variables: Sequence[dict], x: jax.Array, train: bool = False):
        if train:
            raise ValueError("a TeacherEnsemble only runs in eval mode (train=False)")
        if len(variables) != len(self.members):
            raise ValueError(f"{len(self.members)} members but {len(variables)} variable sets")
        logits = [member.apply(v, x, train=False)[0] for member, v in zip(self.members, variables)]
        return ensemble_logits(jnp.stack(logits), self.temperature), {}
