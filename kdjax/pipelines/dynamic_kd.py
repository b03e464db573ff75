"""Pipeline ``dynamic_kd``: KD whose student-side entropy is corrected on-line by an
entropy controller held in optimizer state (DynamicKD, Zhu, Shang et al. 2023).

Stages (each resumable, under ``workdir/<stage>/``):
  teacher      — loaded from ``config.teacher.checkpoint`` or trained first;
  student, kd  — with ``dynamic_kd.baselines``: the student from scratch and vanilla KD
                 with the same teacher, budget and temperature (``kd.baseline_stages``);
  dynamic_kd   — γ·CE(z_s, y) + α·T²·KL(p_t ‖ q_c), q_c = softmax(c·z_s/T), with c read
                 from the optimizer state and updated by
                 ``kdjax.controllers.entropy_controller`` (chained after SGD).
Every step's metrics (c, ∂L_KD/∂c, H(q_c), H(p_t), KD and CE terms, loss) go to
``dynamic_kd/controller.jsonl``; ``dynamic_kd/controller.png`` plots them.
"""

from __future__ import annotations

import json

import jax
from etils import epath

from kdjax import controllers, losses, models
from kdjax.data import pipeline as data_pipeline
from kdjax.pipelines import common, kd
from kdjax.train import files

STAGE = "dynamic_kd"
KINDS = ("scalar", "per_class")


def dynamic_kd_objective(temperature: float, ce_weight: float, kd_weight: float, kind: str,
                         mode: str):
    """γ·CE(z_s, y) + α·T²·KL(p_t ‖ q_c) with q_c = softmax(c·z_s/T), p_t = softmax(z_t/T).

    c = controllers.controller_value(opt_state). The optimizer state is not
    differentiated, so c is a constant for the model gradient; the controller's own
    measurement leaves as the optimizer's extra arguments (on the stopped logits):
      mode "gradient":         controller_grad = ∂L_KD/∂c
                               = T·mean_i(E_{q_c}[z_s,i] − E_{p_t}[z_s,i]),
                               per class k: T·mean_i z_s,ik·(q_ik − p_ik);
      mode "entropy_feedback": student_entropy = H(q_c), teacher_entropy = H(p_t).
    Metrics: loss, ce, kd, controller (mean of c; per class also its min and max),
    controller_grad (mean), H_q = H(q_c), H_p = H(p_t).
    """
    if mode not in ("gradient", "entropy_feedback"):
        raise ValueError(f"dynamic_kd.controller.mode={mode!r}; valid: 'gradient', "
                         f"'entropy_feedback'")

    def objective(logits, features, batch, teacher_logits, opt_state):
        c = controllers.controller_value(opt_state)
        ce = losses.cross_entropy(logits, batch["label"])
        kd_term = losses.dynamic_kd_loss(logits, teacher_logits, c, temperature,
                                         controller_kind=kind)
        loss = ce_weight * ce + kd_weight * kd_term
        z = jax.lax.stop_gradient(logits)
        h_q, h_p = controllers.controller_entropies(z, teacher_logits, c, temperature,
                                                    controller_kind=kind)
        grad_c = controllers.kd_controller_grad(z, teacher_logits, c, temperature,
                                                controller_kind=kind)
        metrics = {"loss": loss, "ce": ce, "kd": kd_term, "controller": c.mean(),
                   "controller_grad": grad_c.mean(), "H_q": h_q, "H_p": h_p}
        if kind == "per_class":
            metrics.update(controller_min=c.min(), controller_max=c.max())
        if mode == "gradient":
            extra = {"controller_grad": grad_c}
        else:
            extra = {"student_entropy": h_q, "teacher_entropy": h_p}
        return loss, metrics, extra

    return objective


def controller_transform(controller_cfg, num_classes: int, steps_per_epoch: int):
    """``entropy_controller`` of ``config.dynamic_kd.controller``; warm-up epochs → steps
    (round(warmup_epochs · steps_per_epoch))."""
    c = controller_cfg
    if c.kind not in KINDS:
        raise ValueError(f"dynamic_kd.controller.kind={c.kind!r} is not implemented; valid: "
                         f"{', '.join(KINDS)} (no per-sample head: docs/dynamic_kd.md)")
    return controllers.entropy_controller(
        learning_rate=c.lr, init=c.init, clip=tuple(c.clip), kind=c.kind,
        num_classes=num_classes if c.kind == "per_class" else None, mode=c.mode,
        feedback_rate=c.feedback_rate,
        warmup_steps=int(round(c.warmup_epochs * steps_per_epoch)))


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


def plot_controller(rows: list[dict], png: epath.Path) -> None:
    """Three panels against the step: c (per class: mean, min–max band);
    H(q_c) and H(p_t); the KD and CE terms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    series = lambda key: [r[key] for r in rows]  # noqa: E731
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    axes[0].plot(steps, series("controller"), label="c (mean)")
    if "controller_min" in rows[0]:
        axes[0].fill_between(steps, series("controller_min"), series("controller_max"),
                             alpha=0.3, label="c min–max over classes")
    axes[0].set_ylabel("controller c")
    axes[0].legend()
    axes[1].plot(steps, series("H_q"), label="H(q_c) student")
    axes[1].plot(steps, series("H_p"), label="H(p_t) teacher")
    axes[1].set_ylabel("entropy (nats)")
    axes[1].legend()
    axes[2].plot(steps, series("kd"), label="KD term")
    axes[2].plot(steps, series("ce"), label="CE term")
    axes[2].set_ylabel("loss")
    axes[2].set_xlabel("step")
    axes[2].legend()
    fig.tight_layout()
    files.save_figure(fig, png)
    plt.close(fig)


def final_controller(rows: list[dict]) -> dict:
    """c used at the last logged step: ``final_controller`` (per class: mean, and
    ``final_controller_min`` / ``final_controller_max``)."""
    last = rows[-1]
    return {f"final_{key}": last[key] for key in ("controller", "controller_min",
                                                  "controller_max") if key in last}


def run(config, workdir) -> dict:
    """Teacher → (student from scratch, vanilla KD) → DynamicKD; writes summary.json."""
    ctx = common.setup(config, workdir)
    cfg = config.dynamic_kd
    steps_per_epoch = data_pipeline.steps_per_epoch(len(ctx.splits.train),
                                                    config.optim.batch_size)
    controller = controller_transform(cfg.controller, ctx.num_classes, steps_per_epoch)
    objective = dynamic_kd_objective(cfg.temperature, cfg.ce_weight, cfg.kd_weight,
                                     cfg.controller.kind, cfg.controller.mode)
    teacher_model, teacher_vars, teacher_results = common.obtain_teacher(ctx)
    student_model = models.get_model(config.student.name, ctx.num_classes)
    common.check_pair(teacher_model, student_model, ctx)
    teacher = (teacher_model, teacher_vars)
    results = {"teacher": teacher_results}
    if cfg.baselines:
        results.update(kd.baseline_stages(
            ctx, config.student.name, config.optim, teacher, temperature=cfg.temperature,
            ce_weight=cfg.ce_weight, kd_weight=cfg.kd_weight, from_scratch=True))
    stage_dir = files.make_dirs(ctx.workdir / STAGE)
    jsonl = stage_dir / "controller.jsonl"
    step_log = StepLog(jsonl)
    try:
        _, results[STAGE] = common.run_stage(
            ctx, STAGE, config.student.name, config.optim, objective, teacher=teacher,
            tx_extra=controller, on_log=step_log)
    finally:
        step_log.close()
    rows = read_rows(jsonl)
    if rows:
        results[STAGE].update(final_controller(rows))
        plot_controller(rows, stage_dir / "controller.png")
    kd.report(ctx, results)
    return results
