"""Cross-layer Gram KD with an offline teacher ensemble: the Gram targets and loss against
float64 NumPy on real zoo features, the ensemble target against NumPy, the adapters'
gradients and export, resume mid-stage-1, and a whole run on synthetic data."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kdjax import config_lib, models
from kdjax.distill.base import Outputs
from kdjax.distill.cross_layer import CrossLayerGram
from kdjax.distill.ensemble import TeacherEnsemble, ensemble_log_probs, ensemble_logits
from kdjax.pipelines import common, cross_layer
from kdjax.train import checkpoint as ckpt_lib

from helpers import np_softmax, random_variables
from test_train import load_config


def np_pool(x, h, w):
    """float64 average pool of an NHWC map to [B, h, w, C] over non-overlapping windows."""
    x = np.asarray(x, np.float64)
    b, hh, ww, c = x.shape
    return x.reshape(b, h, hh // h, w, ww // w, c).mean(axis=(2, 4))


def np_gram(a, b):
    """float64 cross-layer Gram of two NHWC maps, the larger pooled to the smaller:
    G[n, i, j] = (1/(h·w)) Σ_{s,t} A[n, s, t, i] B[n, s, t, j] -> [B, Ca, Cb]."""
    h, w = min(a.shape[1], b.shape[1]), min(a.shape[2], b.shape[2])
    a, b = np_pool(a, h, w), np_pool(b, h, w)
    return np.einsum("nsti,nstj->nij", a, b) / (h * w)


def features_of(name, seed, x):
    model = models.get_model(name, 10)
    return model.apply(random_variables(model, seed=seed), x)


@pytest.fixture(scope="module")
def zoo_pair():
    """Eval-mode outputs of a resnet8 teacher and a (wider) resnet8x4 student, 16×16."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 16, 16, 3)), jnp.float32)
    teacher = Outputs(*features_of("resnet8", 1, x))
    student = Outputs(*features_of("resnet8x4", 2, x))
    return student, teacher


def test_gram_loss_matches_numpy_for_a_non_adjacent_pair(zoo_pair):
    student, teacher = zoo_pair
    # stem 16×16×16 and stage2 8×8×32 of resnet8 (stem pooled 2×); the student's stem
    # (32 ch) and stage2 (128 ch) go through adapters to 16 and 32 channels.
    method = CrossLayerGram(weight=2.5, gram_pairs=(("stem", "stage2"),))
    method.validate(student.features, teacher.features)
    params, state = method.init(jax.random.key(0), student, teacher, 100)
    assert {k: v["kernel"].shape for k, v in params.items()} == {
        "stem": (1, 1, 32, 16), "stage2": (1, 1, 128, 32)}
    loss, metrics, _ = method.loss(params, state, student, teacher, {})

    target = np_gram(teacher.features["stem"], teacher.features["stage2"])
    assert target.shape == (3, 16, 32)
    adapt = lambda tap: np.einsum(  # noqa: E731
        "nhwc,cd->nhwd", np.asarray(student.features[tap], np.float64),
        np.asarray(params[tap]["kernel"][0, 0], np.float64))
    mse = np.mean((np_gram(adapt("stem"), adapt("stage2")) - target) ** 2)
    np.testing.assert_allclose(float(metrics["distill/cross_layer/stem-stage2"]), mse, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 2.5 * mse, rtol=1e-5)


def test_pairs_are_averaged_and_share_adapters(zoo_pair):
    student, teacher = zoo_pair
    pairs = (("stem", "stage2"), ("stage1", "stage3"), ("stage2", "stage3"))
    method = CrossLayerGram(gram_pairs=pairs)
    params, state = method.init(jax.random.key(1), student, teacher, 100)
    assert sorted(params) == ["stage1", "stage2", "stage3", "stem"]
    loss, metrics, _ = method.loss(params, state, student, teacher, {})
    per_pair = [float(metrics[f"distill/cross_layer/{a}-{b}"]) for a, b in pairs]
    np.testing.assert_allclose(float(loss), np.mean(per_pair), rtol=1e-6)


def test_adapters_receive_gradients(zoo_pair):
    student, teacher = zoo_pair
    method = CrossLayerGram(gram_pairs=(("stem", "stage2"), ("stage1", "stage3")))
    params, state = method.init(jax.random.key(2), student, teacher, 100)
    grads = jax.grad(lambda p: method.loss(p, state, student, teacher, {})[0])(params)
    for tap, g in grads.items():
        assert float(jnp.max(jnp.abs(g["kernel"]))) > 0, tap


def test_bad_pairs_fail_with_the_valid_taps(zoo_pair):
    student, teacher = zoo_pair
    with pytest.raises(ValueError, match="stage9.*valid taps of the teacher"):
        CrossLayerGram(gram_pairs=(("stem", "stage9"),)).validate(
            student.features, teacher.features)
    with pytest.raises(ValueError, match="two different taps"):
        CrossLayerGram(gram_pairs=(("stem", "stem"),)).validate(
            student.features, teacher.features)
    with pytest.raises(ValueError, match="4-D feature maps"):
        CrossLayerGram(gram_pairs=(("stage3", "embedding"),)).init(
            jax.random.key(0), student, teacher, 100)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_ensemble_target_is_the_mean_of_softened_probabilities(temperature):
    rng = np.random.default_rng(3)
    logits = 6.0 * rng.standard_normal((3, 5, 7))
    logits[1, 0, 2] = 400.0   # one member certain: other members' tiny probabilities stay
    expected = np.mean([np_softmax(z / temperature) for z in logits], axis=0)
    got = ensemble_log_probs(jnp.asarray(logits, jnp.float32), temperature)
    np.testing.assert_allclose(np.exp(np.asarray(got, np.float64)), expected,
                               rtol=1e-5, atol=1e-7)
    # handed to KD as logits: their softened softmax at the same T is the target itself
    as_logits = ensemble_logits(jnp.asarray(logits, jnp.float32), temperature)
    np.testing.assert_allclose(np_softmax(np.asarray(as_logits) / temperature), expected,
                               rtol=1e-5, atol=1e-7)


def test_teacher_ensemble_runs_every_member_in_eval_mode():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((4, 8, 8, 3)), jnp.float32)
    names = ("resnet8", "vgg8")   # different architectures, same classes
    members = tuple(models.get_model(n, 10) for n in names)
    variables = tuple(random_variables(m, seed=i) for i, m in enumerate(members))
    member_logits = [np.asarray(features_of(n, i, x)[0]) for i, n in enumerate(names)]
    expected = np.mean([np_softmax(z / 4.0) for z in member_logits], axis=0)
    logits, features = TeacherEnsemble(members, temperature=4.0).apply(variables, x)
    assert features == {}
    np.testing.assert_allclose(np_softmax(np.asarray(logits) / 4.0), expected,
                               rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="eval mode"):
        TeacherEnsemble(members).apply(variables, x, train=True)


# --------------------------------------------------------------------------------------
# The pipeline on synthetic data (16×16 images, 7 steps per epoch at batch 64)
# --------------------------------------------------------------------------------------

STAGES = {"teacher_0", "teacher_1", "ensemble", "stage1", "stage2"}
ABLATIONS = {"student", "kd_teacher", "kd_ensemble", "stage1_kd_teacher"}


def tiny(steps, teachers=("resnet8@0", "resnet8@1"), ablations=False):
    """2 resnet8 teachers → resnet8 on 16×16 synthetic data, ``steps`` steps per stage."""
    config = config_lib.synthetic(load_config("cross_layer"), steps=steps)
    config.data.synthetic_shape = (16, 16, 3)
    config.train.num_devices = 2   # still sharded, fewer threads contending for the cores
    config.teachers = tuple(teachers)
    config.student.name = "resnet8"
    small = config_lib.optim(epochs=3, batch_size=64, lr=0.05)
    config.teacher_optim = config.optim = small
    # no weight decay in stage 1: adapters that move were moved by their gradient
    config.cross_layer.stage1_optim = config_lib.optim(epochs=3, batch_size=64, lr=0.05,
                                                       weight_decay=0.0)
    config.cross_layer.gram_pairs = (("stem", "stage2"), ("stage2", "stage3"))
    config.cross_layer.ablations = ablations
    return config


def raw_state(stage_dir, step):
    """The whole saved TrainState of a stage at ``step`` as a nested dict of arrays."""
    return ocp.StandardCheckpointer().restore(stage_dir / ckpt_lib.LAST_DIR / str(step) / "state")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """Two teachers trained with their own seeds, the ensemble, both stages; 2 steps each."""
    workdir = tmp_path_factory.mktemp("e2e")
    return workdir, cross_layer.run(tiny(steps=2), workdir)


def check_summary(workdir, results, stages):
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary) == set(results) == stages
    table = (workdir / "summary.md").read_text()
    for stage in stages:
        assert f"| {stage} |" in table
        assert 0.0 <= summary[stage]["test_top1_last"] <= 100.0
        assert stage == "ensemble" or summary[stage]["steps"] == 2, stage
    assert summary["ensemble"]["model"] == "resnet8+resnet8"


def test_whole_run_reports_every_teacher_the_ensemble_and_each_stage(e2e):
    check_summary(*e2e, STAGES)
    # the teachers were trained with their own seeds: different weights
    t0, t1 = (ckpt_lib.load_variables(e2e[0] / f"teacher_{i}")[1] for i in (0, 1))
    assert not np.array_equal(t0["params"]["fc"]["kernel"], t1["params"]["fc"]["kernel"])


@pytest.mark.slow
def test_rerun_with_ablations_reuses_finished_stages(e2e):
    workdir, first = e2e
    results = cross_layer.run(tiny(steps=2, ablations=True), workdir)
    check_summary(workdir, results, STAGES | ABLATIONS)
    for stage in STAGES:
        assert results[stage] == first[stage], stage


def test_exported_students_are_plain_zoo_models_without_adapters(e2e):
    workdir, _ = e2e
    model = models.get_model("resnet8", 10)
    fresh = common.init_variables(model, (16, 16, 3), 0)
    for stage in ("stage1", "stage2"):
        spec, variables = ckpt_lib.load_variables(workdir / stage)
        assert spec["name"] == "resnet8"
        assert jax.tree.structure(variables) == jax.tree.structure(fresh), stage
    # the adapters live only in stage 1's resume checkpoints; stage 2 has none
    assert sorted(raw_state(workdir / "stage1", 2)["distill_params"]) == [
        "stage2", "stage3", "stem"]
    assert not raw_state(workdir / "stage2", 2).get("distill_params")


def resume_config(e2e, steps):
    """The teachers of ``e2e``, loaded from their checkpoints."""
    return tiny(steps, teachers=[str(e2e[0] / f"teacher_{i}") for i in (0, 1)])


def run_stage1(config, workdir):
    """Validation, loading the target teacher and stage 1, as ``cross_layer.run`` does."""
    ctx = common.setup(config, workdir)
    cross_layer.validate(config, ctx, models.get_model("resnet8", ctx.num_classes))
    model, variables, _ = common.obtain_teacher(ctx, cross_layer.teacher_section(config, 0))
    return cross_layer.train_stage1(ctx, (model, variables))


@pytest.mark.slow
def test_resume_mid_stage1_is_bit_identical_and_adapters_learn(e2e, tmp_path):
    run_stage1(resume_config(e2e, 1), tmp_path)
    run_stage1(resume_config(e2e, 2), tmp_path)
    # the uninterrupted stage 1 of ``e2e`` (same teachers, in memory rather than loaded)
    a, b = raw_state(e2e[0] / "stage1", 2), raw_state(tmp_path / "stage1", 2)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    # the adapters moved between steps 1 and 2 (non-zero gradients in the real step)
    before = raw_state(tmp_path / "stage1", 1)["distill_params"]
    for tap, adapter in b["distill_params"].items():
        assert not np.array_equal(adapter["kernel"], before[tap]["kernel"]), tap
    # loaded teachers are never saved again
    assert not list(tmp_path.glob("teacher_*"))


@pytest.mark.parametrize("key, value, match", [
    ("teachers", ("resnet8@x",), "teachers\\[0\\].*integer"),
    ("teachers", ("resnet999@0",), "'resnet999' is not a kdjax model"),
    ("teachers", (), "config.teachers is empty"),
    ("cross_layer.target_teacher", 2, "target_teacher=2.*0..1"),
    ("cross_layer.gram_pairs", (("stem", "stage7"),), "unknown tap 'stage7'"),
])
def test_bad_configuration_fails_before_training(tmp_path, key, value, match):
    config = tiny(steps=1)
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(ValueError, match=match):
        cross_layer.run(config, tmp_path)
    assert not list(tmp_path.glob("teacher_*"))


def test_presets():
    default = load_config("cross_layer", "")
    assert default.teachers == ("resnet32@0", "resnet32@1") and default.student.name == "resnet8"
    assert load_config("cross_layer", "vgg11_vgg6").student.name == "vgg6"
    imagenet = load_config("cross_layer", "imagenet64_mobilenet")
    assert imagenet.data.name == "imagenet_resized/64x64"
    assert imagenet.teachers[0].startswith("mobilenet16@")
    demo = load_config("cross_layer", "demo")
    assert len(demo.teachers) == 2 and demo.data.name == "fashion_mnist"
    with pytest.raises(ValueError, match="vgg11_vgg6"):
        load_config("cross_layer", "nope")
