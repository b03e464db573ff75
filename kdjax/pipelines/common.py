"""Pieces every pipeline composes: data + mesh set-up, a generic training stage,
and obtaining a teacher (from a checkpoint or trained first under workdir/teacher)."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import logging
import optax

from kdjax import distill as distill_lib
from kdjax import models
from kdjax.distill import Outputs
from kdjax.data import load_splits, pipeline as data_pipeline
from kdjax.train import checkpoint as ckpt_lib
from kdjax.train import loop, optim, sharding
from kdjax.train.state import TrainState, make_eval_step, make_train_step

log = logging.getLogger("kdjax")


@dataclasses.dataclass
class Context:
    """What all stages of one run share: config, mesh, data splits and their shape."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
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
    return Context(config, pathlib.Path(workdir), mesh, splits)


def init_variables(model, input_shape, seed: int) -> dict:
    """Initialise a model's variables on a dummy batch of one image ``[1, *input_shape]``."""
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    return model.init(jax.random.PRNGKey(seed), dummy)


supervised_objective = distill_lib.SUPERVISED  # plain cross-entropy: CE(z_s, y)


def output_shapes(model, variables, input_shape, batch_size: int):
    """``Outputs`` of ``model`` for a batch ``[batch_size, *input_shape]`` as
    ``jax.ShapeDtypeStruct`` leaves (nothing is computed)."""
    dummy = jax.ShapeDtypeStruct((batch_size, *input_shape), jnp.float32)
    return jax.eval_shape(lambda v, x: Outputs(*model.apply(v, x, train=False)),
                          variables, dummy)


def train_flops_per_image(ctx: Context, model_name: str, widths, teacher_model) -> int:
    """Model FLOPs of one training image for MFU: 3 × the student's forward + the
    teacher's forward (analytic MACs of kdjax.pruning.cost, 2 FLOPs each)."""
    from kdjax.pruning.cost import model_cost
    from kdjax.train import throughput

    student = models.get_model(model_name, ctx.num_classes, widths)
    # An ensemble teacher (kdjax.distill.ensemble) costs the sum of its members.
    teachers = () if teacher_model is None else getattr(teacher_model, "members",
                                                        (teacher_model,))
    teacher_macs = sum(model_cost(t, ctx.input_shape)["macs"] for t in teachers)
    return throughput.train_flops_per_image(model_cost(student, ctx.input_shape)["macs"],
                                            teacher_macs)


def init_distill(ctx: Context, method, model, variables, teacher, batch_size: int):
    """A method's initial (params, state) for this student/teacher pair and dataset
    (CRD's memory banks get one row per training example)."""
    teacher_model, teacher_variables = teacher
    student = output_shapes(model, variables, ctx.input_shape, batch_size)
    teacher_out = output_shapes(teacher_model, teacher_variables, ctx.input_shape, batch_size)
    rng = jax.random.PRNGKey(ctx.config.seed + 2)
    return method.init(rng, student, teacher_out, len(ctx.splits.train))


def run_stage(ctx: Context, name: str, model_name: str, optim_cfg, objective, **kwargs
              ) -> tuple[dict, dict]:
    """`train_stage`, returning (final model variables, results dict)."""
    state, results = train_stage(ctx, name, model_name, optim_cfg, objective, **kwargs)
    return state.variables, results


def train_stage(ctx: Context, name: str, model_name: str, optim_cfg, objective, *,
                teacher=None, widths=None, on_log=None, model=None,
                initial_variables=None, distill_variables=None,
                config_dict=None) -> tuple[Any, dict]:
    """Train zoo model ``model_name`` (with optional group ``widths``) as stage ``name``
    under ``workdir/name``, from scratch or from ``initial_variables`` (fine-tuning).

    objective: a ``kdjax.distill.Objective`` (or ``InitStageObjective``); its method's
      params/state are initialised here (``method.init``), then passed through
      ``distill_variables(params, state) -> (params, state)`` when given (init stages);
      its ``transform`` (e.g. DynamicKD's controller) is chained after SGD.
    teacher: optional (model, variables) whose eval-mode outputs feed ``objective``.
    model: optional module to train instead of the zoo model (e.g. a zoo model wrapped
      with learned masks); ``model_name`` then only labels its checkpoints.
    config_dict: the settings recorded with the stage and compared on resume (default:
      the whole config).
    Returns (final TrainState, results dict).
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
    # A copy: the stage donates its state, and the caller's arrays may share buffers with
    # arrays still in use (e.g. the unpruned teacher's, for leaves compaction kept as is).
    variables = (jax.tree.map(jnp.array, initial_variables) if initial_variables
                 else init_variables(model, ctx.input_shape, config.seed))
    method = getattr(objective, "method", None)
    distill_params, distill_state = {}, {}
    if method is not None:
        method = method.for_stage(steps_per_epoch)
        objective = dataclasses.replace(objective, method=method)
        extra = method.transform(ctx.num_classes, steps_per_epoch)
        if extra is not None:
            tx = optax.chain(tx, extra)
        distill_params, distill_state = init_distill(ctx, method, model, variables, teacher,
                                                     batch_size)
        if distill_variables is not None:
            distill_params, distill_state = distill_variables(distill_params, distill_state)
    state = TrainState.create(variables, tx, jax.random.PRNGKey(config.seed + 1),
                              distill_params, distill_state)
    train_iter = data_pipeline.make_train_iterator(
        ctx.splits.train, config.data, global_batch_size=batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    teacher_model, teacher_variables = teacher if teacher is not None else (None, None)
    dtype = config.train.compute_dtype
    stage = loop.Stage(
        name=name, dir=ctx.workdir / name, total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, global_batch_size=batch_size,
        eval_batch_size=config.train.eval_batch_size,
        log_every_steps=config.train.log_every_steps,
        eval_every_steps=config.train.eval_every_steps,
        flops_per_image=train_flops_per_image(ctx, model_name, widths, teacher_model),
        compute_dtype=dtype)
    train_step = make_train_step(model, tx, objective, teacher=teacher_model, compute_dtype=dtype)
    state, results = loop.fit(
        stage, mesh=ctx.mesh, state=state, train_step=train_step,
        eval_step=make_eval_step(model, dtype), train_iter=train_iter,
        eval_data=loop.EvalData(ctx.splits.validation, ctx.splits.test, config.data),
        spec=spec, config_dict=config_dict or config.to_dict(),
        teacher_variables=teacher_variables,
        on_log=on_log)
    results["model"] = model_name
    ckpt_lib.save_json(stage.dir / "results.json", results)
    return state, results


def teacher_and_method(ctx: Context, student_model):
    """The teacher (`obtain_teacher`) and ``config.distill``'s method for this pair.

    The method and its taps are checked against the configured ``teacher.name`` before
    any teacher is trained, and again against the teacher actually obtained.
    Returns ((teacher model, variables), teacher results, method).
    """
    configured = models.get_model(ctx.config.teacher.name, ctx.num_classes)
    distill_lib.make_method(ctx.config.distill, student_taps=student_model.taps(),
                            teacher_taps=configured.taps())
    teacher_model, teacher_vars, teacher_results = obtain_teacher(ctx)
    check_pair(teacher_model, student_model, ctx)
    method = make_method(ctx, student_model, teacher_model)
    return (teacher_model, teacher_vars), teacher_results, method


def make_method(ctx: Context, student_model, teacher_model):
    """``config.distill``'s method, its taps checked against the student and the teacher;
    logs the effective weights."""
    cfg = ctx.config.distill
    method = distill_lib.make_method(cfg, student_taps=student_model.taps(),
                                     teacher_taps=teacher_model.taps())
    gamma = distill_lib.ce_weight(cfg, method)
    log.info("distill: %s (weight β = %g%s, CE weight γ = %g%s, student taps %s, teacher "
             "taps %s)", method.name, method.weight,
             " = the method's default" if cfg.weight < 0 else "", gamma,
             " = the method's default" if cfg.ce_weight < 0 else "",
             list(method.s_taps), list(method.t_taps))
    return method


def distill_stage(ctx: Context, name: str, model_name: str, optim_cfg, method, teacher, *,
                  regularizer=None, **kwargs) -> tuple[dict, dict]:
    """Stage ``name``: γ·CE + the method's term from the teacher, preceded, for a method
    with an initialisation stage (and ``distill.init_epochs`` > 0), by the resumable
    stage ``<name>_init`` (same optimiser at a constant lr, init_epochs epochs, the
    method's init loss alone) whose result initialises it: its adapters, and the
    student's feature layers when the method trains them (the classifier ``fc`` keeps
    its initial value, as in RepDistiller). kwargs: as `train_stage`.
    Returns (final model variables, results); results of the init stage, if any, under
    results["init_stage"].
    """
    cfg = ctx.config.distill
    init_results = None
    if method.init_stage and cfg.init_epochs > 0:
        init_optim = optim_cfg.copy_and_resolve_references()
        init_optim.epochs, init_optim.schedule = cfg.init_epochs, "constant"
        init_optim.warmup_epochs = 0.0
        state, init_results = train_stage(
            ctx, f"{name}_init", model_name, init_optim,
            distill_lib.InitStageObjective(method), teacher=teacher,
            distill_variables=method.init_stage_variables, **kwargs)
        if method.init_stage_trains_student:
            model = kwargs.get("model") or models.get_model(model_name, ctx.num_classes,
                                                            kwargs.get("widths"))
            fresh = kwargs.get("initial_variables") or init_variables(
                model, ctx.input_shape, ctx.config.seed)
            kwargs["initial_variables"] = keep_head(state.variables, fresh)
        kwargs["distill_variables"] = functools.partial(
            method.after_init_stage, trained_params=state.distill_params,
            trained_state=state.distill_state)
    objective = distill_lib.Objective(method, distill_lib.ce_weight(cfg, method),
                                      regularizer)
    state, results = train_stage(ctx, name, model_name, optim_cfg, objective,
                                 teacher=teacher, **kwargs)
    if init_results is not None:
        results["init_stage"] = init_results
    return state.variables, results


def evaluate_model(ctx: Context, model, variables) -> dict:
    """{'validation', 'test'}: top-1 / top-5 / loss of a model on each held-out split (the
    trainer's sharded evaluation, compiled once); 'validation' is None without one."""
    step = loop.compile_eval_step(make_eval_step(model, ctx.config.train.compute_dtype),
                                  ctx.mesh)
    return {split: None if source is None else loop.evaluate(
                step, variables, source, ctx.config.data, ctx.config.train.eval_batch_size,
                ctx.mesh)
            for split, source in (("validation", ctx.splits.validation),
                                  ("test", ctx.splits.test))}


# teacher.select -> the checkpoint directory of a stage that holds the teacher.
TEACHER_SELECT = {"last": ckpt_lib.LAST_DIR, "best": ckpt_lib.BEST_DIR}


def load_teacher(path, select: str) -> tuple[dict, dict, dict]:
    """``(model spec, variables, info)`` of the ``select`` checkpoint ("last" | "best") of
    a kdjax checkpoint ``path`` — the one rule every teacher path goes through.

    A training stage (it has ``checkpoints/``) must hold the selected checkpoint (no
    fallback to the other one); a directory with a single imported checkpoint (e.g.
    ``best/0`` written by kdjax.convert_torch), a manager or a step directory is read as
    is. info = {'checkpoint', 'select', 'read' (the directory read), 'step', 'data_seed',
    'data'}: the seed and data settings the teacher was trained with come from the
    checkpoint's recorded config (None when it records none).
    """
    if select not in TEACHER_SELECT:
        raise ValueError(f"teacher.select={select!r}; valid: {', '.join(TEACHER_SELECT)}")
    path = pathlib.Path(path)
    wanted = TEACHER_SELECT[select]
    if (path / ckpt_lib.LAST_DIR).is_dir() and not (path / wanted).is_dir():
        raise ckpt_lib.CheckpointError(
            f"teacher.select={select!r} but the stage {path} has no {wanted}/ checkpoint; "
            f"use --config.teacher.select with one of the checkpoints it has")
    directory, step = ckpt_lib.find_checkpoint(path, prefer=wanted)
    meta, _ = ckpt_lib.load_meta(path, prefer=wanted)
    spec, variables = ckpt_lib.load_variables(path, prefer=wanted)
    recorded = meta.get("config", {})
    data = recorded.get("data", {})
    info = {"checkpoint": str(path), "select": select, "read": str(directory), "step": step,
            "data_seed": recorded.get("seed"),
            "data": {k: data.get(k) for k in ("name", "source", "validation_size",
                                              "train_size")}}
    return spec, variables, info


def keep_head(trained: dict, fresh: dict) -> dict:
    """``trained`` variables with every classifier (``fc``) leaf taken from ``fresh``."""
    def pick(path, t, f):
        return f if any(getattr(k, "key", None) == "fc" for k in path) else t
    return jax.tree_util.tree_map_with_path(pick, trained, fresh)


def obtain_teacher(ctx: Context, teacher_cfg=None, stage: str = "teacher"
                   ) -> tuple[Any, dict, dict]:
    """The teacher as (model, variables, results).

    From ``teacher_cfg.checkpoint`` when set (its model spec must match the data: same
    classes and input shape), else trained with ``teacher_cfg.optim`` under
    ``workdir/<stage>`` — resumed, or reused as is when that stage has already finished.
    Either way the variables are read back from the stage's ``teacher_cfg.select``
    checkpoint (load_teacher), so one teacher directory gives one teacher to every run.
    teacher_cfg: a teacher section (name, checkpoint, optim, select); default
    ``config.teacher``. A trained teacher's stage is checked on resume against the
    settings that shape it only (seed, data, train, its own section), so changing the
    distillation settings of a later stage reuses it.
    """
    config = ctx.config
    teacher_cfg = config.teacher if teacher_cfg is None else teacher_cfg
    results = {}
    path = teacher_cfg.checkpoint
    if not path:
        shaping = {"seed": config.seed, "data": config.data.to_dict(),
                   "train": config.train.to_dict(), "teacher": teacher_cfg.to_dict()}
        _, results = run_stage(ctx, stage, teacher_cfg.name, teacher_cfg.optim,
                               supervised_objective, config_dict=shaping)
        path = ctx.workdir / stage
    spec, variables, info = load_teacher(path, teacher_cfg.get("select", "last"))
    expected = {"num_classes": ctx.num_classes, "input_shape": list(ctx.input_shape)}
    ckpt_lib.check_compatible(spec, expected, str(path))
    model = models.get_model(spec["name"], spec["num_classes"], spec["widths"] or None)
    log.info("teacher %s (teacher.select=%s): %s, step %d", spec["name"], info["select"],
             info["read"], info["step"])
    return model, variables, {**results, "model": spec["name"], **info}


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
