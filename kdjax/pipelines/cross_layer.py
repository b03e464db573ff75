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

import jax
import jax.numpy as jnp
import ml_collections

from kdjax import distill, models, reports
from kdjax.distill.cross_layer import CrossLayerGram
from kdjax.distill.ensemble import TeacherEnsemble
from kdjax.pipelines import common
from kdjax.pipelines import kd as kd_pipeline
from kdjax.train import checkpoint as ckpt_lib
from kdjax.train import files, loop, sharding
from kdjax.train.state import make_eval_step


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


def teacher_section(config, index: int) -> ml_collections.ConfigDict:
    """Entry ``config.teachers[index]`` as a teacher section for ``common.obtain_teacher``
    plus its ``seed``: ``"<zoo name>@<seed>"`` → trained with ``config.teacher_optim``;
    anything else → a checkpoint path. ValueError for a malformed seed."""
    entry = str(config.teachers[index])
    name, checkpoint, seed = "", entry, config.seed
    if "@" in entry:
        name, seed_text = entry.rsplit("@", 1)
        checkpoint = ""
        if not seed_text.lstrip("-").isdigit():
            raise ValueError(f"teachers[{index}]={entry!r}: the seed after '@' must be an "
                             f"integer (e.g. 'resnet32@1'), or give a checkpoint path")
        seed = int(seed_text)
    return ml_collections.ConfigDict(dict(name=name, checkpoint=checkpoint, seed=seed,
                                          optim=config.teacher_optim))


def teacher_model_name(section) -> str:
    """The zoo name of a teacher section: its checkpoint's, else ``name``."""
    if section.checkpoint:
        return ckpt_lib.load_variables(section.checkpoint)[0]["name"]
    return section.name


def validate(config, ctx, student_model) -> None:
    """Fail before any training: no teachers, a bad target index, an unknown teacher model,
    an unknown Gram tap (of the target teacher or the student)."""
    cfg = config.cross_layer
    if not config.teachers:
        raise ValueError("config.teachers is empty: give at least one teacher entry")
    if not 0 <= cfg.target_teacher < len(config.teachers):
        raise ValueError(f"cross_layer.target_teacher={cfg.target_teacher} is not an index "
                         f"of config.teachers (0..{len(config.teachers) - 1})")
    names = [teacher_model_name(teacher_section(config, i))
             for i in range(len(config.teachers))]
    for i, name in enumerate(names):
        if name not in models.MODEL_NAMES:
            raise ValueError(f"teachers[{i}]={config.teachers[i]!r}: {name!r} is not a kdjax "
                             f"model; valid: {', '.join(models.MODEL_NAMES)}")
    target = models.get_model(names[cfg.target_teacher], ctx.num_classes)
    gram_method(cfg).validate(student_model.taps(), target.taps())


def obtain_teachers(ctx) -> list[Teacher]:
    """Every teacher entry as stage ``teacher_<i>`` (trained with its own seed, or loaded),
    evaluated on the test split."""
    teachers = []
    for i in range(len(ctx.config.teachers)):
        section = teacher_section(ctx.config, i)
        model, variables, results = common.obtain_teacher(
            seeded_context(ctx, section.seed), section, stage=f"teacher_{i}")
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


def train_stage1(ctx, teacher) -> tuple[dict, dict]:
    """Stage ``stage1``: the student and its adapters trained on the Gram MSE against
    ``teacher`` = (model, variables) (plus ``stage1_ce_weight``·CE). Returns the student's
    final variables (no adapters) and the stage results."""
    cfg = ctx.config.cross_layer
    objective = distill.objective(gram_method(cfg), float(cfg.stage1_ce_weight))
    return common.run_stage(ctx, "stage1", ctx.config.student.name, cfg.stage1_optim,
                            objective, teacher=teacher)


def run(config, workdir) -> dict:
    """Teachers → ensemble → stage 1 → stage 2 (→ ablations); writes the summaries."""
    ctx = common.setup(config, workdir)
    cfg = config.cross_layer
    student = config.student.name
    student_model = models.get_model(student, ctx.num_classes)
    validate(config, ctx, student_model)
    teachers = obtain_teachers(ctx)
    results = {f"teacher_{i}": t.results for i, t in enumerate(teachers)}
    results["ensemble"] = {"model": "+".join(t.results["model"] for t in teachers),
                           "test_top1_last": top1_on_test(ctx, *ensemble_of(teachers, 1.0))}
    target = teachers[cfg.target_teacher]
    one_teacher = (target.model, target.variables)
    ensemble = ensemble_of(teachers, float(config.distill.temperature))
    kd = common.make_method(ctx, student_model, ensemble[0])

    stage1_vars, results["stage1"] = train_stage1(ctx, one_teacher)
    # a stage donates its initial variables to its first step: each start gets a copy
    from_stage1 = lambda: jax.tree.map(jnp.copy, stage1_vars)  # noqa: E731
    _, results["stage2"] = common.distill_stage(ctx, "stage2", student, config.optim, kd,
                                                ensemble, initial_variables=from_stage1())
    if cfg.ablations:
        _, results["student"] = common.run_stage(ctx, "student", student, config.optim,
                                                 distill.SUPERVISED)
        for name, teacher, start in (("kd_teacher", one_teacher, None),
                                     ("kd_ensemble", ensemble, None),
                                     ("stage1_kd_teacher", one_teacher, from_stage1)):
            _, results[name] = common.distill_stage(
                ctx, name, student, config.optim, kd, teacher,
                initial_variables=start() if start else None)
    report(ctx, results)
    return results


def report(ctx, results: dict) -> None:
    """The kd pipeline's table and ``summary.json``, plus the table as ``summary.md``."""
    kd_pipeline.report(ctx, results)
    files.write_text(ctx.workdir / "summary.md", reports.stage_table(results) + "\n")
