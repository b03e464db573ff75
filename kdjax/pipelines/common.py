"""Pieces every pipeline composes: data + mesh set-up, a generic training stage,
and obtaining a teacher (from a checkpoint or trained first under workdir/teacher)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
import logging

from kdjax import losses, models
from kdjax.data import load_splits, pipeline as data_pipeline
from kdjax.train import checkpoint as ckpt_lib
from kdjax.train import files, loop, optim, sharding
from kdjax.train.state import TrainState, make_eval_step, make_train_step

log = logging.getLogger("kdjax")


@dataclasses.dataclass
class Context:
    """What all stages of one run share: config, mesh, data splits and their shape."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    mesh: Any
    splits: Any

    @property
    def num_classes(self) -> int:
        return self.splits.info.num_classes

    @property
    def input_shape(self) -> tuple:
        return tuple(self.splits.info.image_shape)


def setup(config: ml_collections.ConfigDict, workdir) -> Context:
    """Join a multi-host run if asked, build the mesh, load the data splits (fails early
    with a clear message if the dataset is missing)."""
    sharding.initialize_distributed(config.train)
    mesh = sharding.make_mesh(config.train.num_devices)
    splits = load_splits(config.data, seed=config.seed)
    log.info("data %s: train %d, validation %d, test %d, %d classes, input %s; mesh %s",
                 splits.info.name, len(splits.train),
                 0 if splits.validation is None else len(splits.validation),
                 len(splits.test), splits.info.num_classes, splits.info.image_shape,
                 dict(mesh.shape))
    return Context(config, files.as_path(workdir), mesh, splits)


def init_variables(model, input_shape, seed: int) -> dict:
    """Initialise a model's variables on a dummy batch of one image ``[1, *input_shape]``."""
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    return model.init(jax.random.PRNGKey(seed), dummy)


def supervised_objective(logits, features, batch, teacher_logits, opt_state):
    """Plain cross-entropy: CE(z_s, y)."""
    ce = losses.cross_entropy(logits, batch["label"])
    return ce, {"loss": ce, "ce": ce}, {}


def kd_objective(temperature: float, ce_weight: float, kd_weight: float):
    """Hinton KD objective: γ·CE(z_s, y) + α·T²·KL(p_t ‖ p_s)."""

    def objective(logits, features, batch, teacher_logits, opt_state):
        ce = losses.cross_entropy(logits, batch["label"])
        kd = losses.kd_loss(logits, teacher_logits, temperature)
        loss = ce_weight * ce + kd_weight * kd
        return loss, {"loss": loss, "ce": ce, "kd": kd}, {}

    return objective


def run_stage(ctx: Context, name: str, model_name: str, optim_cfg, objective, *,
              teacher=None, widths=None, tx_extra=None, on_log=None, model=None,
              initial_variables=None) -> tuple[dict, dict]:
    """Train zoo model ``model_name`` (with optional group ``widths``) as stage ``name``
    under ``workdir/name``, from scratch or from ``initial_variables`` (fine-tuning).

    teacher: optional (model, variables) whose eval-mode logits feed ``objective``.
    tx_extra: optional optax transformation chained after SGD (e.g. a controller).
    model: optional module to train instead of the zoo model (e.g. a zoo model wrapped
      with learned masks); ``model_name`` then only labels its checkpoints.
    Returns (final variables, results dict).
    """
    config = ctx.config
    if model is None:
        model = models.get_model(model_name, ctx.num_classes, widths)
    loop.check_feature_maps(model, ctx.input_shape)
    spec = ckpt_lib.model_spec(model_name, ctx.num_classes, ctx.input_shape, widths)
    batch_size = optim_cfg.batch_size
    sharding.check_batch_size(batch_size, ctx.mesh)
    steps_per_epoch = data_pipeline.steps_per_epoch(len(ctx.splits.train), batch_size)
    total_steps = optim_cfg.epochs * steps_per_epoch
    if config.train.max_steps:
        total_steps = min(total_steps, config.train.max_steps)
    tx = optim.sgd(optim_cfg, steps_per_epoch)
    if tx_extra is not None:
        import optax

        tx = optax.chain(tx, tx_extra)
    variables = initial_variables or init_variables(model, ctx.input_shape, config.seed)
    state = TrainState.create(variables, tx, jax.random.PRNGKey(config.seed + 1))
    train_iter = data_pipeline.make_train_iterator(
        ctx.splits.train, config.data, global_batch_size=batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    stage = loop.Stage(
        name=name, dir=ctx.workdir / name, total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, global_batch_size=batch_size,
        eval_batch_size=config.train.eval_batch_size,
        log_every_steps=config.train.log_every_steps,
        eval_every_steps=config.train.eval_every_steps)
    teacher_model, teacher_variables = teacher if teacher is not None else (None, None)
    train_step = make_train_step(model, tx, objective, teacher=teacher_model)
    state, results = loop.fit(
        stage, mesh=ctx.mesh, state=state, train_step=train_step,
        eval_step=make_eval_step(model), train_iter=train_iter,
        eval_data=loop.EvalData(ctx.splits.validation, ctx.splits.test, config.data),
        spec=spec, config_dict=config.to_dict(), teacher_variables=teacher_variables,
        on_log=on_log)
    results["model"] = model_name
    files.save_json(stage.dir / "results.json", results)
    return state.variables, results


def obtain_teacher(ctx: Context) -> tuple[Any, dict, dict]:
    """The teacher as (model, variables, results).

    From ``config.teacher.checkpoint`` when set (its model spec must match the data:
    same classes and input shape), else trained with ``config.teacher.optim`` under
    ``workdir/teacher`` — reused as is when that stage has already finished.
    """
    teacher_cfg = ctx.config.teacher
    if teacher_cfg.checkpoint:
        spec, variables = ckpt_lib.load_variables(teacher_cfg.checkpoint)
        expected = {"num_classes": ctx.num_classes, "input_shape": list(ctx.input_shape)}
        ckpt_lib.check_compatible(spec, expected, teacher_cfg.checkpoint)
        model = models.get_model(spec["name"], spec["num_classes"], spec["widths"] or None)
        log.info("teacher %s loaded from %s", spec["name"], teacher_cfg.checkpoint)
        return model, variables, {"model": spec["name"], "checkpoint": teacher_cfg.checkpoint}
    variables, results = run_stage(ctx, "teacher", teacher_cfg.name, teacher_cfg.optim,
                                   supervised_objective)
    return models.get_model(teacher_cfg.name, ctx.num_classes), variables, results


def check_pair(teacher_model, student_model, ctx: Context) -> None:
    """Fail early unless teacher and student agree on classes for this dataset's input."""
    dummy = jax.ShapeDtypeStruct((1, *ctx.input_shape), jnp.float32)
    shapes = []
    for model in (teacher_model, student_model):
        out = jax.eval_shape(lambda x, m=model: m.init_with_output(jax.random.PRNGKey(0), x)[0][0],
                             dummy)
        shapes.append(out.shape)
    if shapes[0] != shapes[1]:
        raise ValueError(
            f"teacher logits {shapes[0]} and student logits {shapes[1]} differ for input "
            f"{ctx.input_shape}: teacher and student must predict the same classes.")
