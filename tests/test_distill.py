"""The distillation interface: every method trains through the CLI, the teacher runs in
eval mode, method params/state are checkpointed and resume bit-identically but never
exported, bad method/tap names fail at start-up, CRD's banks, dataset indices in batches,
and composition with PDD stage 1 and EMO-PMS fine-tuning."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kdjax import config_lib, distill, models
from kdjax.data import pipeline as data_pipeline
from kdjax.data.sources import ArraySource
from kdjax.distill import Outputs
from kdjax.distill.methods import CRD
from kdjax.pipelines import common, emo_pms, pdd
from kdjax.train import checkpoint as ckpt_lib
from kdjax.train import optim
from kdjax.train.state import TrainState, make_train_step

from test_train import load_config

SHAPE = (16, 16, 3)
# synthetic data at 16×16, resnet8 → resnet8, 2 steps of batch 64, 64 validation images
CLI_SYNTHETIC = [
    "--config=configs/kd.py:demo", "--config.data.source=synthetic",
    "--config.data.name=synthetic", "--config.data.mean=(0.5,0.5,0.5)",
    "--config.data.std=(0.5,0.5,0.5)", "--config.data.validation_size=64",
    "--config.data.synthetic_shape=(16,16,3)", "--config.train.eval_batch_size=64",
    "--config.train.log_every_steps=1", "--config.teacher.name=resnet8",
    "--config.student.name=resnet8", "--config.optim.batch_size=64",
    "--config.teacher.optim.batch_size=64", "--config.kd.baseline=False",
    "--config.distill.init_epochs=1", "--config.distill.crd.num_negatives=64",
]
# RepDistiller scripts/run_cifar_distill.sh (-b β; -r γ = 1 unless given) and mdistiller's
# DKD: written out here independently of the method classes.
PUBLISHED = {"kd": (0.9, 0.1), "dkd": (1.0, 1.0), "fitnet": (100, 1), "at": (1000, 1),
             "sp": (3000, 1), "cc": (0.02, 1), "vid": (1, 1), "rkd": (1, 1),
             "pkt": (30000, 1), "ab": (1, 1), "ft": (200, 1), "fsp": (50, 1),
             "nst": (50, 1), "crd": (0.8, 1)}


def run_main(*args) -> int:
    """``python -m kdjax.main ARGS`` in this process (its exit code). ml_collections
    defines the ``--config.*`` override flags from ``sys.argv`` when ``--config`` is
    parsed, so argv is set for the parse and the previous run's overrides are dropped."""
    from absl import flags

    from kdjax import main as cli

    argv = ["kdjax", *args]
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)
    saved, sys.argv = sys.argv, argv
    try:
        flags.FLAGS(argv)
    finally:
        sys.argv = saved
    return cli.main(["kdjax"])


def raw_state(stage_dir, which):
    """The whole saved state tree of a stage's last (``checkpoints``) or best checkpoint."""
    directory, step = ckpt_lib.find_checkpoint(stage_dir, prefer=which)
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(directory, options=options) as manager:
        return manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore())).state


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A 2-step resnet8 teacher and KD student (method ``kd``) trained through the CLI."""
    workdir = tmp_path_factory.mktemp("teacher")
    assert run_main(*CLI_SYNTHETIC, f"--workdir={workdir}", "--config.train.max_steps=2") == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["kd"]["steps"] == 2
    return workdir / "teacher"


def run_method(method, workdir, teacher_dir, steps=2, *extra) -> int:
    return run_main(*CLI_SYNTHETIC, f"--workdir={workdir}", f"--config.train.max_steps={steps}",
                    f"--config.teacher.checkpoint={teacher_dir}",
                    f"--config.distill.method={method}", *extra)


# kd runs in the ``teacher_dir`` fixture, crd in the resume test; fitnet has an init stage.
FAST = ("fitnet",)


@pytest.mark.parametrize("method", [
    m if m in FAST else pytest.param(m, marks=pytest.mark.slow)
    for m in sorted(PUBLISHED) if m != "kd"])
def test_every_method_trains_through_the_cli(method, teacher_dir, tmp_path):
    assert run_method(method, tmp_path, teacher_dir) == 0
    results = json.loads((tmp_path / "summary.json").read_text())
    assert results[method]["steps"] == 2
    logged = [json.loads(line) for line in open(tmp_path / method / "metrics.jsonl")]
    train = [r for r in logged if r["split"] == "train"]
    assert all(np.isfinite(r["loss"]) for r in train)
    cls = distill.METHODS[method]
    if cls.init_stage:  # the init stage ran first, as its own stage, with its own loss
        assert json.loads((tmp_path / f"{method}_init" / "results.json").read_text())["steps"] == 2
    elif method not in ("ab", "fsp"):
        assert any(k.startswith(f"distill/{method}") for k in train[0])


def test_resume_is_bit_identical_and_method_state_is_never_exported(teacher_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_method("crd", straight, teacher_dir, 4) == 0
    assert run_method("crd", resumed, teacher_dir, 2) == 0
    assert run_method("crd", resumed, teacher_dir, 4) == 0
    a, b = raw_state(straight / "crd", "checkpoints"), raw_state(resumed / "crd", "checkpoints")
    assert set(a["distill_params"]) == {"student", "teacher"}
    assert set(a["distill_state"]) >= {"student_bank", "teacher_bank", "z_student"}
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert set(raw_state(straight / "crd", "best")) == {"params", "batch_stats"}


def test_unknown_method_or_tap_fails_at_start_up_with_the_valid_list(tmp_path):
    assert run_method("hinton", tmp_path / "a", "") == 2
    assert not (tmp_path / "a" / "teacher").exists()
    with pytest.raises(ValueError, match="'hinton'.*at, cc, crd, dkd"):
        distill.make_method(config_lib.distill("hinton"), student_taps=(), teacher_taps=())
    taps = models.get_model("resnet8", 10).taps()
    assert run_method("at", tmp_path / "b", "", 2, "--config.distill.student_taps=('stage9',)") == 2
    assert not (tmp_path / "b" / "teacher").exists()
    with pytest.raises(ValueError, match="'stage9'.*'stem', 'stage1'"):
        distill.make_method(config_lib.distill("at", student_taps=("stage9",)),
                            student_taps=taps, teacher_taps=taps)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_weights_follow_the_method_unless_given(name):
    taps = models.get_model("resnet8", 10).taps()
    cfg = config_lib.distill("kd")
    cfg.method = name  # as --config.distill.method=<name> does
    method = distill.make_method(cfg, student_taps=taps, teacher_taps=taps)
    assert (method.weight, distill.ce_weight(cfg, method)) == PUBLISHED[name]
    cfg.weight, cfg.ce_weight = 2.5, 0.5
    method = distill.make_method(cfg, student_taps=taps, teacher_taps=taps)
    assert (method.weight, distill.ce_weight(cfg, method)) == (2.5, 0.5)


def test_teacher_runs_in_eval_mode_and_stays_untouched():
    model = models.get_model("resnet8", 10)
    student_vars = common.init_variables(model, SHAPE, 0)
    teacher_vars = common.init_variables(model, SHAPE, 1)
    # a teacher whose running statistics differ from any batch's statistics
    teacher_vars = {**teacher_vars, "batch_stats": jax.tree.map(
        lambda x: x + 0.5, teacher_vars["batch_stats"])}
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, *SHAPE)).astype(np.float32),
             "label": rng.integers(0, 10, 8).astype(np.int32),
             "index": np.arange(8, dtype=np.int32)}

    def probe(student, teacher, batch, aux):  # CE, plus the teacher's logits as metrics
        loss, metrics, state, extra = distill.SUPERVISED(student, teacher, batch, aux)
        return loss, {**metrics, "teacher_logits_sum": jnp.sum(teacher.logits)}, state, extra

    tx = optim.sgd(config_lib.optim(lr=0.1), steps_per_epoch=10)
    step = jax.jit(make_train_step(model, tx, probe, teacher=model))
    state = TrainState.create(student_vars, tx, jax.random.PRNGKey(0))
    kept = jax.tree.map(np.array, teacher_vars)
    new_state, metrics = step(state, batch, teacher_vars)
    eval_logits, _ = model.apply(teacher_vars, batch["image"], train=False)
    (train_logits, _), _ = model.apply(teacher_vars, batch["image"], train=True,
                                       mutable=["batch_stats"])
    np.testing.assert_allclose(metrics["teacher_logits_sum"], jnp.sum(eval_logits), rtol=1e-5)
    assert abs(float(jnp.sum(train_logits) - jnp.sum(eval_logits))) > 1e-2  # can fail
    for x, y in zip(jax.tree.leaves(kept), jax.tree.leaves(teacher_vars), strict=True):
        np.testing.assert_array_equal(x, y)  # the teacher is untouched
    assert int(new_state.step) == 1


def test_crd_bank_rows_change_only_at_the_batch_indices():
    method = CRD(num_negatives=16)
    b, c, n = 6, 12, 40
    shapes = Outputs(jax.ShapeDtypeStruct((b, 10), jnp.float32),
                     {"embedding": jax.ShapeDtypeStruct((b, c), jnp.float32)})
    params, state = method.init(jax.random.PRNGKey(0), shapes, shapes, n)
    assert state["student_bank"].shape == (n, 128)
    rng = np.random.default_rng(0)
    out = lambda: Outputs(jnp.zeros((b, 10)),  # noqa: E731
                          {"embedding": jnp.asarray(rng.normal(size=(b, c)), jnp.float32)})
    index = np.array([3, 17, 0, 39, 8, 21], np.int32)
    batch = {"label": np.zeros(b, np.int32), "index": index}
    loss, _, new = method.loss(params, state, out(), out(), batch)
    assert np.isfinite(loss) and float(new["z_student"]) > 0 and float(new["z_teacher"]) > 0
    others = np.setdiff1d(np.arange(n), index)
    for bank in ("student_bank", "teacher_bank"):
        old, now = np.asarray(state[bank]), np.asarray(new[bank])
        assert np.all(np.any(old[index] != now[index], axis=1))
        np.testing.assert_array_equal(old[others], now[others])
        np.testing.assert_allclose(np.linalg.norm(now[index], axis=1), 1.0, rtol=1e-5)
    # the normalisers are estimated once, then frozen
    _, _, newer = method.loss(params, new, out(), out(), batch)
    assert float(newer["z_student"]) == float(new["z_student"])


def test_training_batches_carry_their_dataset_indices():
    n = 40
    images = np.zeros((n, 2, 2, 1), np.uint8)
    source = ArraySource(images, np.arange(n, dtype=np.int32))  # label = index
    data = config_lib.synthetic(load_config("kd")).data
    data.mean, data.std = (0.5,), (0.5,)
    iterator = data_pipeline.make_train_iterator(source, data, global_batch_size=8, seed=3)
    seen = []
    for _ in range(5):  # one epoch
        batch = next(iterator)
        assert batch["index"].dtype == np.int32
        np.testing.assert_array_equal(batch["index"], batch["label"])
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(n))


@pytest.mark.slow
def test_pdd_stage1_distills_with_dkd(teacher_dir, tmp_path):
    config = config_lib.synthetic(load_config("pdd"), steps=2)
    config.data.synthetic_shape = SHAPE
    config.teacher.name, config.student.name = "resnet8", "resnet8"
    config.teacher.checkpoint = str(teacher_dir)
    small = config_lib.optim(epochs=1, batch_size=64, lr=0.05)
    config.pdd.stage1 = config.pdd.stage2 = config.pdd.kd_optim = small
    config.pdd.kd_baseline = False
    config.distill.method, config.distill.weight, config.distill.ce_weight = "dkd", -1.0, -1.0
    summary = pdd.run(config, tmp_path)
    logged = [json.loads(line) for line in open(tmp_path / "masks" / "metrics.jsonl")]
    assert any("distill/dkd" in r for r in logged if r["split"] == "train")
    assert summary["stages"]["finetune"]["steps"] == 2


@pytest.mark.slow
def test_emo_pms_finetunes_with_at(teacher_dir, tmp_path):
    config = config_lib.synthetic(load_config("emo_pms"), steps=2)
    config.data.synthetic_shape = SHAPE
    config.teacher.name, config.teacher.checkpoint = "resnet8", str(teacher_dir)
    config.emo.update(dict(method="uniform", finetune_kd=True,
                           finetune=config_lib.optim(epochs=1, batch_size=64, lr=0.01)))
    config.distill.method = "at"
    results = emo_pms.run(config, tmp_path)
    assert results["finetune"]["steps"] == 2
    logged = [json.loads(line) for line in open(tmp_path / "uniform" / "finetune" /
                                                 "metrics.jsonl")]
    assert any("distill/at" in r for r in logged if r["split"] == "train")
