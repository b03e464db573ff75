"""Pipeline ``dynamic_kd``: KD whose student-side entropy is corrected on-line by an
entropy controller held in optimizer state (DynamicKD, Zhu, Shang et al. 2023).

Stages (each resumable, under ``workdir/<stage>/``):
  teacher      — loaded from ``config.teacher.checkpoint`` or trained first;
  student, kd  — with ``dynamic_kd.baselines``: the student from scratch and vanilla KD
                 with the same teacher, budget and temperature (``kd.baseline_stages``);
  dynamic_kd   — γ·CE(z_s, y) + α·T²·KL(p_t ‖ q_c), q_c = softmax(c·z_s/T): the
                 ``dynamic_kd`` method of ``kdjax.distill`` (``config.distill``), c read
                 from the optimizer state and updated by
                 ``kdjax.controllers.entropy_controller`` (chained after SGD).
Every step's metrics (c, ∂L_KD/∂c, H(q_c), H(p_t), KD and CE terms, loss) go to
``dynamic_kd/controller.jsonl``; ``dynamic_kd/controller.png`` plots them.
"""

from __future__ import annotations

import json

from etils import epath

from kdjax import models, reports
from kdjax.distill.methods import KD
from kdjax.pipelines import common, kd
from kdjax.train import files

STAGE = "dynamic_kd"


def read_rows(path: epath.Path) -> list[dict]:
    """The JSON lines of ``path`` (none if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class StepLog:
    """``on_log`` callback: appends every step's host metrics to a JSONL file, one line
    ``{"step": s, <metric>: value, ...}`` per step. Lines past the resumed checkpoint
    are dropped by the loop (``metrics.truncate_logs``), as for every stage log.
    """

    def __init__(self, path: epath.Path):
        self.path = path
        self._log = None

    def __call__(self, step: int, history) -> None:
        if self._log is None:  # opened at the first log, after the loop's truncation
            self._log = files.JsonlLog(self.path)
        self._log.append([{"step": int(s), **{k: float(v) for k, v in metrics.items()}}
                          for s, metrics in history])

    def close(self) -> None:
        if self._log is not None:
            self._log.close()


def final_controller(rows: list[dict]) -> dict:
    """c used at the last logged step: ``final_controller`` (per class: mean, and
    ``final_controller_min`` / ``final_controller_max``)."""
    last = rows[-1]
    return {f"final_{key}": last[key] for key in ("controller", "controller_min",
                                                  "controller_max") if key in last}


def run(config, workdir) -> dict:
    """Teacher → (student from scratch, vanilla KD) → DynamicKD; writes summary.json."""
    ctx = common.setup(config, workdir)
    if config.distill.method != STAGE:
        raise ValueError(f"the dynamic_kd pipeline needs distill.method='dynamic_kd', got "
                         f"{config.distill.method!r} (other methods: configs/kd.py)")
    student_model = models.get_model(config.student.name, ctx.num_classes)
    teacher, teacher_results, method = common.teacher_and_method(ctx, student_model)
    results = {"teacher": teacher_results}
    if config.dynamic_kd.baselines:
        vanilla = KD(weight=method.weight, temperature=method.temperature,
                     standardize_logits=method.standardize_logits)
        results.update(kd.baseline_stages(ctx, config.student.name, config.optim, teacher,
                                          vanilla, from_scratch=True))
    stage_dir = files.make_dirs(ctx.workdir / STAGE)
    jsonl = stage_dir / "controller.jsonl"
    step_log = StepLog(jsonl)
    try:
        _, results[STAGE] = common.distill_stage(
            ctx, STAGE, config.student.name, config.optim, method, teacher,
            on_log=step_log)
    finally:
        step_log.close()
    rows = read_rows(jsonl)
    if rows:
        results[STAGE].update(final_controller(rows))
        reports.controller_plot(rows, stage_dir / "controller.png")
    kd.report(ctx, results)
    return results
