"""Cross-layer Gram KD with an offline teacher ensemble: the Gram targets and loss against
float64 NumPy on real zoo features, the ensemble target against NumPy, the adapters'
gradients and export, resume mid-stage-1, and a whole run on synthetic data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models
from kdjax.distill.base import Outputs
from kdjax.distill.cross_layer import CrossLayerGram
from kdjax.distill.ensemble import TeacherEnsemble, ensemble_log_probs, ensemble_logits

from helpers import np_softmax, random_variables


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
