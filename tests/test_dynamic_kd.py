"""DynamicKD pipeline: end to end, the objective's measurements, c = 1 frozen equals
vanilla KD, resume (controller and log), the controller moves against ∂L_KD/∂c."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import config_lib, controllers, distill, losses
from kdjax.distill import Aux, Outputs
from kdjax.distill.methods import KD, DynamicKD
from kdjax.pipelines import dynamic_kd
from kdjax.train import checkpoint as ckpt_lib

from helpers import np_log_softmax
from test_train import load_config

LR = 0.05


def tiny(steps, teacher="", baselines=False, lr=LR):
    """resnet8 → resnet8 on synthetic data (7 steps per epoch at batch 64), ``steps`` steps."""
    config = config_lib.synthetic(load_config("dynamic_kd"), steps=steps)
    config.teacher.name, config.student.name = "resnet8", "resnet8"
    config.teacher.checkpoint = teacher
    config.optim = config.teacher.optim = config_lib.optim(epochs=3, batch_size=64, lr=0.05)
    config.dynamic_kd.baselines = baselines
    config.distill.dynamic_kd.controller_lr = lr
    return config


def last_params(stage_dir):
    return ckpt_lib.load_variables(stage_dir, prefer=ckpt_lib.LAST_DIR)[1]


def assert_same_tree(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, **tol)


def rows(workdir):
    return dynamic_kd.read_rows(workdir / "dynamic_kd" / "controller.jsonl")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """2 steps from nothing: teacher, baselines and a frozen c = 1 controller (lr = 0)."""
    workdir = tmp_path_factory.mktemp("e2e")
    return workdir, dynamic_kd.run(tiny(steps=2, baselines=True, lr=0.0), workdir)


@pytest.fixture(scope="module")
def straight(e2e, tmp_path_factory):
    """5 steps with a learning controller and the teacher of ``e2e``."""
    workdir = tmp_path_factory.mktemp("straight")
    dynamic_kd.run(tiny(steps=5, teacher=str(e2e[0] / "teacher")), workdir)
    return workdir


def test_end_to_end_writes_summary_log_and_plot(e2e):
    workdir, results = e2e
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary) == {"teacher", "student", "kd", "dynamic_kd"}
    assert summary["dynamic_kd"]["steps"] == 2
    assert (workdir / "dynamic_kd" / "controller.png").stat().st_size > 0
    logged = rows(workdir)
    assert [r["step"] for r in logged] == [1, 2]
    assert set(logged[0]) >= {"step", "controller", "H_q", "H_p", "kd", "ce", "loss"}
    assert results["dynamic_kd"]["final_controller"] == logged[-1]["controller"]


def test_frozen_unit_controller_reproduces_the_kd_stage(e2e):
    workdir = e2e[0]
    assert [r["controller"] for r in rows(workdir)] == [1.0, 1.0]
    assert_same_tree(last_params(workdir / "kd"), last_params(workdir / "dynamic_kd"),
                     rtol=1e-6, atol=1e-7)


def test_controller_moves_against_its_gradient(straight):
    first, second = rows(straight)[:2]
    assert first["controller"] == 1.0 and second["controller"] != 1.0
    assert np.sign(second["controller"] - 1.0) == -np.sign(first["controller_grad"])
    # θ ← θ − lr·c·∂L_KD/∂c with c = 1 (float32 arithmetic on the device)
    np.testing.assert_allclose(second["controller"], np.exp(-LR * first["controller_grad"]),
                               rtol=1e-5)
    assert len({r["controller"] for r in rows(straight)}) == 5  # it changes every step


def dynamic_objective(kind, mode):
    """γ·CE + DynamicKD with the preset's γ = 0.1, α = 0.9, T = 4."""
    return distill.objective(DynamicKD(weight=0.9, temperature=4.0, kind=kind, mode=mode), 0.1)


def logits_and_labels(seed, b=16, k=10):
    rng = np.random.default_rng(seed)
    z_s, z_t = (3 * rng.normal(size=(b, k)).astype(np.float32) for _ in range(2))
    return z_s, z_t, {"label": rng.integers(0, k, size=b).astype(np.int32)}


def np_dynamic_kd(z_s, z_t, labels, c, t, gamma, alpha):
    """float64 NumPy: (γ·CE + α·T²·KL(p_t ‖ q_c), CE, T²·KL, mean H(q_c), mean H(p_t)),
    q_c = softmax(c·z_s/T) (c scalar or [K], broadcast over rows), p_t = softmax(z_t/T)."""
    z_s, z_t, c = (np.asarray(a, np.float64) for a in (z_s, z_t, c))
    ce = -np.mean(np_log_softmax(z_s)[np.arange(len(labels)), labels])
    log_q, log_p = np_log_softmax(c * z_s / t), np_log_softmax(z_t / t)
    p, q = np.exp(log_p), np.exp(log_q)
    kd = t * t * np.mean(np.sum(p * (log_p - log_q), axis=-1))
    h_q, h_p = (np.mean(-np.sum(d * np.log(d), axis=-1)) for d in (q, p))
    return [gamma * ce + alpha * kd, ce, kd, h_q, h_p]


@pytest.mark.parametrize("kind", ["scalar", "per_class"])
def test_objective_measures_for_the_controller(kind):
    z_s, z_t, batch = logits_and_labels(0)
    c = np.exp(np.random.default_rng(1).normal(size=() if kind == "scalar" else (10,)))
    opt_state = (optax.EmptyState(), controllers.EntropyControllerState(
        log_c=jnp.log(jnp.float32(c)), count=jnp.int32(0)))
    measure = lambda mode: jax.jit(dynamic_objective(kind, mode))(  # noqa: E731
        Outputs(z_s, {}), Outputs(z_t, {}), batch, Aux({}, {}, opt_state, 0))
    loss, metrics, _, extra = measure("gradient")
    # loss, KD term and both entropies against float64 NumPy at this c != 1
    want = np_dynamic_kd(z_s, z_t, batch["label"], np.float32(c), 4.0, 0.1, 0.9)
    np.testing.assert_allclose([loss, metrics["ce"], metrics["kd"], metrics["H_q"],
                                metrics["H_p"]], want, rtol=1e-5)
    # the measured gradient is the autodiff gradient of the KD term w.r.t. c
    auto = jax.grad(losses.dynamic_kd_loss, argnums=2)(z_s, z_t, jnp.float32(c), 4.0,
                                                       controller_kind=kind)
    np.testing.assert_allclose(extra["controller_grad"], auto, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["controller"], np.mean(c), rtol=1e-6)
    if kind == "scalar":  # per-class entropy feedback is refused (test below)
        _, _, _, feedback = measure("entropy_feedback")
        assert set(feedback) == {"student_entropy", "teacher_entropy"}
        np.testing.assert_allclose([feedback["student_entropy"], feedback["teacher_entropy"]],
                                   want[3:], rtol=1e-5)


def test_objective_at_unit_controller_is_vanilla_kd():
    z_s, z_t, batch = logits_and_labels(2)
    opt_state = controllers.entropy_controller().init({})
    dynamic = dynamic_objective("scalar", "gradient")
    vanilla = distill.objective(KD(weight=0.9, temperature=4.0), 0.1)
    student, teacher = Outputs(z_s, {}), Outputs(z_t, {})
    assert (dynamic(student, teacher, batch, Aux({}, {}, opt_state, 0))[0]
            == vanilla(student, teacher, batch, Aux({}, {}, None, 0))[0])
    with pytest.raises(ValueError, match="entropy_feedback"):
        dynamic_objective("scalar", "feedback")


def test_resume_restores_the_controller_and_never_duplicates_log_lines(e2e, straight,
                                                                        tmp_path):
    config = lambda steps: tiny(steps=steps, teacher=str(e2e[0] / "teacher"))  # noqa: E731
    dynamic_kd.run(config(3), tmp_path)
    # as if the run had died after logging step 4 but before checkpointing it
    with (tmp_path / "dynamic_kd" / "controller.jsonl").open("a") as f:
        f.write(json.dumps({"step": 4, "controller": -1.0}) + "\n")
    results = dynamic_kd.run(config(5), tmp_path)
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4, 5]
    assert rows(tmp_path) == rows(straight)  # the controller value included, bit for bit
    assert results["dynamic_kd"]["final_controller"] == rows(straight)[-1]["controller"]
    assert_same_tree(last_params(straight / "dynamic_kd"), last_params(tmp_path / "dynamic_kd"),
                     rtol=0, atol=0)


def test_unimplemented_controller_kind_fails_before_training(tmp_path):
    config = tiny(steps=1)
    config.distill.dynamic_kd.kind = "per_sample"
    with pytest.raises(ValueError, match="'per_sample' is not implemented"):
        dynamic_kd.run(config, tmp_path)
    assert not (tmp_path / "teacher").exists()


def test_per_class_entropy_feedback_is_rejected_before_training(tmp_path):
    config = tiny(steps=1)
    config.distill.dynamic_kd.kind = "per_class"
    config.distill.dynamic_kd.mode = "entropy_feedback"
    with pytest.raises(ValueError, match="kind='per_class' with mode='entropy_feedback'"):
        dynamic_kd.run(config, tmp_path)
    assert not (tmp_path / "teacher").exists()


PAPER_PRESETS = {"kd": ("", "resnet56_resnet20", "vgg13_vgg8"),
                 "dynamic_kd": ("", "resnet56_resnet20", "vgg13_vgg8"),
                 "pdd": ("", "vgg16_vgg11"), "emo_pms": ("", "vgg16")}


@pytest.mark.parametrize("name", sorted(PAPER_PRESETS))
def test_paper_presets_train_on_the_full_split_and_demos_keep_validation(name):
    for preset in PAPER_PRESETS[name]:
        config = load_config(name, preset)
        assert config.data.validation_size == 0, (name, preset)
        assert config.teacher.select == "last"
    assert load_config(name, "demo").data.validation_size > 0


def test_presets():
    assert load_config("dynamic_kd", "").student.name == "resnet8x4"
    assert load_config("dynamic_kd", "vgg13_vgg8").teacher.name == "vgg13"
    assert not load_config("dynamic_kd", "").dynamic_kd.baselines
    assert load_config("dynamic_kd", "demo").dynamic_kd.baselines
    with pytest.raises(ValueError, match="resnet56_resnet20"):
        load_config("dynamic_kd", "nope")
