"""Cross-layer Gram matching with 1×1 student adapters (stage 1 of Chou, Chiu & Liao, 2021).

For each configured pair of teacher taps ``(a, b)`` (adjacent or not), the teacher's
target is the cross-layer Gram matrix ``G^t = gram(pool(T_a), pool(T_b))`` ``[B, Ca, Cb]``
(the larger map average-pooled to the smaller, ``kdjax.losses``). The student's maps at
the matching taps first pass through a trainable bias-free 1×1 convolution to the
teacher's channel count (one adapter per student tap, shared by every pair using it), then
``G^s`` is built the same way, and the loss is

    β · mean_pairs mean_i mean_jk (G^s_i[j, k] − G^t_i[j, k])²

(``kdjax.losses.cross_layer_gram_loss`` per pair). The adapters live in the method's params
and are dropped when the student is exported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp

from kdjax import losses
from kdjax.distill.base import LossResult, Method, Outputs
from kdjax.models import common

# Adjacent and non-adjacent pairs of the CIFAR ResNets' taps.
DEFAULT_PAIRS = (("stage1", "stage2"), ("stage2", "stage3"), ("stage1", "stage3"))


def _adapter(features: int):
    """The bias-free 1×1 convolution that maps a student tap to ``features`` channels."""
    return common.conv1x1(features)


@dataclasses.dataclass(frozen=True)
class CrossLayerGram(Method):
    """Match the teacher's cross-layer Gram matrices through 1×1 adapters (see module doc).

    gram_pairs: pairs of teacher tap names ``(a, b)``; each tap must be a 4-D map.
    teacher_taps / student_taps: optional aligned lists renaming teacher taps to student
      taps (for students whose taps are named differently); by default the student tap
      has the teacher tap's name and the taps are those used by ``gram_pairs``.
    """

    name: ClassVar[str] = "cross_layer"
    default_weight: ClassVar[float] = 1.0

    gram_pairs: tuple[tuple[str, str], ...] = DEFAULT_PAIRS

    @property
    def t_taps(self) -> tuple[str, ...]:
        used = tuple(dict.fromkeys(tap for pair in self.gram_pairs for tap in pair))
        return tuple(self.teacher_taps) or used

    @property
    def s_taps(self) -> tuple[str, ...]:
        return tuple(self.student_taps) or self.t_taps

    def student_tap(self, teacher_tap: str) -> str:
        """The student tap matched to ``teacher_tap``."""
        return self.s_taps[self.t_taps.index(teacher_tap)]

    def validate(self, student_taps: Sequence[str], teacher_taps: Sequence[str]) -> None:
        """ValueError for an empty or malformed ``gram_pairs``, a pair tap missing from
        ``teacher_taps``, or an unknown tap of either network."""
        if not self.gram_pairs:
            raise ValueError("cross_layer.gram_pairs is empty: give at least one (tap_a, tap_b)")
        for pair in self.gram_pairs:
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(f"cross_layer.gram_pairs: {tuple(pair)!r} is not a pair of "
                                 f"two different taps")
            for tap in pair:
                valid = self.t_taps if self.teacher_taps else teacher_taps
                if tap not in valid:
                    raise ValueError(f"cross_layer.gram_pairs: unknown tap {tap!r}; valid "
                                     f"taps of the teacher: {list(valid)}")
        super().validate(student_taps, teacher_taps)

    def init(self, rng: jax.Array, student: Outputs, teacher: Outputs,
             num_examples: int):
        """One adapter per student tap: kernel ``[1, 1, C_student, C_teacher]``; no state."""
        del num_examples
        params = {}
        for i, t_tap in enumerate(self.t_taps):
            s_tap = self.student_tap(t_tap)
            s_shape, t_shape = student.features[s_tap].shape, teacher.features[t_tap].shape
            if len(s_shape) != 4 or len(t_shape) != 4:
                raise ValueError(
                    f"cross_layer: Gram pairs need 4-D feature maps; student tap {s_tap!r} "
                    f"is {tuple(s_shape)}, teacher tap {t_tap!r} is {tuple(t_shape)}")
            dummy = jnp.zeros((1, 1, 1, s_shape[-1]), jnp.float32)
            params[s_tap] = _adapter(t_shape[-1]).init(jax.random.fold_in(rng, i), dummy)["params"]
        return params, {}

    def adapt(self, params, s_tap: str, feature: jax.Array) -> jax.Array:
        """Student map ``[B, H, W, Cs]`` → ``[B, H, W, Ct]`` through the tap's adapter."""
        kernel = params[s_tap]["kernel"]
        return _adapter(kernel.shape[-1]).apply({"params": params[s_tap]}, feature)

    def loss(self, params, state, student: Outputs, teacher: Outputs, batch: dict, *,
             train: bool = True) -> LossResult:
        """β · mean over pairs of the Gram MSE; metrics: the total and each pair's MSE."""
        del batch, train
        adapted = {s: self.adapt(params, s, student.features[s]) for s in set(self.s_taps)}
        metrics, terms = {}, []
        for a, b in self.gram_pairs:
            term = losses.cross_layer_gram_loss(
                adapted[self.student_tap(a)], adapted[self.student_tap(b)],
                teacher.features[a], teacher.features[b])
            metrics[self.metric(f"{a}-{b}")] = term
            terms.append(term)
        loss = self.weight * sum(terms) / len(terms)
        metrics[self.metric()] = loss
        return loss, metrics, state
