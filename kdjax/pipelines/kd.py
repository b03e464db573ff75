"""Pipeline ``kd``: vanilla Hinton KD, reported beside the teacher and a student from scratch.

Stages (each resumable, each under ``workdir/<stage>/``):
  teacher  — loaded from ``config.teacher.checkpoint`` or trained first;
  student  — the student trained from scratch with CE (skipped if ``kd.baseline=False``);
  kd       — the student trained with γ·CE + α·T²·KL(p_t ‖ p_s) from the teacher.
"""

from __future__ import annotations

import logging

from kdjax import models
from kdjax.pipelines import common
from kdjax.train import files

log = logging.getLogger("kdjax")


def summary_table(results: dict) -> str:
    """Markdown table of test top-1 (last and best epoch) for each trained stage."""
    rows = ["| stage | model | test top-1 last | test top-1 best epoch |", "|---|---|---|---|"]
    for stage, r in results.items():
        last = r.get("test_top1_last")
        best = r.get("test_top1_best_epoch")
        fmt = lambda v: "—" if v is None else f"{v:.2f}"
        rows.append(f"| {stage} | {r.get('model', '')} | {fmt(last)} | {fmt(best)} |")
    return "\n".join(rows)


def baseline_stages(ctx, student_name: str, optim_cfg, teacher, *, temperature: float,
                    ce_weight: float, kd_weight: float, from_scratch: bool) -> dict:
    """The comparison every KD method is judged against, with one teacher and budget:
    the student from scratch (stage ``student``, if ``from_scratch``) and vanilla KD
    (stage ``kd``). Returns {stage: results}."""
    results = {}
    if from_scratch:
        _, results["student"] = common.run_stage(
            ctx, "student", student_name, optim_cfg, common.supervised_objective)
    objective = common.kd_objective(temperature, ce_weight, kd_weight)
    _, results["kd"] = common.run_stage(ctx, "kd", student_name, optim_cfg, objective,
                                        teacher=teacher)
    return results


def report(ctx, results: dict) -> None:
    """Log and print the results table; write ``workdir/summary.json``."""
    table = summary_table(results)
    log.info("results:\n%s", table)
    print(table, flush=True)
    files.save_json(ctx.workdir / "summary.json", results)


def run(config, workdir) -> dict:
    """Teacher → (student from scratch) → KD student; writes ``workdir/summary.json``."""
    ctx = common.setup(config, workdir)
    teacher_model, teacher_vars, teacher_results = common.obtain_teacher(ctx)
    student_model = models.get_model(config.student.name, ctx.num_classes)
    common.check_pair(teacher_model, student_model, ctx)
    results = {"teacher": teacher_results}
    results.update(baseline_stages(
        ctx, config.student.name, config.optim, (teacher_model, teacher_vars),
        temperature=config.kd.temperature, ce_weight=config.kd.ce_weight,
        kd_weight=config.kd.kd_weight, from_scratch=config.kd.baseline))
    report(ctx, results)
    return results
