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

from kdjax import models, reports
from kdjax.pipelines import common
from kdjax.train import files

log = logging.getLogger("kdjax")


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


def report(ctx, results: dict, table: str | None = None) -> None:
    """Print one results table (default: every stage's, `reports.stage_table`); write
    ``workdir/summary.json`` and ``summary.md``."""
    table = reports.stage_table(results) if table is None else table
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
        table = reports.comparison_table(results, config.student.name, method.name,
                                 float(config.kd.seed_noise))
    report(ctx, results, table)
    return results
