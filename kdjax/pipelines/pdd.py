"""Pipeline ``pdd``: pruning during distillation (Dan et al., Cognitive Computation 2024).

Stages (each resumable, under ``workdir/<stage>/``):
  teacher   — pre-trained teacher (``config.teacher.checkpoint``) or trained first;
  kd        — optional: the unpruned student trained with the same distillation loss, for
              the "unpruned student with KD vs pruned" comparison (``pdd.kd_baseline``);
  masks     — stage 1: distillation (``config.distill``: PDD's KD by default, any
              ``kdjax.distill`` method) while learning one differentiable mask vector per
              masked group (kdjax.pruning.learned_masks); the masks of the checkpoint with
              the best VALIDATION accuracy are kept (never selected on the test split) —
              with no validation split (``data.validation_size = 0``, the paper presets)
              those of the LAST checkpoint; which one is logged and recorded
              (``masks_checkpoint``);
  finetune  — stage 2: the student is physically compacted with those masks
              (kdjax.pruning.compact), evaluated as is (``before_finetune``), and
              fine-tuned (CE, or the distillation loss with ``pdd.finetune_kd``) from
              exactly those variables.
A method with an initialisation stage (fitnet, ab, ft, fsp) runs ``<stage>_init`` first.
Writes ``workdir/summary.json`` and ``workdir/summary.md`` (reductions, widths table).
"""

from __future__ import annotations

import logging

from kdjax import models, reports
from kdjax.pipelines import common
from kdjax.pruning import compact as compact_lib
from kdjax.pruning import cost as cost_lib
from kdjax.pruning import saliency
from kdjax.pruning import learned_masks
from kdjax.pruning.learned_masks import LearnedMasks, binary_masks
from kdjax.train import checkpoint as ckpt_lib
from kdjax.train import files

log = logging.getLogger("kdjax")


def masked_groups(model, placement: str) -> tuple[str, ...]:
    """Groups that get a learned mask.

    placement "inner": each residual block's inner channels (after conv1-BN-ReLU; the
    residual streams and the stem are not masked — our reconstruction, the default);
    "output": each residual stage's stream, i.e. after every block's add + ReLU (the
    authors' site) with one mask shared by the blocks of a stage, so the net compacts
    exactly without zero-padded shortcuts (the coupled stem output shares stage 1's
    mask); "all": every group (PDD's VGG placement: after every conv-BN-ReLU).
    """
    groups = models.mask_groups(model)
    if placement == "all":
        return tuple(groups)
    residual = {"inner": tuple(g for g in groups if ".block" in g),
                "output": tuple(g for g in groups if g.startswith("stage") and "." not in g)}
    if placement not in residual:
        raise ValueError(f"unknown pdd.placement {placement!r}; valid: 'inner', 'output', "
                         f"'all'")
    if not residual["inner"]:
        raise ValueError(f"pdd.placement={placement!r} needs a residual model; use 'all' "
                         f"for VGG")
    return residual[placement]


def fallback_groups(params: dict) -> list[str]:
    """Learned groups whose logits are all ≤ 0: binary_masks keeps their largest-logit
    channel, so there the compacted net differs from the stage-1 net (which zeroed the
    whole group)."""
    return sorted(g for g, m in params["mask_logits"].items() if not bool((m > 0).any()))


def reduction(pruned: dict, reference: dict) -> dict:
    """Percent of MACs and params removed relative to ``reference``."""
    return {
        "macs_removed_pct": 100.0 * (1 - pruned["macs"] / reference["macs"]),
        "params_removed_pct": 100.0 * (1 - pruned["params"] / reference["params"]),
    }


def run(config, workdir) -> dict:
    """Teacher → (KD baseline) → KD with learned masks → compact → fine-tune."""
    pdd = config.pdd
    saliency.check_round_to(pdd.round_to)
    ctx = common.setup(config, workdir)
    student = models.get_model(config.student.name, ctx.num_classes)
    teacher, teacher_results, method = common.teacher_and_method(ctx, student)
    results = {"teacher": teacher_results}
    if pdd.kd_baseline:
        _, results["kd"] = common.distill_stage(ctx, "kd", config.student.name, pdd.kd_optim,
                                                method, teacher)

    table = cost_lib.cost_table(student, ctx.input_shape) if pdd.flops_target > 0 else None
    wrapped = LearnedMasks(model=student, learned=masked_groups(student, pdd.placement),
                           init_scale=pdd.mask_init_scale, cost_table=table)
    penalty = (learned_masks.flops_penalty(pdd.flops_target, pdd.flops_weight) if pdd.flops_target > 0
               else None)
    _, results["masks"] = common.distill_stage(ctx, "masks", config.student.name, pdd.stage1,
                                               method, teacher, model=wrapped,
                                               regularizer=penalty)
    best, selection = selected_masks(ctx)
    groups = models.mask_groups(student)
    masks = binary_masks(best["params"], groups)
    if pdd.round_to > 1:  # round down to multiples, dropping the lowest-logit channels
        logits = best["params"]["mask_logits"]
        masks = saliency.round_masks({g: logits.get(g, masks[g]) for g in groups}, masks,
                                     pdd.round_to)
    fallback = fallback_groups(best["params"])
    if fallback:
        log.warning("[pdd] every mask logit <= 0 in %s: their largest-logit channel is kept, "
                    "so the compacted net differs from the stage-1 net there",
                    fallback)
    inner = {"params": best["params"]["model"], "batch_stats": best["batch_stats"]["model"]}
    small_model, small_vars = compact_lib.compact(student, inner, masks)
    kept = {g: int(round(float(masks[g].sum()))) for g in groups}
    log.info("[pdd] widths found:\n%s", reports.widths_table(groups, kept))
    before = common.evaluate_model(ctx, small_model, small_vars)
    log.info("[pdd] compacted net before stage 2: %s", before)
    compaction = {"masks_checkpoint": selection, "fallback_groups": fallback,
                  "before_finetune": before}

    finetune = dict(widths=kept, model=small_model, initial_variables=small_vars)
    if pdd.finetune_kd:
        _, results["finetune"] = common.distill_stage(
            ctx, "finetune", config.student.name, pdd.stage2, method, teacher, **finetune)
    else:
        _, results["finetune"] = common.run_stage(
            ctx, "finetune", config.student.name, pdd.stage2, common.supervised_objective,
            **finetune)

    summary = {**summarize(config, ctx, student, small_model, groups, kept, results),
               **compaction}
    files.save_json(ctx.workdir / "summary.json", summary)
    markdown = reports.pdd_markdown(summary, groups, kept)
    files.write_text(ctx.workdir / "summary.md", markdown)
    print(markdown, flush=True)
    return summary


def selected_masks(ctx) -> tuple[dict, dict]:
    """Stage-1 variables whose masks are kept, and {'rule', 'step'}: the best-on-validation
    checkpoint, or the last one when there is no validation split."""
    select = ckpt_lib.BEST_DIR if ctx.splits.validation is not None else ckpt_lib.LAST_DIR
    rule = "best_validation" if select == ckpt_lib.BEST_DIR else "last (no validation split)"
    _, step = ckpt_lib.load_meta(ctx.workdir / "masks", prefer=select)
    _, variables = ckpt_lib.load_variables(ctx.workdir / "masks", prefer=select)
    log.info("[pdd] masks from the %s stage-1 checkpoint, step %d", rule, step)
    return variables, {"rule": rule, "step": step}


def summarize(config, ctx, student, small_model, groups, kept, results) -> dict:
    """Costs, reductions (vs the unpruned student, and vs the standard ResNet20 when the
    student is PDD's widened one) and accuracies."""
    shape = ctx.input_shape
    dense = cost_lib.model_cost(student, shape)
    pruned = cost_lib.model_cost(small_model, shape)
    summary = {
        "student": config.student.name,
        "teacher": results["teacher"],
        "unpruned_cost": {"macs": dense["macs"], "params": dense["params"]},
        "pruned_cost": {"macs": pruned["macs"], "params": pruned["params"]},
        "reduction_vs_unpruned_student": reduction(pruned, dense),
        "kept_widths": kept,
        "stages": results,
        "pruned_test_top1": results["finetune"]["test_top1_last"],
    }
    if config.student.name == "resnet20_pdd":
        standard = cost_lib.model_cost(models.get_model("resnet20", ctx.num_classes), shape)
        summary["reduction_vs_standard_resnet20"] = reduction(pruned, standard)
    if "kd" in results:
        summary["unpruned_kd_test_top1"] = results["kd"]["test_top1_last"]
    return summary
