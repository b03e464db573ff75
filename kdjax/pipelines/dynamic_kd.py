"""Pipeline ``dynamic_kd``: KD whose student-side entropy is corrected on-line by an
entropy controller held in optimizer state (DynamicKD, Zhu, Shang et al. 2023).

Stages (each resumable, under ``workdir/<stage>/``):
  teacher      — loaded from ``config.teacher.checkpoint`` or trained first;
  student, kd  — with ``dynamic_kd.baselines``: the student from scratch and vanilla KD
                 with the same teacher, budget and temperature (kd.baseline_stages);
  dynamic_kd   — γ·CE(z_s, y) + α·T²·KL(p_t ‖ softmax(c·z_s/T)), with c read from the
                 optimizer state and updated by kdjax.controllers.entropy_controller.
Every step's controller value, H(q_c), H(p_t), KD and CE terms go to
``dynamic_kd/controller.jsonl``; ``dynamic_kd/controller.png`` plots them.
"""

from __future__ import annotations

import json
import logging
import pathlib

from kdjax import controllers, losses, models
from kdjax.data import pipeline as data_pipeline
from kdjax.pipelines import common, kd
from kdjax.train import checkpoint as ckpt_lib

log = logging.getLogger("kdjax")

STAGE = "dynamic_kd"
LOGGED = ("controller", "controller_grad", "entropy_student", "entropy_teacher", "kd", "ce",
          "loss")


def dynamic_kd_objective(temperature: float, ce_weight: float, kd_weight: float, mode: str):
    """γ·CE + α·T²·KL(p_t ‖ q_c), q_c = softmax(c·z_s/T), c from the optimizer state.

    The controller's measurement goes out as the optimizer's extra arguments:
    mode "gradient": controller_grad = ∂L_KD/∂c = T·(E_{q_c}[z_s] − E_{p_t}[z_s]);
    mode "entropy_feedback": student_entropy = H(q_c), teacher_entropy = H(p_t).
    """

    def objective(logits, features, batch, teacher_logits, opt_state):
        c = controllers.controller_value(opt_state)
        ce = losses.cross_entropy(logits, batch["label"])
        kd_term = losses.dynamic_kd_loss(logits, teacher_logits, c, temperature)
        loss = ce_weight * ce + kd_weight * kd_term
        h_student, h_teacher = controllers.controller_entropies(logits, teacher_logits, c,
                                                                temperature)
        grad_c = controllers.kd_controller_grad(logits, teacher_logits, c, temperature)
        if mode == "gradient":
            extra = {"controller_grad": grad_c}
        else:
            extra = {"student_entropy": h_student, "teacher_entropy": h_teacher}
        metrics = {"loss": loss, "ce": ce, "kd": kd_term, "controller": c.mean(),
                   "controller_grad": grad_c.mean(), "entropy_student": h_student,
                   "entropy_teacher": h_teacher}
        return loss, metrics, extra

    return objective


def controller_transform(cfg, num_classes: int, steps_per_epoch: int):
    """The optax controller of ``config.dynamic_kd.controller``."""
    c = cfg.controller
    if c.kind not in ("scalar", "per_class"):
        raise ValueError(f"dynamic_kd.controller.kind={c.kind!r} is not implemented; valid: "
                         f"'scalar', 'per_class' (the per-sample head of PAPERS.md is not built)")
    return controllers.entropy_controller(
        learning_rate=c.lr, init=c.init, clip=tuple(c.clip), kind=c.kind,
        num_classes=num_classes if c.kind == "per_class" else None, mode=c.mode,
        feedback_rate=c.feedback_rate, warmup_steps=int(c.warmup_epochs * steps_per_epoch))


class StepLog:
    """``on_log`` callback: appends every step's controller metrics to a JSONL file.

    On its first call it drops lines at or after the first incoming step, so a run that
    died between a log and its checkpoint never leaves duplicated steps.
    """

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.started = False

    def __call__(self, step: int, history) -> None:
        if not self.started:
            self._truncate(history[0][0])
            self.started = True
        with self.path.open("a") as f:
            for s, metrics in history:
                record = {"step": int(s), **{k: float(metrics[k]) for k in LOGGED}}
                f.write(json.dumps(record) + "\n")

    def _truncate(self, first_step: int) -> None:
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] < first_step]
            self.path.write_text("".join(line + "\n" for line in kept))


def plot_controller(jsonl: pathlib.Path, png: pathlib.Path) -> None:
    """Three panels against the step: c; H(q_c) and H(p_t); KD and CE terms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    axes[0].plot(steps, [r["controller"] for r in rows])
    axes[0].set_ylabel("controller c")
    axes[1].plot(steps, [r["entropy_student"] for r in rows], label="H(q_c) student")
    axes[1].plot(steps, [r["entropy_teacher"] for r in rows], label="H(p_t) teacher")
    axes[1].set_ylabel("entropy (nats)")
    axes[1].legend()
    axes[2].plot(steps, [r["kd"] for r in rows], label="KD term")
    axes[2].plot(steps, [r["ce"] for r in rows], label="CE term")
    axes[2].set_ylabel("loss")
    axes[2].set_xlabel("step")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def run(config, workdir) -> dict:
    """Teacher → (student from scratch, vanilla KD) → DynamicKD; writes summary.json."""
    ctx = common.setup(config, workdir)
    cfg = config.dynamic_kd
    teacher_model, teacher_vars, teacher_results = common.obtain_teacher(ctx)
    student_model = models.get_model(config.student.name, ctx.num_classes)
    common.check_pair(teacher_model, student_model, ctx)
    teacher = (teacher_model, teacher_vars)
    results = {"teacher": teacher_results}
    if cfg.baselines:
        results.update(kd.baseline_stages(
            ctx, config.student.name, config.optim, teacher, temperature=cfg.temperature,
            ce_weight=cfg.ce_weight, kd_weight=cfg.kd_weight, from_scratch=True))
    steps_per_epoch = data_pipeline.steps_per_epoch(len(ctx.splits.train),
                                                    config.optim.batch_size)
    stage_dir = ctx.workdir / STAGE
    stage_dir.mkdir(parents=True, exist_ok=True)
    variables, results[STAGE] = common.run_stage(
        ctx, STAGE, config.student.name, config.optim,
        dynamic_kd_objective(cfg.temperature, cfg.ce_weight, cfg.kd_weight,
                             cfg.controller.mode),
        teacher=teacher, tx_extra=controller_transform(cfg, ctx.num_classes, steps_per_epoch),
        on_log=StepLog(stage_dir / "controller.jsonl"))
    rows = (stage_dir / "controller.jsonl").read_text().splitlines()
    if rows:
        results[STAGE]["final_controller"] = json.loads(rows[-1])["controller"]
        plot_controller(stage_dir / "controller.jsonl", stage_dir / "controller.png")
    kd.report(ctx, results)
    return results
