"""Pipeline ``cross_layer``: cross-layer Gram KD with 1×1 adapters from an offline ensemble
of teachers (Chou, Chiu & Liao, 2021; S/D split in BUILD_NOTES.md).

Stages (each resumable, each under ``workdir/<stage>/``):
  teacher_<i>       every entry of ``config.teachers``, loaded or trained (common.obtain_teacher);
  stage1            student + adapters match the target teacher's cross-layer Gram matrices
                    (``kdjax.distill.cross_layer.CrossLayerGram``);
  stage2            from the stage-1 student, γ·CE + α·T²·KL to the teachers' ensemble
                    (``kdjax.distill.ensemble.TeacherEnsemble``), adapters dropped;
  with ``cross_layer.ablations``: student, kd_teacher, kd_ensemble, stage1_kd_teacher.
Writes ``workdir/summary.json`` and ``workdir/summary.md``: every teacher's test top-1,
the ensemble's own, and the student after each stage.
"""

from __future__ import annotations

import dataclasses
import logging

import jax

from kdjax import distill, models
from kdjax.distill.cross_layer import CrossLayerGram
from kdjax.distill.ensemble import TeacherEnsemble
from kdjax.pipelines import common
from kdjax.pipelines import kd as kd_pipeline
from kdjax.train import checkpoint as ckpt_lib
from kdjax.train import loop, sharding
from kdjax.train.state import make_eval_step

log = logging.getLogger("kdjax")

ABLATIONS = ("student", "kd_teacher", "kd_ensemble", "stage1_kd_teacher")


@dataclasses.dataclass(frozen=True)
class Teacher:
    """One ensemble member: its zoo model, variables and results (with ``test_top1_last``)."""

    model: object
    variables: dict
    results: dict


def gram_method(cfg) -> CrossLayerGram:
    """The stage-1 method from the ``cross_layer`` section."""
    return CrossLayerGram(weight=float(cfg.gram_weight),
                          gram_pairs=tuple(tuple(p) for p in cfg.gram_pairs),
                          student_taps=tuple(cfg.student_taps),
                          teacher_taps=tuple(cfg.teacher_taps))


def kd_method(cfg) -> distill.Method:
    """Vanilla KD with the section's T and α (against one teacher or the ensemble)."""
    return distill.METHODS["kd"](weight=float(cfg.kd_weight),
                                 temperature=float(cfg.temperature))


def teacher_model_name(entry, ctx) -> str:
    """The zoo name of a teacher entry: its checkpoint's, else ``name``."""
    if entry.checkpoint:
        return ckpt_lib.load_variables(entry.checkpoint)[0]["name"]
    return entry.name


def validate(config, ctx) -> None:
    """Fail before any training: no teachers, a bad target index, an unknown model or
    Gram tap (checked on the target teacher's and the student's taps)."""
    cfg = config.cross_layer
    if not config.teachers:
        raise ValueError("config.teachers is empty: give at least one teacher entry")
    if not 0 <= cfg.target_teacher < len(config.teachers):
        raise ValueError(f"cross_layer.target_teacher={cfg.target_teacher} is not an index "
                         f"of config.teachers (0..{len(config.teachers) - 1})")
    names = [teacher_model_name(entry, ctx) for entry in config.teachers]
    for i, name in enumerate(names):
        if name not in models.MODEL_NAMES:
            raise ValueError(f"teachers[{i}].name={name!r} is not a kdjax model; valid: "
                             f"{', '.join(models.MODEL_NAMES)}")
    target = models.get_model(names[cfg.target_teacher], ctx.num_classes)
    student = models.get_model(config.student.name, ctx.num_classes)
    gram_method(cfg).validate(student.taps(), target.taps())


def obtain_teachers(ctx) -> list[Teacher]:
    """Every teacher entry as stage ``teacher_<i>`` (trained with its own seed, or loaded),
    evaluated on the test split."""
    teachers = []
    for i, entry in enumerate(ctx.config.teachers):
        seeded = seeded_context(ctx, entry.seed)
        model, variables, results = common.obtain_teacher(seeded, entry, stage=f"teacher_{i}")
        if "test_top1_last" not in results:  # loaded, not trained here
            results = {**results, "test_top1_last": top1_on_test(ctx, model, variables)}
        teachers.append(Teacher(model, variables, results))
    return teachers


def seeded_context(ctx, seed: int):
    """``ctx`` whose config has ``seed`` (a teacher's initialisation and data order)."""
    config = ctx.config.copy_and_resolve_references()
    with config.unlocked():
        config.seed = int(seed)
    return dataclasses.replace(ctx, config=config)


def top1_on_test(ctx, model, variables) -> float:
    """Test top-1 (%) of ``model`` (a zoo model or a TeacherEnsemble) with ``variables``."""
    compiled = loop.compile_eval_step(make_eval_step(model), ctx.mesh)
    return loop.evaluate(compiled, sharding.replicate(variables, ctx.mesh), ctx.splits.test,
                         ctx.config.data, ctx.config.train.eval_batch_size, ctx.mesh)["top1"]


def ensemble_of(teachers: list[Teacher], temperature: float):
    """(TeacherEnsemble at ``temperature``, the members' variables)."""
    return (TeacherEnsemble(tuple(t.model for t in teachers), temperature),
            tuple(t.variables for t in teachers))


def run(config, workdir) -> dict:
    """Teachers → ensemble → stage 1 → stage 2 (→ ablations); writes the summaries."""
    ctx = common.setup(config, workdir)
    cfg = config.cross_layer
    validate(config, ctx)
    teachers = obtain_teachers(ctx)
    results = {f"teacher_{i}": t.results for i, t in enumerate(teachers)}
    results["ensemble"] = {"model": "+".join(t.results["model"] for t in teachers),
                           "test_top1_last": top1_on_test(ctx, *ensemble_of(teachers, 1.0))}
    student = config.student.name
    target = teachers[cfg.target_teacher]
    one_teacher = (target.model, target.variables)
    ensemble = ensemble_of(teachers, float(cfg.temperature))
    kd = distill.objective(kd_method(cfg), float(cfg.ce_weight))

    stage1_vars, results["stage1"] = common.run_stage(
        ctx, "stage1", student, cfg.stage1_optim,
        distill.objective(gram_method(cfg), float(cfg.stage1_ce_weight)), teacher=one_teacher)
    _, results["stage2"] = common.run_stage(ctx, "stage2", student, config.optim, kd,
                                            teacher=ensemble, initial_variables=stage1_vars)
    if cfg.ablations:
        _, results["student"] = common.run_stage(ctx, "student", student, config.optim,
                                                 distill.SUPERVISED)
        _, results["kd_teacher"] = common.run_stage(ctx, "kd_teacher", student, config.optim,
                                                    kd, teacher=one_teacher)
        _, results["kd_ensemble"] = common.run_stage(ctx, "kd_ensemble", student,
                                                     config.optim, kd, teacher=ensemble)
        _, results["stage1_kd_teacher"] = common.run_stage(
            ctx, "stage1_kd_teacher", student, config.optim, kd, teacher=one_teacher,
            initial_variables=stage1_vars)
    report(ctx, results)
    return results


def report(ctx, results: dict) -> None:
    """The kd pipeline's table and ``summary.json``, plus the table as ``summary.md``."""
    kd_pipeline.report(ctx, results)
    (ctx.workdir / "summary.md").write_text(kd_pipeline.summary_table(results) + "\n")
