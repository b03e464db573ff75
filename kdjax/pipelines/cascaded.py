"""Pipeline ``cascaded``: cascaded channel pruning with hierarchical self-distillation
(teacher → teaching assistants → student over ONE weight set; Miles & Mikolajczyk 2020).

Stages (each resumable, under ``workdir/<stage>/``):
  teacher   — the network to prune: ``config.teacher.checkpoint`` or trained first;
  cascade   — (``cascade.method = "cascade"``) L = K + 2 levels (K = ``cascade.num_tas``)
              share the teacher's weights under nested masks {group: [L, C]}
              (kdjax.pruning.cascade). One compiled step runs all levels as ONE vmapped
              forward over the stacked masks (private BN running statistics per level),
              minimises Σ_k [γ·CE(s_k) + D(t_k → s_k)] (t_k = level k−1, stop-gradient by
              default), accumulates every level's Taylor saliency of its own pair loss, and
              every P steps prunes all levels towards their MACs targets (nesting kept);
  levels    — every level is compacted into its own zoo model (kdjax.pruning.compact),
              evaluated, and saved under ``cascade/levels/level<k>_<role>/`` (a checkpoint
              ``--config.teacher.checkpoint`` accepts): one training, a family of models;
  finetune  — optional (``cascade.finetune.epochs > 0``): the compacted student is
              fine-tuned with KD from the cascade's own teacher level.
Baselines (``cascade.method = "oneshot_l1" | "oneshot_taylor"``): one-shot L1 / Taylor
pruning of the trained teacher to the same MACs target, then KD fine-tuning (from the
teacher) for the same total epochs (cascade + finetune), under ``workdir/<method>/``.
Writes ``workdir/summary.json``, ``summary.md`` (a row per level) and ``accuracy_macs.png``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, NamedTuple

import flax
import ml_collections
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import distill, losses, models, reports
from kdjax.data import pipeline as data_pipeline
from kdjax.pipelines import common
from kdjax.pruning import cascade as cascade_lib
from kdjax.pruning import compact as compact_lib
from kdjax.pruning import cost as cost_lib
from kdjax.pruning import masks as masks_lib
from kdjax.pruning import saliency
from kdjax.train import checkpoint as ckpt_lib
from kdjax.train import files, loop, optim, precision, sharding
from kdjax.train.state import TrainState, make_eval_step

log = logging.getLogger("kdjax")

METHODS = ("cascade", "oneshot_l1", "oneshot_taylor")
MAX_TAS = 3
NORMALIZATIONS = ("mean", "l2", "none")  # saliency.normalize_scores


class Outputs(NamedTuple):
    """One network's (or, level-stacked, every level's) forward pass: logits [B, K] and
    feature taps {name: array}. Same fields as the distillation interface's ``Outputs``
    (kdjax.distill.base), so any of its methods can serve as the pair loss."""

    logits: jax.Array
    features: dict


# --------------------------------------------------------------------------
# The pair loss: the seam where a distillation method plugs in
# --------------------------------------------------------------------------


def pair_methods() -> tuple[str, ...]:
    """The distillation methods that plug in as the cascade's pair loss: those without
    trainable params or state of their own, an initialisation stage, a step-dependent term
    or an optimizer transform (each would need one copy per level pair in the cascade's
    state; not built): kd, at, sp, rkd, pkt, nst."""
    base = distill.Method
    return tuple(sorted(
        name for name, cls in distill.METHODS.items()
        if not cls.init_stage and all(getattr(cls, hook) is getattr(base, hook)
                                      for hook in ("init", "term", "transform", "for_stage"))))


def method_pair_loss(method: distill.Method):
    """A stateless method as a pair loss: (student, teacher, batch) -> (β·term, metrics)."""

    def pair_loss(student: Outputs, teacher: Outputs, batch: dict):
        loss, metrics, _ = method.loss({}, {}, student, teacher, batch)
        return loss, metrics

    return pair_loss


# The cascade's pair loss with KD: Σ_k [CE(s_k) + KD(t_k → s_k)], γ = β = 1. Used where the
# distill section asks for defaults (weight / ce_weight < 0) and the method is kd; any other
# method then takes its own published defaults (AT β = 1000, …), not these.
KD_PAIR_WEIGHTS = {"weight": 1.0, "ce_weight": 1.0}


def pair_distill_config(distill_cfg):
    """A copy of ``distill_cfg`` with KD_PAIR_WEIGHTS filled in for kd's defaults."""
    cfg = ml_collections.ConfigDict(distill_cfg.to_dict())
    if cfg.method == "kd":
        for key, value in KD_PAIR_WEIGHTS.items():
            if cfg[key] < 0:
                cfg[key] = value
    return cfg


def method_from_config(distill_cfg, network_taps) -> tuple[distill.Method, float]:
    """``config.distill``'s method and its CE weight γ (``pair_distill_config``), taps
    checked against the pruned network's (teacher and student levels are the same network);
    ValueError for a method that cannot be a pair loss, listing those that can."""
    if distill_cfg.method not in pair_methods():
        raise ValueError(f"distill.method {distill_cfg.method!r} cannot be the cascade's pair "
                         f"loss (it owns params/state or a step-dependent term); valid: "
                         f"{', '.join(pair_methods())}")
    cfg = pair_distill_config(distill_cfg)
    method = distill.make_method(cfg, student_taps=network_taps, teacher_taps=network_taps)
    return method, distill.ce_weight(cfg, method)


# --------------------------------------------------------------------------
# State, forward, schedule, step
# --------------------------------------------------------------------------


@flax.struct.dataclass
class CascadeState:
    """Train state of the cascade; a pytree of arrays (checkpointed whole by loop.fit).

    params: the shared weights; level_stats: BN running statistics per level (leaves
    [L, ...]); masks: nested {group: [L, C]}; saliency: Σ |∂L_k/∂m_k| over the steps since
    the last pruning event, {group: [L, C]}; saliency_steps: how many steps that sum holds.
    ``batch_stats`` (what loop.fit evaluates and saves as "best") bundles the level
    statistics with the masks, so an evaluation can pick one level (``LevelView``).
    """

    step: jax.Array
    params: Any
    level_stats: Any
    opt_state: Any
    rng: jax.Array
    masks: Any
    saliency: Any
    saliency_steps: jax.Array

    @property
    def batch_stats(self) -> dict:
        return {"levels": self.level_stats, "masks": self.masks}

    @classmethod
    def create(cls, variables, groups: dict, levels: int, tx, rng) -> "CascadeState":
        """Every level starts as the unpruned network with its BN statistics."""
        stack = lambda x: jnp.broadcast_to(x, (levels, *jnp.shape(x)))  # noqa: E731
        masks = cascade_lib.nested_ones(groups, levels)
        return cls(step=jnp.zeros((), jnp.int32), params=variables["params"],
                   level_stats=jax.tree.map(stack, variables["batch_stats"]),
                   opt_state=tx.init(variables["params"]), rng=rng, masks=masks,
                   saliency=jax.tree.map(jnp.zeros_like, masks),
                   saliency_steps=jnp.zeros((), jnp.int32))


class LevelView(NamedTuple):
    """Duck-typed model for ``make_eval_step``: runs level ``level`` of a cascade from
    variables {'params', 'batch_stats': CascadeState.batch_stats}."""

    model: Any
    level: int

    def apply(self, variables, images, train=False):
        stats = variables["batch_stats"]
        inner = {"params": variables["params"],
                 "batch_stats": cascade_lib.level(stats["levels"], self.level)}
        return self.model.apply(inner, images, masks=cascade_lib.level(stats["masks"], self.level),
                                train=train)


def level_forward(model, level_stats, images, taps=(), dtype=jnp.float32):
    """forward(params, masks {group: [L, C]}) -> (Outputs [L, ...], new level_stats):
    all levels in train mode as one ``vmap`` over (BN statistics, masks), the weights and
    the images shared, computed in ``dtype`` (kdjax.train.precision: float32 outputs).
    ``taps``: the features the pair loss reads."""

    def forward(params, masks):
        def one(stats, m):
            (logits, feats), updates = precision.apply(
                model, {"params": params, "batch_stats": stats}, images, dtype, masks=m,
                train=True, mutable=["batch_stats"])
            return Outputs(logits, {t: feats[t] for t in taps}), updates["batch_stats"]

        return jax.vmap(one)(level_stats, masks)

    return forward


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Pruning events at steps P, 2P, …, E·P; after event e (0-based) level k's MACs per
    image must be ≤ ``targets[e, k]`` (float64 [E, L])."""

    every: int
    targets: np.ndarray

    @property
    def num_events(self) -> int:
        return self.targets.shape[0]

    def event(self, step):
        """(is an event after ``step`` updates, its 0-based index), jnp scalars."""
        e = step // self.every
        fires = (step % self.every == 0) & (e >= 1) & (e <= self.num_events)
        return fires, jnp.clip(e - 1, 0, self.num_events - 1)


def make_schedule(model, input_shape, cfg, target: float, steps_per_epoch: int,
                  planned_steps: int) -> Schedule:
    """The MACs targets of every level after every event (``cascade.level_ratios`` and
    ``event_ratios``) and P = round(prune_every_epochs · steps_per_epoch) ≥ 1; ValueError
    when the E events do not fit in the stage's planned steps (epochs · steps_per_epoch;
    a ``train.max_steps`` cap may cut the schedule short, as it cuts the stage)."""
    levels = cascade_lib.num_levels(cfg.num_tas)
    final = cascade_lib.level_ratios(target, levels, cfg.spacing)
    ratios = cascade_lib.event_ratios(final, cfg.num_events, cfg.spacing)
    full = cost_lib.model_cost(model, input_shape)["macs"]
    every = max(1, round(cfg.prune_every_epochs * steps_per_epoch))
    if every * cfg.num_events > planned_steps:
        raise ValueError(
            f"cascade.num_events={cfg.num_events} events every {every} steps "
            f"(cascade.prune_every_epochs={cfg.prune_every_epochs}) need "
            f"{every * cfg.num_events} steps, but the cascade stage has {planned_steps} "
            f"(cascade.optim.epochs={cfg.optim.epochs})")
    return Schedule(every, ratios * full)


def make_cascade_step(model, tx, schedule: Schedule, pair_loss, *, ce_weight: float,
                      stop_gradient: bool, input_shape, normalize: str, taps=(),
                      compute_dtype: str = "float32", round_to: int = 1):
    """``step(state, batch, teacher_variables) -> (state, metrics)`` for loop.fit
    (forward passes in ``compute_dtype``; widths rounded to multiples of ``round_to``).

    One forward of all levels, the joint loss (``cascade.cascade_loss``), an optimizer
    update of the shared weights, the running saliency sum, and — on event steps — one
    ``cascade.prune_event`` with the mean saliency since the previous event (then reset).
    metrics: the loss terms per level, "accuracy" (the student's batch top-1) and
    "level{k}/macs_ratio" (after this step's pruning).
    """
    table = cost_lib.cost_table(model, tuple(input_shape))
    full_macs = float(cost_lib.counts_cost(table, dict(table.widths))["macs"])
    targets = jnp.asarray(schedule.targets, jnp.float32)
    dtype = precision.compute_dtype(compute_dtype)

    def loss_fn(outputs, batch, stop):
        return cascade_lib.cascade_loss(outputs, batch, pair_loss, ce_weight, stop)

    def prune(args):
        masks, total, count, e = args
        mean = jax.tree.map(lambda s: s / count, total)
        new = cascade_lib.prune_event(mean, masks, targets[e], model, input_shape, normalize,
                                      round_to)
        return new, jax.tree.map(jnp.zeros_like, total), jnp.zeros_like(count)

    def step(state: CascadeState, batch: dict, teacher_variables=None):
        del teacher_variables  # the teacher is level 0 of the state
        forward = level_forward(model, state.level_stats, batch["image"], taps, dtype)
        loss, metrics, grads, sal, level_stats = cascade_lib.cascade_grads(
            forward, state.params, state.masks, lambda o, stop: loss_fn(o, batch, stop),
            stop_gradient)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        total = jax.tree.map(jnp.add, state.saliency, sal)
        count = state.saliency_steps + 1
        number = state.step + 1
        is_event, e = schedule.event(number)
        masks, total, count = jax.lax.cond(
            is_event, prune, lambda args: args[:3], (state.masks, total, count, e))
        new_state = state.replace(
            step=number, params=optax.apply_updates(state.params, updates),
            level_stats=level_stats, opt_state=opt_state,
            rng=jax.random.fold_in(state.rng, state.step), masks=masks, saliency=total,
            saliency_steps=count)
        levels = targets.shape[1]
        ratio = cost_lib.masked_cost(table, masks)["macs"] / full_macs      # [L]
        metrics = {**metrics, "accuracy": metrics[f"level{levels - 1}/accuracy"],
                   **{f"level{k}/macs_ratio": ratio[k] for k in range(1, levels)}}
        return new_state, metrics

    return step


# --------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------


def zoo_name(model) -> str:
    """The zoo name of the network being pruned (also when loaded from a checkpoint)."""
    return compact_lib.zoo_spec(model)[0]


def role(k: int, levels: int) -> str:
    """'teacher' (k = 0), 'student' (k = L−1), else 'ta<k>'."""
    return "teacher" if k == 0 else "student" if k == levels - 1 else f"ta{k}"


def train_cascade(ctx, model, variables) -> tuple[CascadeState, dict, Schedule]:
    """The ``cascade`` stage through loop.fit (resumable); evaluation = the student level."""
    config, cfg = ctx.config, ctx.config.cascade
    method, ce_weight = method_from_config(config.distill, model.taps())
    taps = tuple(dict.fromkeys(method.s_taps + method.t_taps))
    levels = cascade_lib.num_levels(cfg.num_tas)
    batch_size = cfg.optim.batch_size
    sharding.check_batch_size(batch_size, ctx.mesh)
    steps_per_epoch = data_pipeline.steps_per_epoch(len(ctx.splits.train), batch_size)
    planned = cfg.optim.epochs * steps_per_epoch
    schedule = make_schedule(model, ctx.input_shape, cfg, config.target_flops_ratio,
                             steps_per_epoch, planned)
    total_steps = min(planned, config.train.max_steps or planned)  # a debugging cap
    tx = optim.sgd(cfg.optim, steps_per_epoch)
    state = CascadeState.create(variables, models.mask_groups(model), levels, tx,
                                jax.random.PRNGKey(config.seed + 1))
    step = make_cascade_step(model, tx, schedule, method_pair_loss(method),
                             ce_weight=ce_weight, stop_gradient=cfg.teacher_stop_gradient,
                             input_shape=ctx.input_shape, normalize=cfg.normalize, taps=taps,
                             compute_dtype=config.train.compute_dtype, round_to=cfg.round_to)
    stage = loop.Stage(
        name="cascade", dir=ctx.workdir / "cascade", total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, global_batch_size=batch_size,
        eval_batch_size=config.train.eval_batch_size,
        log_every_steps=config.train.log_every_steps,
        eval_every_steps=config.train.eval_every_steps)
    train_iter = data_pipeline.make_train_iterator(
        ctx.splits.train, config.data, global_batch_size=batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    spec = ckpt_lib.model_spec(zoo_name(model), ctx.num_classes, ctx.input_shape)
    state, results = loop.fit(
        stage, mesh=ctx.mesh, state=state, train_step=step,
        eval_step=make_eval_step(LevelView(model, levels - 1), config.train.compute_dtype),
        train_iter=train_iter,
        eval_data=loop.EvalData(ctx.splits.validation, ctx.splits.test, config.data),
        spec=spec, config_dict=config.to_dict())
    return jax.device_get(state), results, schedule


def save_model(directory, spec: dict, variables: dict, config_dict: dict, step: int) -> None:
    """Write a model exported after ``step`` cascade steps as a kdjax checkpoint (loadable
    by ``load_variables`` and ``--config.teacher.checkpoint``); a re-run that finds this
    step already exported (same state, same export) leaves it as it is."""
    checkpointer = ckpt_lib.StageCheckpointer(directory, spec, config_dict)
    if checkpointer.latest_step() != step:
        state = TrainState(step=jnp.asarray(step, jnp.int32), params=variables["params"],
                           batch_stats=variables["batch_stats"], opt_state={},
                           rng=jax.random.PRNGKey(0))
        checkpointer.save(state, {}, {}, is_best=True)
    checkpointer.close()


def level_variables(state: CascadeState, k: int) -> tuple[dict, dict]:
    """(variables {'params', 'batch_stats'}, masks) of level k of a cascade state."""
    return ({"params": state.params, "batch_stats": cascade_lib.level(state.level_stats, k)},
            cascade_lib.level(state.masks, k))


def export_level(ctx, model, variables: dict, masks: dict, name: str, out_dir,
                 step: int) -> dict:
    """Compact one level, evaluate it, save it; returns its summary row."""
    small, small_vars = compact_lib.compact(model, variables, masks)
    cost = cost_lib.model_cost(small, ctx.input_shape)
    full = cost_lib.model_cost(model, ctx.input_shape)
    scores = common.evaluate_model(ctx, small, small_vars)
    widths = masks_lib.count_kept(masks)
    spec = ckpt_lib.model_spec(zoo_name(model), ctx.num_classes, ctx.input_shape, widths)
    save_model(out_dir / name, spec, small_vars, ctx.config.to_dict(), step)
    row = {"name": name, "macs": cost["macs"], "params": cost["params"],
           "macs_ratio": cost["macs"] / full["macs"],
           "test_top1": scores["test"]["top1"],
           "validation_top1": scores["validation"] and scores["validation"]["top1"],
           "widths": widths, "checkpoint": str(out_dir / name)}
    return row


def export_levels(ctx, model, state: CascadeState, schedule: Schedule) -> list[dict]:
    """Every level as its own compacted zoo model (``levels/level<k>_<role>``), plus the
    whole family uncompacted in ``levels/shared`` (the shared weights, with batch_stats =
    {'levels': per-level BN statistics, 'masks': {group: [L, C]}}, read by ``LevelView``)."""
    levels = schedule.targets.shape[1]
    full = cost_lib.model_cost(model, ctx.input_shape)["macs"]
    out_dir = ctx.workdir / "cascade" / "levels"
    save_model(out_dir / "shared",
               ckpt_lib.model_spec(zoo_name(model), ctx.num_classes, ctx.input_shape),
               {"params": state.params, "batch_stats": state.batch_stats},
               ctx.config.to_dict(), int(state.step))
    rows = []
    for k in range(levels):
        variables, masks = level_variables(state, k)
        row = export_level(ctx, model, variables, masks, f"level{k}_{role(k, levels)}",
                               out_dir, int(state.step))
        rows.append({"level": k, "role": role(k, levels),
                     "target_macs_ratio": float(schedule.targets[-1, k] / full), **row})
        log.info("[cascaded] level %d (%s): MACs ratio %.4f (target %.4f), params %d, "
                 "test top-1 %.2f", k, row["name"], row["macs_ratio"],
                 rows[-1]["target_macs_ratio"], row["params"], row["test_top1"])
    return rows


def finetune_objective(config, model):
    """The fine-tuning objective: ``config.distill``'s method (the cascade's pair loss)
    from the cascade's teacher level, with its γ."""
    return distill.objective(*method_from_config(config.distill, model.taps()))


def finetune_student(ctx, model, state: CascadeState, rows: list[dict]) -> dict:
    """KD fine-tuning of the compacted student from the cascade's (compacted) teacher level."""
    teacher_vars, teacher_masks = level_variables(state, 0)
    teacher = compact_lib.compact(model, teacher_vars, teacher_masks)
    variables, masks = level_variables(state, len(rows) - 1)
    small, small_vars = compact_lib.compact(model, variables, masks)
    _, results = common.run_stage(
        ctx, "cascade/finetune", zoo_name(model), ctx.config.cascade.finetune,
        finetune_objective(ctx.config, model), teacher=teacher,
        widths=masks_lib.count_kept(masks),
        model=small, initial_variables=small_vars)
    return results


def oneshot_masks(ctx, model, variables, kind: str) -> dict:
    """L1 (Σ|w| of producing filters) or Taylor (|∂CE/∂m| summed over
    ``cascade.taylor_batches`` training batches) scores of the trained teacher, pruned in
    one shot to the MACs target with ``saliency.prune_to``."""
    cfg, ones = ctx.config.cascade, masks_lib.ones_masks(model)
    if kind == "oneshot_l1":
        scores = saliency.l1_scores(model, variables["params"])
    else:
        @jax.jit
        def batch_scores(images, labels):
            loss = lambda m: losses.cross_entropy(  # noqa: E731
                model.apply(variables, images, masks=m, train=False)[0], labels)
            return saliency.taylor_scores(loss, ones)

        batches = data_pipeline.make_train_iterator(
            ctx.splits.train, ctx.config.data, global_batch_size=cfg.optim.batch_size,
            seed=ctx.config.seed + 7)
        scores = jax.tree.map(jnp.zeros_like, ones)
        for _ in range(cfg.taylor_batches):
            batch = next(batches)
            scores = jax.tree.map(jnp.add, scores, batch_scores(batch["image"], batch["label"]))
    macs = cost_lib.model_cost(model, ctx.input_shape)["macs"]
    return saliency.prune_to(scores, ones, macs_target=ctx.config.target_flops_ratio * macs,
                             model=model, input_shape=ctx.input_shape, normalize=cfg.normalize,
                             round_to=cfg.round_to)


def run_oneshot(ctx, model, variables, teacher_results: dict) -> tuple[list[dict], dict]:
    """Baseline: one-shot pruning of the teacher, then KD fine-tuning for the cascade's
    total budget (cascade.optim.epochs + cascade.finetune.epochs epochs)."""
    config, cfg = ctx.config, ctx.config.cascade
    method = cfg.method
    masks = oneshot_masks(ctx, model, variables, method)
    small, small_vars = compact_lib.compact(model, variables, masks)
    # compact() passes unpruned leaves through as the teacher's own arrays; the trainer
    # donates the student's buffers, so the student gets copies.
    small_vars = jax.tree.map(lambda x: jnp.array(x, copy=True), small_vars)
    budget = cfg.optim.copy_and_resolve_references()
    budget.epochs = cfg.optim.epochs + cfg.finetune.epochs
    _, results = common.run_stage(
        ctx, method, zoo_name(model), budget, finetune_objective(config, model),
        teacher=(model, variables), widths=masks_lib.count_kept(masks), model=small,
        initial_variables=small_vars)
    full = cost_lib.model_cost(model, ctx.input_shape)
    cost = cost_lib.model_cost(small, ctx.input_shape)
    rows = [{"level": 0, "role": "teacher", "name": "teacher", "macs": full["macs"],
             "params": full["params"], "macs_ratio": 1.0, "target_macs_ratio": 1.0,
             "test_top1": common.evaluate_model(ctx, model, variables)["test"]["top1"],
             "checkpoint": teacher_results.get("checkpoint", str(ctx.workdir / "teacher"))},
            {"level": 1, "role": "student", "name": method, "macs": cost["macs"],
             "params": cost["params"], "macs_ratio": cost["macs"] / full["macs"],
             "target_macs_ratio": float(config.target_flops_ratio),
             "test_top1": results["test_top1_last"], "widths": masks_lib.count_kept(masks),
             "checkpoint": str(ctx.workdir / method)}]
    return rows, results


def validate(config) -> None:
    """Fail on a bad ``cascade`` section before any work."""
    cfg = config.cascade
    if cfg.method not in METHODS:
        raise ValueError(f"unknown cascade.method {cfg.method!r}; valid: {', '.join(METHODS)}")
    levels = cascade_lib.num_levels(cfg.num_tas)
    if levels - 2 > MAX_TAS:
        raise ValueError(f"cascade.num_tas must be in 0..{MAX_TAS}, got {cfg.num_tas}")
    cascade_lib.event_ratios(cascade_lib.level_ratios(config.target_flops_ratio, levels,
                                                      cfg.spacing), cfg.num_events, cfg.spacing)
    if cfg.normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown cascade.normalize {cfg.normalize!r} (per-group saliency "
                         f"normalisation); valid: {', '.join(NORMALIZATIONS)}")
    saliency.check_round_to(cfg.round_to)
    method_from_config(config.distill, models.get_model(config.teacher.name, 10).taps())


def run(config, workdir) -> dict:
    """Teacher → cascade (or a one-shot baseline) → every level exported → optional
    student fine-tuning → summary.json / summary.md / accuracy_macs.png."""
    validate(config)
    ctx = common.setup(config, workdir)
    model, variables, teacher_results = common.obtain_teacher(ctx)
    cfg = config.cascade
    summary = {"model": zoo_name(model), "method": cfg.method,
               "num_tas": cfg.num_tas if cfg.method == "cascade" else 0,
               "target_flops_ratio": config.target_flops_ratio, "teacher": teacher_results}
    if cfg.method == "cascade":
        state, summary["cascade"], schedule = train_cascade(ctx, model, variables)
        summary["levels"] = export_levels(ctx, model, state, schedule)
        if cfg.finetune.epochs > 0:
            summary["finetune"] = finetune_student(ctx, model, state, summary["levels"])
    else:
        summary["levels"], summary["finetune_only"] = run_oneshot(ctx, model, variables,
                                                                  teacher_results)
    files.save_json(ctx.workdir / "summary.json", summary)
    markdown = reports.cascade_markdown(summary)
    files.write_text(ctx.workdir / "summary.md", markdown)
    reports.accuracy_macs_plot(ctx.workdir / "accuracy_macs.png", summary)
    print(markdown, flush=True)
    return summary
