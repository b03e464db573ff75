"""fit(): the training loop every pipeline stage runs.

Compiles the train and eval steps once on the data mesh, resumes from the stage's
latest checkpoint, logs metrics and a progress line, evaluates on the validation
and test splits at epoch boundaries, keeps the last and the best-on-validation
checkpoints, and on SIGTERM saves and raises ``Preempted``.

Non-finite values stop the run with FloatingPointError and nothing written: a NaN/Inf
training loss, an evaluation loss, or any array of the state about to be saved.
"""

from __future__ import annotations

import dataclasses
import pathlib
import signal
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
import logging

from kdjax.train import checkpoint as ckpt_lib
from kdjax.train import metrics as metrics_lib
from kdjax.train import sharding, throughput

log = logging.getLogger("kdjax")


class Preempted(Exception):
    """Raised after SIGTERM once a checkpoint is safely written; re-run to resume."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """Static description of one training stage.

    name: e.g. 'teacher', 'student', 'kd'; dir: ``workdir/<name>``.
    total_steps = epochs · steps_per_epoch (or a debugging cap).
    """

    name: str
    dir: pathlib.Path
    total_steps: int
    steps_per_epoch: int
    global_batch_size: int
    eval_batch_size: int
    log_every_steps: int = 50
    eval_every_steps: int = 0  # 0 = once per epoch
    flops_per_image: float = 0.0  # model FLOPs of one training image (0 = MFU not shown)
    compute_dtype: str = "float32"  # selects the device peak the MFU divides by


@dataclasses.dataclass
class EvalData:
    """Held-out splits a stage reports on. ``validation`` may be None (then nothing is
    selected on validation and the last checkpoint counts as the best)."""

    validation: Any
    test: Any
    data_cfg: Any


class _SigtermFlag:
    """Context manager that turns SIGTERM into a flag checked between steps."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def evaluate(eval_step: Callable, variables, source, data_cfg, batch_size: int, mesh) -> dict:
    """Top-1, top-5 (percent) and mean cross-entropy of ``variables`` on a whole split.

    Per-example results are summed on the host, batch by batch (fetching each batch
    also keeps at most one evaluation in flight per device).
    """
    from kdjax.data import pipeline  # data layer imported lazily: keeps the core light

    totals = {"loss": 0.0, "top1": 0.0, "top5": 0.0, "count": 0.0}
    for batch in pipeline.eval_batches(
        source,
        data_cfg,
        global_batch_size=batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
        results = eval_step(variables, sharding.to_global(batch, mesh))
        for key, value in results.items():
            totals[key] += float(np.sum(_local_values(value), dtype=np.float64))
    totals = _sum_over_processes(totals)
    count = max(totals["count"], 1.0)
    return {
        "top1": 100.0 * totals["top1"] / count,
        "top5": 100.0 * totals["top5"] / count,
        "loss": totals["loss"] / count,
    }


def _local_values(array: jax.Array) -> np.ndarray:
    """This process's shards of a batch-sharded array, concatenated (no communication)."""
    return np.concatenate([np.asarray(s.data) for s in array.addressable_shards])


def _sum_over_processes(totals: dict) -> dict:
    """Sum host scalars over all JAX processes (identity on one host)."""
    if jax.process_count() == 1:
        return totals
    from jax.experimental import multihost_utils

    summed = multihost_utils.process_allgather(np.array(list(totals.values())))
    return dict(zip(totals, np.sum(summed, axis=0).tolist()))


def compile_train_step(train_step: Callable, mesh) -> Callable:
    """jit ``train_step(state, batch, teacher_variables)`` with the state donated and
    replicated, the batch sharded on the data axis."""
    replicated = sharding.replicated(mesh)
    return jax.jit(
        train_step,
        donate_argnums=(0,),
        in_shardings=(replicated, sharding.batch_sharded(mesh), replicated),
        out_shardings=(replicated, replicated),
    )


def compile_eval_step(eval_step: Callable, mesh) -> Callable:
    """jit ``eval_step(variables, batch)`` with variables replicated, the batch and the
    per-example results sharded on the data axis (no collective in the program)."""
    batch_sharding = sharding.batch_sharded(mesh)
    return jax.jit(eval_step, in_shardings=(sharding.replicated(mesh), batch_sharding),
                   out_shardings=batch_sharding)


def check_feature_maps(model, input_shape) -> None:
    """Fail at start-up (ValueError) if a feature tap of ``model`` has no spatial extent
    for inputs of ``input_shape`` (H, W, C), e.g. too many poolings for small images.

    Shapes only (``jax.eval_shape``): nothing is computed.
    """
    dummy = jax.ShapeDtypeStruct((1, *input_shape), np.float32)
    _, features = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.PRNGKey(0), x)[0], dummy)
    empty = {tap: tuple(f.shape) for tap, f in features.items() if 0 in f.shape[1:-1]}
    if empty:
        raise ValueError(
            f"{type(model).__name__} has empty feature maps for inputs {tuple(input_shape)} "
            f"(tap: shape {empty}); the input is too small for this model: use larger "
            f"images or a model with fewer downsamplings.")


def non_finite_arrays(tree) -> list[str]:
    """Key paths of the floating-point arrays of ``tree`` that hold a NaN or an Inf."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        leaf = jax.device_get(leaf)
        if np.issubdtype(np.asarray(leaf).dtype, np.inexact) and not np.all(np.isfinite(leaf)):
            bad.append(jax.tree_util.keystr(path))
    return bad


def _stop_non_finite(stage: Stage, checkpointer, what: str) -> FloatingPointError:
    """The error that stops a run on a non-finite value, naming the last good checkpoint."""
    last = checkpointer.latest_step()
    where = ("no checkpoint was written yet" if last is None else
             f"the last good checkpoint is step {last} in {stage.dir / ckpt_lib.LAST_DIR}")
    return FloatingPointError(
        f"[{stage.name}] {what}; the run is stopped and nothing of this state is written "
        f"({where}). Lower the learning rate or check the data and the model.")


def _save_checked(stage, checkpointer, state, data_state, progress, is_best) -> None:
    """Save, unless some array of ``state`` is non-finite (then FloatingPointError)."""
    bad = non_finite_arrays(state)
    if bad:
        raise _stop_non_finite(stage, checkpointer, (
            f"the state at step {int(jax.device_get(state.step))} holds non-finite values in "
            f"{len(bad)} arrays (first: {bad[0]})"))
    checkpointer.save(state, data_state, progress, is_best=is_best)


def _first_non_finite(history: list[tuple[int, dict]]) -> tuple[int, float] | None:
    for step, values in history:
        loss = float(values["loss"])
        if not np.isfinite(loss):
            return step, loss
    return None


def _mean_scalars(history: list[tuple[int, dict]]) -> dict:
    keys = history[-1][1].keys()
    return {k: float(np.mean([np.asarray(v[k]) for _, v in history])) for k in keys}


def _throughput(stage: Stage, images_per_sec: float, mesh) -> str:
    """Images/s per device and MFU for the progress line ('' without a FLOPs count)."""
    if not stage.flops_per_image:
        return ""
    peak = throughput.peak_flops(jax.devices()[0].device_kind, stage.compute_dtype)
    return throughput.describe(images_per_sec, mesh.size, stage.flops_per_image, peak)


def fit(
    stage: Stage,
    *,
    mesh,
    state,
    train_step: Callable,
    eval_step: Callable,
    train_iter: Iterator,
    eval_data: EvalData,
    spec: dict,
    config_dict: dict,
    teacher_variables=None,
    on_log: Callable[[int, list[tuple[int, dict]]], None] | None = None,
) -> tuple[Any, dict]:
    """Train ``state`` for the stage, resuming if a checkpoint exists.

    train_step(state, batch, teacher_variables) -> (state, metrics) is compiled here
    with the state replicated and the batch sharded; metrics are per-step scalars.
    on_log(step, history) receives every logged step's host metrics (for plots).
    Returns (final state, results dict); results are also written to results.json.
    """
    stage.dir.mkdir(parents=True, exist_ok=True)
    check_stage(stage, mesh)
    checkpointer = ckpt_lib.StageCheckpointer(stage.dir, spec, config_dict)
    progress = {"epoch": 0, "best_val_top1": -1.0, "test_top1_at_best_val": None,
                "best_test_top1": -1.0, "best_step": None}
    state = sharding.replicate(state, mesh)
    if checkpointer.latest_step() is not None:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )
        try:
            state, data_state, progress = checkpointer.restore(abstract)
        except BaseException:
            checkpointer.close()
            raise
        train_iter.set_state(data_state)
        log.info("[%s] resumed from step %d", stage.name, int(state.step))
    ckpt_lib.save_json(stage.dir / "config.json", config_dict)  # after the resume checks
    metrics_lib.truncate_logs(stage.dir, int(jax.device_get(state.step)))

    compiled_step = compile_train_step(train_step, mesh)
    compiled_eval = compile_eval_step(eval_step, mesh)
    if teacher_variables is not None:
        teacher_variables = sharding.replicate(teacher_variables, mesh)
    writer = metrics_lib.MetricWriter(stage.dir)
    eval_every = stage.eval_every_steps or stage.steps_per_epoch
    step = int(jax.device_get(state.step))
    pending: list[tuple[int, dict]] = []
    last_log_time, last_log_step = time.time(), step
    try:
        with _SigtermFlag() as sigterm:
            while step < stage.total_steps:
                batch = sharding.to_global(next(train_iter), mesh)
                state, step_metrics = compiled_step(state, batch, teacher_variables)
                step += 1
                pending.append((step, step_metrics))
                boundary = step % eval_every == 0 or step == stage.total_steps
                if step % stage.log_every_steps == 0 or boundary or sigterm.raised:
                    host = [(s, jax.device_get(m)) for s, m in pending]
                    pending.clear()
                    bad = _first_non_finite(host)
                    if bad is not None:
                        raise _stop_non_finite(stage, checkpointer,
                                               f"loss became {bad[1]} at step {bad[0]}")
                    scalars = _mean_scalars(host)
                    writer.write(step, "train", scalars)
                    if on_log is not None:
                        on_log(step, host)
                    ckpt_lib.crash_point("after_log", step)
                    now = time.time()
                    rate = (step - last_log_step) * stage.global_batch_size / max(now - last_log_time, 1e-9)
                    eta = (stage.total_steps - step) * stage.global_batch_size / max(rate, 1e-9)
                    log.info(metrics_lib.progress_line(
                        stage.name, step, stage.total_steps, step / stage.steps_per_epoch,
                        scalars, rate, eta, _throughput(stage, rate, mesh)))
                    last_log_time, last_log_step = now, step
                if boundary:
                    progress = _evaluate_and_save(
                        stage, state, step, compiled_eval, eval_data, mesh, writer,
                        checkpointer, train_iter, progress)
                    last_log_time = time.time()
                if sigterm.raised:
                    if not boundary:
                        _save_checked(stage, checkpointer, state, train_iter.get_state(),
                                      progress, is_best=False)
                    raise Preempted(
                        f"[{stage.name}] SIGTERM received: checkpoint saved at step {step} in "
                        f"{stage.dir / ckpt_lib.LAST_DIR}; run the same command to resume."
                    )
        results = _final_results(stage, state, compiled_eval, eval_data, mesh, progress,
                                 checkpointer)
    finally:
        writer.close()
        checkpointer.close()
    ckpt_lib.save_json(stage.dir / "results.json", results)
    return state, results


def check_stage(stage: Stage, mesh) -> None:
    """Fail before training (ValueError naming the config key) on settings the loop
    cannot run with."""
    if stage.total_steps < 1:
        raise ValueError(f"[{stage.name}] has {stage.total_steps} steps to train: the "
                         f"stage's optim.epochs (and train.max_steps, if set) must be >= 1")
    if stage.log_every_steps < 1:
        raise ValueError(f"train.log_every_steps={stage.log_every_steps} must be >= 1")
    try:
        sharding.check_batch_size(stage.eval_batch_size, mesh)
    except ValueError as err:
        raise ValueError(f"train.eval_batch_size: {err}") from None


def _evaluate(stage, variables, split: str, source, compiled_eval, eval_data, mesh, step,
              checkpointer) -> dict:
    """Metrics of ``variables`` on one split; FloatingPointError if the loss is not finite."""
    metrics = evaluate(compiled_eval, variables, source, eval_data.data_cfg,
                       stage.eval_batch_size, mesh)
    if not np.isfinite(metrics["loss"]):
        raise _stop_non_finite(stage, checkpointer,
                               f"the {split} loss is {metrics['loss']} at step {step}")
    return metrics


def _evaluate_and_save(stage, state, step, compiled_eval, eval_data, mesh, writer,
                       checkpointer, train_iter, progress) -> dict:
    """Evaluate at an epoch boundary, log, and write the last (and maybe best) checkpoint."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    test = _evaluate(stage, variables, "test", eval_data.test, compiled_eval, eval_data, mesh,
                     step, checkpointer)
    writer.write(step, "test", test)
    progress = dict(progress)
    progress["epoch"] = step / stage.steps_per_epoch
    progress["best_test_top1"] = max(progress["best_test_top1"], test["top1"])
    if eval_data.validation is not None:
        val = _evaluate(stage, variables, "validation", eval_data.validation, compiled_eval,
                        eval_data, mesh, step, checkpointer)
        writer.write(step, "validation", val)
        is_best = val["top1"] > progress["best_val_top1"]
        shown = f"val top1 {val['top1']:.2f} "
    else:
        val, is_best, shown = {"top1": test["top1"]}, True, ""
    if is_best:
        progress["best_val_top1"] = val["top1"]
        progress["test_top1_at_best_val"] = test["top1"]
        progress["best_step"] = step
    log.info("[%s] epoch %.2f %stest top1 %.2f top5 %.2f loss %.4f", stage.name,
                 progress["epoch"], shown, test["top1"], test["top5"], test["loss"])
    _save_checked(stage, checkpointer, state, train_iter.get_state(), progress, is_best)
    return progress


def _final_results(stage, state, compiled_eval, eval_data, mesh, progress,
                   checkpointer) -> dict:
    """Results of a finished stage: last-epoch and best-epoch test accuracy, both logged
    because published tables use either (see docs/distillation_losses.md); ``best_step`` is
    the step of the checkpoint in ``best/``."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    step = int(jax.device_get(state.step))
    test = _evaluate(stage, variables, "test", eval_data.test, compiled_eval, eval_data, mesh,
                     step, checkpointer)
    return {
        "stage": stage.name,
        "steps": int(jax.device_get(state.step)),
        "epochs": int(jax.device_get(state.step)) / stage.steps_per_epoch,
        "test_top1_last": test["top1"],
        "test_top5_last": test["top5"],
        "test_loss_last": test["loss"],
        "test_top1_best_epoch": progress["best_test_top1"],
        "val_top1_best": progress["best_val_top1"],
        "test_top1_at_best_val": progress["test_top1_at_best_val"],
        "best_step": progress.get("best_step"),
    }
