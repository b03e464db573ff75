"""The distillation contract: what a train step hands a method, and what a method is.

A method is a frozen dataclass subclassing `Method` (hyperparameters as fields, defaults =
RepDistiller's published values) registered by name in `kdjax.distill.METHODS`. It owns
its trainable adapters (``params``, optimised with the student) and its non-gradient
state (``state``, e.g. CRD memory banks); both live in the train state, are checkpointed,
and are dropped when the student is exported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import jax


class Outputs(NamedTuple):
    """One network's forward pass as seen by a method.

    logits: [B, K].
    features: taps by name in forward order, e.g. "stage1" [B, H, W, C],
      "embedding" [B, C] (see ``kdjax.models``).
    """

    logits: jax.Array
    features: dict[str, jax.Array]


class Aux(NamedTuple):
    """Train-state pieces an objective may read besides the two networks' outputs.

    distill_params: the method's trainable pytree (differentiated with the student).
    distill_state: the method's non-gradient pytree.
    opt_state: the optax state (DynamicKD reads its controller from it).
    step: int32 scalar, optimizer updates applied so far.
    """

    distill_params: Any
    distill_state: Any
    opt_state: Any
    step: jax.Array


# (loss scalar, metrics {"distill/<name>/...": scalar}, new method state)
LossResult = tuple[jax.Array, dict[str, jax.Array], Any]


@dataclasses.dataclass(frozen=True)
class Method:
    """Base class of every distillation method.

    Subclasses set ``name``, ``default_weight`` and ``default_taps`` (the tap names the
    method reads, the same names on student and teacher; () for logit methods) and
    override `loss` (and `init` when they own params/state, `init_stage_loss` when
    ``init_stage``). ``weight`` (β) multiplies the method's term; ``student_taps`` /
    ``teacher_taps`` select the features it reads, () meaning ``default_taps``.
    """

    name: ClassVar[str] = ""
    init_stage: ClassVar[bool] = False     # FitNet/AB/FT/FSP: an init stage runs first
    init_stage_trains_student: ClassVar[bool] = True   # FT: only its paraphraser learns
    default_weight: ClassVar[float] = 1.0
    default_ce_weight: ClassVar[float] = 1.0   # γ of CE beside the method (KD: 0.1)
    default_taps: ClassVar[tuple[str, ...]] = ()

    weight: float | None = None            # None: ``default_weight``
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()

    def __post_init__(self):
        if self.weight is None:
            object.__setattr__(self, "weight", self.default_weight)
        object.__setattr__(self, "student_taps", tuple(self.student_taps))
        object.__setattr__(self, "teacher_taps", tuple(self.teacher_taps))

    # --- taps -------------------------------------------------------------------------
    @property
    def s_taps(self) -> tuple[str, ...]:
        """The student taps this method reads."""
        return tuple(self.student_taps) or self.default_taps

    @property
    def t_taps(self) -> tuple[str, ...]:
        """The teacher taps this method reads."""
        return tuple(self.teacher_taps) or self.default_taps

    def validate(self, student_taps: Sequence[str], teacher_taps: Sequence[str]) -> None:
        """Raise ValueError naming an unknown tap and listing the valid ones, or when the
        student and teacher tap lists differ in length."""
        for side, wanted, valid in (("student", self.s_taps, student_taps),
                                    ("teacher", self.t_taps, teacher_taps)):
            for tap in wanted:
                if tap not in valid:
                    raise ValueError(
                        f"distill.{side}_taps: unknown tap {tap!r} for method {self.name!r}; "
                        f"valid taps of the {side}: {list(valid)}")
        if len(self.s_taps) != len(self.t_taps):
            raise ValueError(
                f"distill.student_taps {list(self.s_taps)} and distill.teacher_taps "
                f"{list(self.t_taps)} must pair up (same length) for method {self.name!r}")

    def pairs(self, student: Outputs, teacher: Outputs) -> list[tuple[jax.Array, jax.Array]]:
        """(student feature, teacher feature) for each configured tap pair."""
        return [(student.features[s], teacher.features[t])
                for s, t in zip(self.s_taps, self.t_taps)]

    # --- the contract ------------------------------------------------------------------
    def init(self, rng: jax.Array, student: Outputs, teacher: Outputs,
             num_examples: int) -> tuple[Any, Any]:
        """(params, state) of the method; ``student``/``teacher`` hold
        ``jax.ShapeDtypeStruct`` leaves (from ``jax.eval_shape``). Default: ({}, {})."""
        del rng, student, teacher, num_examples
        return {}, {}

    def loss(self, params, state, student: Outputs, teacher: Outputs, batch: dict, *,
             train: bool = True) -> LossResult:
        """The method's distillation term only (no CE), already multiplied by ``weight``.

        batch: {"image", "label" [B], "index" [B] int32 dataset indices}.
        Returns (loss, metrics keyed "distill/<name>...", new state).
        """
        raise NotImplementedError

    def init_stage_loss(self, params, state, student: Outputs, teacher: Outputs,
                        batch: dict) -> LossResult:
        """The loss of the initialisation stage (only when ``init_stage``)."""
        raise NotImplementedError(f"method {self.name!r} has no initialisation stage")

    # --- hooks with defaults -----------------------------------------------------------
    def term(self, params, state, student: Outputs, teacher: Outputs, batch: dict,
             aux: Aux) -> tuple[jax.Array, dict, Any, dict]:
        """What the objective adds to γ·CE: (loss, metrics, new state, optimizer extra
        keyword arguments). Default: `loss` and no extra arguments; methods that read the
        optimizer state or the step (DynamicKD, DKD's warm-up) override this."""
        del aux
        loss, metrics, state = self.loss(params, state, student, teacher, batch)
        return loss, metrics, state, {}

    def transform(self, num_classes: int, steps_per_epoch: int):
        """An optax transformation to chain after the optimizer (DynamicKD's controller),
        or None."""
        del num_classes, steps_per_epoch
        return None

    def for_stage(self, steps_per_epoch: int) -> "Method":
        """The method bound to a stage's epoch length (DKD's warm-up counts epochs).
        Default: itself."""
        del steps_per_epoch
        return self

    def init_stage_variables(self, params, state) -> tuple[Any, Any]:
        """(params, state) the initialisation stage starts from. Default: all of them."""
        return params, state

    def after_init_stage(self, params, state, trained_params, trained_state
                         ) -> tuple[Any, Any]:
        """(params, state) of the main stage given the init stage's result. Default: the
        trained ones."""
        del params, state
        return trained_params, trained_state

    def metric(self, suffix: str = "") -> str:
        """Namespaced metric key: "distill/<name>" or "distill/<name>/<suffix>"."""
        return f"distill/{self.name}" + (f"/{suffix}" if suffix else "")
