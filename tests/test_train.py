"""Trainer: sharding equivalence, resume equivalence, NaN stop, checkpoint safety,
and few-step end-to-end runs of the supervised and kd pipelines on synthetic data."""

import json
import pathlib

import jax
import numpy as np
import pytest

from kdjax import config_lib, models
from kdjax.pipelines import common, kd, supervised
from kdjax.train import checkpoint as ckpt_lib
from kdjax.train import loop, optim, sharding
from kdjax.train.checkpoint import CheckpointError
from kdjax.train.state import TrainState, make_train_step

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name, preset="demo"):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset)
    config.unlock()
    return config


def tiny_supervised(steps=4, model="resnet8", epochs=3):
    config = config_lib.synthetic(load_config("supervised"), steps=steps)
    config.model.name = model
    config.optim = config_lib.optim(epochs=epochs, batch_size=64, lr=0.05, milestones=(2,))
    return config


def run_steps(mesh, n_steps):
    """n SGD steps of resnet8 on a fixed random batch; returns (losses, params)."""
    model = models.get_model("resnet8", 10)
    tx = optim.sgd(config_lib.optim(lr=0.1), steps_per_epoch=10)
    variables = common.init_variables(model, (16, 16, 3), 0)
    state = sharding.replicate(TrainState.create(variables, tx, jax.random.PRNGKey(0)), mesh)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(32, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 10, size=32).astype(np.int32)}
    step = loop.compile_train_step(make_train_step(model, tx, common.supervised_objective), mesh)
    losses = []
    for _ in range(n_steps):
        state, metrics = step(state, sharding.to_global(batch, mesh), None)
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state.params)


def test_one_and_eight_devices_agree():
    assert jax.device_count() == 8, "conftest should simulate 8 CPU devices"
    losses1, params1 = run_steps(sharding.make_mesh(1), 3)
    losses8, params8 = run_steps(sharding.make_mesh(8), 3)
    np.testing.assert_allclose(losses1, losses8, rtol=1e-5)
    assert losses1[-1] < losses1[0]  # the steps actually train
    for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params8)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_too_many_devices_and_bad_batch_are_clear():
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
        sharding.make_mesh(64)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.check_batch_size(60, sharding.make_mesh(8))


def final_params(workdir, stage="model"):
    _, variables = ckpt_lib.load_variables(pathlib.Path(workdir) / stage, prefer=ckpt_lib.LAST_DIR)
    return variables


def test_resume_is_bit_identical(tmp_path):
    total = 10  # 448 training examples / 64 = 7 steps per epoch: crosses an epoch
    straight = tiny_supervised(steps=total)
    supervised.run(straight, tmp_path / "a")
    interrupted = tiny_supervised(steps=3)  # stops mid-epoch with a checkpoint
    supervised.run(interrupted, tmp_path / "b")
    resumed = tiny_supervised(steps=total)
    supervised.run(resumed, tmp_path / "b")
    a, b = final_params(tmp_path / "a"), final_params(tmp_path / "b")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "b" / "model" / "metrics.jsonl"))
             if r["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == total  # resumed at 4, not from 1


def test_incompatible_checkpoint_fails_clearly(tmp_path):
    supervised.run(tiny_supervised(steps=1), tmp_path)
    other = tiny_supervised(steps=2, model="resnet14")
    with pytest.raises(CheckpointError, match="resnet14"):
        supervised.run(other, tmp_path)


def test_unfinished_save_is_ignored(tmp_path):
    supervised.run(tiny_supervised(steps=2), tmp_path)
    ckpt_dir = tmp_path / "model" / ckpt_lib.LAST_DIR
    good = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    # What a save killed mid-write leaves behind: orbax's temporary directory.
    (ckpt_dir / "9.orbax-checkpoint-tmp-1234").mkdir()
    (ckpt_dir / "9.orbax-checkpoint-tmp-1234" / "garbage").write_text("partial")
    resumed = tiny_supervised(steps=3)
    results = supervised.run(resumed, tmp_path)
    assert good[-1] == 2 and results["model"]["steps"] == 3


def test_nan_loss_stops_with_step(tmp_path):
    config = tiny_supervised(steps=6)
    config.optim.lr = 1e30
    with pytest.raises(FloatingPointError, match=r"at step \d+"):
        supervised.run(config, tmp_path)


def test_supervised_end_to_end(tmp_path):
    results = supervised.run(tiny_supervised(steps=2), tmp_path)["model"]
    stage = tmp_path / "model"
    for name in ("metrics.jsonl", "results.json", "config.json"):
        assert (stage / name).exists(), name
    assert results["steps"] == 2 and 0.0 <= results["test_top1_last"] <= 100.0
    splits = {json.loads(line)["split"] for line in open(stage / "metrics.jsonl")}
    assert splits == {"train", "validation", "test"}


def checkpoint_mtimes(stage_dir):
    """{relative path: mtime_ns} of every step directory of a stage's checkpoints."""
    return {str(p.relative_to(stage_dir)): p.stat().st_mtime_ns
            for d in (ckpt_lib.LAST_DIR, ckpt_lib.BEST_DIR) for p in (stage_dir / d).iterdir()}


@pytest.mark.slow  # heavy end to end; the default run keeps a lighter one
def test_kd_end_to_end_and_teacher_reuse(tmp_path):
    config = config_lib.synthetic(load_config("kd"), steps=2)
    config.teacher.name, config.student.name = "resnet14", "resnet8"
    config.optim = config.teacher.optim = config_lib.optim(epochs=1, batch_size=64, lr=0.05)
    results = kd.run(config, tmp_path)
    assert set(results) == {"teacher", "student", "kd"}
    assert (tmp_path / "summary.json").exists()
    saved = checkpoint_mtimes(tmp_path / "teacher")
    teacher_steps = results["teacher"]["steps"]
    # Second run: the finished teacher is reused, not retrained: no checkpoint is written.
    again = kd.run(config, tmp_path)
    assert again["teacher"]["steps"] == teacher_steps
    assert checkpoint_mtimes(tmp_path / "teacher") == saved
    train_lines = [l for l in open(tmp_path / "teacher" / "metrics.jsonl") if '"train"' in l]
    assert len(train_lines) == teacher_steps  # log_every_steps=1: no new training lines
    # A teacher given by checkpoint path is loaded from there.
    config.teacher.checkpoint = str(tmp_path / "teacher")
    loaded = kd.run(config, tmp_path / "second")
    assert loaded["teacher"]["checkpoint"] == str(tmp_path / "teacher")
    assert not (tmp_path / "second" / "teacher").exists()


def test_one_teacher_per_checkpoint_on_every_path(tmp_path):
    """teacher.select picks the same checkpoint whether the teacher is trained in the run,
    reused from workdir/teacher or loaded by teacher.checkpoint; best and last differ here."""
    config = config_lib.synthetic(load_config("kd"), steps=4)
    config.teacher.name = "resnet8"
    # lr 1.0 on synthetic data: validation top-1 peaks at step 3 of 4 (so best != last)
    config.teacher.optim = config_lib.optim(epochs=1, batch_size=64, lr=1.0)
    config.train.eval_every_steps = 1
    ctx = common.setup(config, tmp_path)
    by_path = {}
    for select in ("best", "last"):
        config.teacher.select, config.teacher.checkpoint = select, ""
        _, trained, info = common.obtain_teacher(ctx)   # trained (first), then reused
        config.teacher.checkpoint = str(tmp_path / "teacher")
        _, loaded, loaded_info = common.obtain_teacher(ctx)
        assert info["step"] == loaded_info["step"] and info["select"] == select
        for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(loaded), strict=True):
            np.testing.assert_array_equal(a, b)
        by_path[select] = (info["step"], trained)
    meta, best_step = ckpt_lib.load_meta(tmp_path / "teacher", prefer=ckpt_lib.BEST_DIR)
    assert by_path["best"][0] == best_step < 4 == by_path["last"][0]  # the run's checkpoints
    want = ckpt_lib.load_variables(tmp_path / "teacher", prefer=ckpt_lib.LAST_DIR)[1]
    for a, b in zip(jax.tree.leaves(by_path["last"][1]), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(jax.tree.leaves(by_path["best"][1])[0],
                              jax.tree.leaves(by_path["last"][1])[0])
    config.teacher.select = "first"
    with pytest.raises(ValueError, match="teacher.select='first'; valid: last, best"):
        common.obtain_teacher(ctx)


def test_teacher_of_other_dataset_is_rejected(tmp_path):
    config = config_lib.synthetic(load_config("kd"), steps=1)
    config.teacher.name, config.student.name = "resnet8", "resnet8"
    config.optim = config.teacher.optim = config_lib.optim(epochs=1, batch_size=64)
    config.kd.baseline = False
    kd.run(config, tmp_path)
    config.data.synthetic_classes = 7
    config.teacher.checkpoint = str(tmp_path / "teacher")
    with pytest.raises(CheckpointError, match="num_classes"):
        kd.run(config, tmp_path / "other")
