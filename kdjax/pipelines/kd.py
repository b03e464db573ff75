"""Pipeline ``kd``: a student distilled from a teacher with ``distill.method`` (Hinton KD
by default; any method of ``kdjax.distill.METHODS``), reported beside the teacher and a
student from scratch.

Stages (each resumable, each under ``workdir/<stage>/``):
  teacher        — loaded from ``config.teacher.checkpoint`` or trained first;
  student        — the student trained from scratch with CE (skipped if
                   ``kd.baseline=False``);
  <method>_init  — methods with an initialisation stage (fitnet, ab, ft, fsp): its loss
                   alone for ``distill.init_epochs`` epochs;
  <method>       — the student trained with γ·CE + the method's term from the teacher
                   (stage ``kd`` for Hinton KD: γ·CE + α·T²·KL(p_t ‖ p_s)).
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


def baseline_stages(ctx, student_name: str, optim_cfg, teacher, method, *,
                    from_scratch: bool) -> dict:
    """The comparison every distillation method is judged against, with one teacher and
    budget: the student from scratch (stage ``student``, if ``from_scratch``) and the
    student distilled with ``method`` (stage ``<method.name>``, preceded by its init
    stage if it has one). Returns {stage: results}."""
    results = {}
    if from_scratch:
        _, results["student"] = common.run_stage(
            ctx, "student", student_name, optim_cfg, common.supervised_objective)
    _, results[method.name] = common.distill_stage(ctx, method.name, student_name,
                                                   optim_cfg, method, teacher)
    return results


def comparison_table(results: dict, student: str, method: str, seed_noise: float) -> str:
    """The demo's one table: teacher, student alone, distilled student (test top-1, last
    epoch), their difference and — when ``seed_noise`` > 0 — the measured seed-to-seed
    std of that difference, so one run's difference can be read against it."""
    top1 = {stage: r.get("test_top1_last") for stage, r in results.items()}
    teacher = results["teacher"]
    rows = ["| | test top-1 (%) |", "|---|---|"]
    if top1.get("teacher") is not None:
        rows.append(f"| teacher {teacher.get('model', '')} | {top1['teacher']:.2f} |")
    else:
        rows.append(f"| teacher {teacher.get('model', '')} | loaded (step {teacher.get('step')}) |")
    rows.append(f"| student {student} alone | {top1['student']:.2f} |")
    rows.append(f"| student {student} + {method} | {top1[method]:.2f} |")
    rows.append(f"| {method} − student | {top1[method] - top1['student']:+.2f} |")
    if seed_noise > 0:
        rows.append(f"| seed-to-seed std of KD − student, this protocol (3 seeds, BUILD_NOTES) | "
                    f"{seed_noise:.2f} |")
    return "\n".join(rows)


def report(ctx, results: dict, table: str | None = None) -> None:
    """Print one results table (default: every stage's, `summary_table`); write
    ``workdir/summary.json`` and ``summary.md``."""
    table = summary_table(results) if table is None else table
    files.save_json(ctx.workdir / "summary.json", results)
    files.write_text(ctx.workdir / "summary.md", table + "\n")
    print(f"{table}\n\nTables: {ctx.workdir / 'summary.md'}; per-epoch curves: "
          f"<stage>/metrics.jsonl. Over 3 seeds, with plots: python -m kdjax.study "
          f"--config=configs/study.py:quick --workdir=DIR", flush=True)


def run(config, workdir) -> dict:
    """Teacher → (student from scratch) → distilled student; writes ``workdir/summary.json``."""
    ctx = common.setup(config, workdir)
    student_model = models.get_model(config.student.name, ctx.num_classes)
    teacher, teacher_results, method = common.teacher_and_method(ctx, student_model)
    results = {"teacher": teacher_results}
    results.update(baseline_stages(ctx, config.student.name, config.optim, teacher, method,
                                   from_scratch=config.kd.baseline))
    table = None
    if config.kd.baseline:
        table = comparison_table(results, config.student.name, method.name,
                                 float(config.kd.seed_noise))
    report(ctx, results, table)
    return results
