"""Distillation as one composable objective (see ``kdjax.distill.base`` for the contract).

    method = make_method(config.distill, student_taps=s.taps(), teacher_taps=t.taps())
    obj = objective(method, ce_weight(config.distill, method))
    loss, metrics, new_method_state, opt_extra = obj(student_out, teacher_out, batch, aux)

``METHODS`` maps ``distill.method`` names to their classes; adding a method is one class
in ``methods.py`` and one entry there.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax

from kdjax import losses
from kdjax.distill.base import Aux, Method, Outputs
from kdjax.distill.methods import METHODS, LogitMethod

# Fields set from the shared keys of the ``distill`` section (or by the pipeline), not
# from a method's own sub-section.
SHARED_FIELDS = ("weight", "student_taps", "teacher_taps", "temperature",
                 "standardize_logits", "steps_per_epoch")


def method_options(name: str) -> dict[str, Any]:
    """Method ``name``'s own hyperparameters and their defaults (its config sub-section
    ``distill.<name>``); {} when it has none."""
    return {f.name: f.default for f in dataclasses.fields(METHODS[name])
            if f.name not in SHARED_FIELDS}


def make_method(cfg, *, student_taps: Sequence[str], teacher_taps: Sequence[str]) -> Method:
    """The method of a ``distill`` config section, validated against the taps.

    ``distill.weight`` < 0 means the method's published default (``Method.default_weight``).
    Raises ValueError naming the bad key and the valid choices: unknown method, unknown
    tap, ``standardize_logits`` on a feature method.
    """
    if cfg.method not in METHODS:
        raise ValueError(f"unknown distill.method {cfg.method!r}; valid: "
                         f"{', '.join(sorted(METHODS))}")
    cls = METHODS[cfg.method]
    kwargs = dict(weight=None if cfg.weight < 0 else float(cfg.weight),
                  student_taps=tuple(cfg.student_taps), teacher_taps=tuple(cfg.teacher_taps))
    if issubclass(cls, LogitMethod):
        kwargs.update(temperature=float(cfg.temperature),
                      standardize_logits=bool(cfg.standardize_logits))
    elif cfg.standardize_logits:
        logit = sorted(n for n, c in METHODS.items() if issubclass(c, LogitMethod))
        raise ValueError(f"distill.standardize_logits applies to the logit methods "
                         f"({', '.join(logit)}), not to distill.method={cfg.method!r}")
    if cfg.method in cfg:
        kwargs.update(cfg[cfg.method].to_dict())
    method = cls(**kwargs)
    method.validate(tuple(student_taps), tuple(teacher_taps))
    return method


def ce_weight(cfg, method: Method) -> float:
    """γ of the CE term: ``distill.ce_weight``, or the method's default when < 0."""
    return method.default_ce_weight if cfg.ce_weight < 0 else float(cfg.ce_weight)


@dataclasses.dataclass(frozen=True)
class Objective:
    """``γ·CE(z_s, y) + method term (+ regulariser)`` for ``make_train_step``.

    Called as ``objective(student: Outputs, teacher: Outputs | None, batch, aux: Aux)`` →
    (loss, metrics, new method state, optimizer extra keyword arguments). ``method`` None:
    plain CE (no teacher needed). ``regularizer(student) -> (loss, metrics)``: an extra
    term on the student's outputs alone (e.g. PDD's MACs penalty).
    Metrics: "loss", "ce" and the method's "distill/<name>..." keys.
    """

    method: Method | None = None
    ce_weight: float = 1.0
    regularizer: Callable[[Outputs], tuple[jax.Array, dict]] | None = None

    def __call__(self, student: Outputs, teacher: Outputs | None, batch: dict, aux: Aux):
        ce = losses.cross_entropy(student.logits, batch["label"])
        loss, metrics = self.ce_weight * ce, {"ce": ce}
        state, extra = aux.distill_state, {}
        if self.method is not None:
            term, method_metrics, state, extra = self.method.term(
                aux.distill_params, aux.distill_state, student, teacher, batch, aux)
            loss = loss + term
            metrics.update(method_metrics)
        if self.regularizer is not None:
            penalty, penalty_metrics = self.regularizer(student)
            loss = loss + penalty
            metrics.update(penalty_metrics)
        metrics["loss"] = loss
        return loss, metrics, state, extra


@dataclasses.dataclass(frozen=True)
class InitStageObjective:
    """The initialisation stage's loss alone: ``method.init_stage_loss`` (no CE)."""

    method: Method

    def __call__(self, student: Outputs, teacher: Outputs, batch: dict, aux: Aux):
        loss, metrics, state = self.method.init_stage_loss(
            aux.distill_params, aux.distill_state, student, teacher, batch)
        return loss, {**metrics, "loss": loss}, state, {}


def objective(method: Method | None, ce_weight: float = 1.0) -> Objective:
    """The objective ``ce_weight·CE + method term`` (see `Objective`)."""
    return Objective(method, ce_weight)


SUPERVISED = Objective(None, 1.0)

__all__ = ["Aux", "InitStageObjective", "METHODS", "Method", "Objective", "Outputs",
           "SUPERVISED", "ce_weight", "make_method", "method_options", "objective"]
