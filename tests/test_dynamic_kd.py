"""DynamicKD pipeline: end to end, c = 1 frozen equals vanilla KD, resume, controller moves."""

import json

import jax
import numpy as np
import pytest

from kdjax import config_lib
from kdjax.pipelines import dynamic_kd
from kdjax.train import checkpoint as ckpt_lib

from test_train import load_config


def tiny(steps, baselines=False, lr=0.05):
    config = config_lib.synthetic(load_config("dynamic_kd"), steps=steps)
    config.teacher.name, config.student.name = "resnet8", "resnet8"
    config.optim = config.teacher.optim = config_lib.optim(epochs=3, batch_size=64, lr=0.05)
    config.dynamic_kd.baselines = baselines
    config.dynamic_kd.controller.lr = lr
    return config


def last_params(path):
    return ckpt_lib.load_variables(path, prefer=ckpt_lib.LAST_DIR)[1]


def controller_rows(workdir):
    lines = (workdir / "dynamic_kd" / "controller.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_end_to_end_logs_every_step(tmp_path):
    results = dynamic_kd.run(tiny(steps=2), tmp_path)
    assert (tmp_path / "summary.json").exists()
    assert (tmp_path / "dynamic_kd" / "controller.png").stat().st_size > 0
    rows = controller_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert set(rows[0]) >= {"controller", "entropy_student", "entropy_teacher", "kd", "ce"}
    assert results["dynamic_kd"]["final_controller"] == rows[-1]["controller"]


def test_frozen_unit_controller_is_vanilla_kd(tmp_path):
    dynamic_kd.run(tiny(steps=3, baselines=True, lr=0.0), tmp_path)
    kd_vars, dkd_vars = last_params(tmp_path / "kd"), last_params(tmp_path / "dynamic_kd")
    for a, b in zip(jax.tree.leaves(kd_vars), jax.tree.leaves(dkd_vars)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert all(r["controller"] == 1.0 for r in controller_rows(tmp_path))


def test_resume_restores_the_controller(tmp_path):
    dynamic_kd.run(tiny(steps=2), tmp_path / "teacher_run")  # one teacher for both runs

    def with_teacher(config):
        config.teacher.checkpoint = str(tmp_path / "teacher_run" / "teacher")
        return config

    dynamic_kd.run(with_teacher(tiny(steps=6)), tmp_path / "straight")
    dynamic_kd.run(with_teacher(tiny(steps=3)), tmp_path / "resumed")
    dynamic_kd.run(with_teacher(tiny(steps=6)), tmp_path / "resumed")
    straight, resumed = controller_rows(tmp_path / "straight"), controller_rows(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == list(range(1, 7))  # no duplicated steps
    assert [r["controller"] for r in resumed] == [r["controller"] for r in straight]
    a = last_params(tmp_path / "straight" / "dynamic_kd")
    b = last_params(tmp_path / "resumed" / "dynamic_kd")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    # the controller moved, against the sign of its measured gradient at each step
    for before, after in zip(straight, straight[1:]):
        if abs(before["controller_grad"]) > 1e-6:
            assert np.sign(after["controller"] - before["controller"]) == -np.sign(before["controller_grad"])
    assert straight[-1]["controller"] != 1.0


def test_unknown_controller_kind_is_clear(tmp_path):
    config = tiny(steps=1)
    config.dynamic_kd.controller.kind = "per_sample"
    with pytest.raises(ValueError, match="per_sample"):
        dynamic_kd.run(config, tmp_path)
