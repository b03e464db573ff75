"""kdjax.pruning.emo: EMO-PMS's selectors, constraint training and impairment, each
against a float64 NumPy reference or a closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import np_log_softmax, np_softmax, random_variables
from kdjax import models
from kdjax.pruning import emo
from kdjax.pruning import split as split_lib

SHAPE = (16, 16, 3)


def np_ce(logits, labels):
    """float64 mean cross-entropy with integer labels."""
    return -np.mean(np_log_softmax(logits)[np.arange(len(labels)), labels])


@pytest.fixture(scope="module")
def net():
    model = models.get_model("resnet8", 10)
    variables = random_variables(model, seed=1)
    sub = split_lib.split(model, ("stage1", "stage2", "stage3"), SHAPE)[1]
    return model, variables, sub


def random_selector(rng, c, k=10):
    return {"w": jnp.asarray(rng.normal(size=(c, k)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(k,)), jnp.float32)}


def test_selector_loss_is_cross_entropy_of_pooled_features():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(6, 4, 4, 5)).astype(np.float32)
    labels = rng.integers(0, 10, 6)
    params = random_selector(rng, 5)
    pooled = feats.astype(np.float64).mean(axis=(1, 2))
    expected = np_ce(pooled @ np.asarray(params["w"], np.float64) + np.asarray(params["b"]),
                     labels)
    assert float(emo.selector_loss(params, feats, labels)) == pytest.approx(expected, rel=1e-5)
    logits = rng.normal(size=(6, 10)).astype(np.float32)  # no selector: the logits as is
    assert float(emo.selector_loss(None, logits, labels)) == pytest.approx(
        np_ce(logits, labels), rel=1e-5)


def test_selector_step_is_a_gradient_step_on_the_summed_ce():
    rng = np.random.default_rng(1)
    feats = {"a": rng.normal(size=(8, 3, 3, 4)).astype(np.float32),
             "b": rng.normal(size=(8, 6)).astype(np.float32)}
    labels = rng.integers(0, 10, 8)
    params = {"sa": random_selector(rng, 4), "sb": random_selector(rng, 6)}
    lr = 0.1
    tx = optax.sgd(lr)
    new, _, per = emo.selector_step(tx, params, tx.init(params), feats,
                                    {"sa": "a", "sb": "b"}, labels)
    onehot = np.eye(10)[labels]
    for name, tap in (("sa", "a"), ("sb", "b")):
        x = feats[tap].astype(np.float64)
        x = x.mean(axis=(1, 2)) if x.ndim == 4 else x
        w, b = (np.asarray(params[name][k], np.float64) for k in ("w", "b"))
        z = x @ w + b
        assert float(per[name]) == pytest.approx(np_ce(z, labels), rel=1e-5)
        err = (np_softmax(z) - onehot) / len(labels)  # dCE/dz
        np.testing.assert_allclose(new[name]["w"], w - lr * x.T @ err, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(new[name]["b"], b - lr * err.sum(0), rtol=1e-4, atol=1e-6)


def test_init_selectors_shapes():
    params = emo.init_selectors({"s1": 16, "s2": 32}, 10)
    assert params["s2"]["w"].shape == (32, 10) and params["s2"]["b"].shape == (10,)
    assert not np.any(np.asarray(params["s1"]["w"]))


def test_span_io_with_params_take():
    images, logits = np.zeros((2, 3)), np.ones((2, 10))
    feats = {"t1": np.full((2, 4), 2.0), "t2": np.full((2, 5), 3.0)}
    sub = split_lib.Subnet("s", "t1", "t2", {}, ())
    h, target = emo.span_io(images, logits, feats, sub)
    assert h is feats["t1"] and target is feats["t2"]
    h, target = emo.span_io(images, logits, feats, sub._replace(start=None, stop=None))
    assert h is images and target is logits
    variables = {"params": {"a": 1, "b": 2}, "batch_stats": 3}
    assert emo.with_params(variables, {"b": 5}) == {"params": {"a": 1, "b": 5},
                                                    "batch_stats": 3}
    assert variables["params"]["b"] == 2  # not modified in place
    tree = {"x": jnp.arange(6).reshape(3, 2)}
    np.testing.assert_array_equal(emo.take(tree, 2)["x"], [4, 5])


def test_constraint_loss_is_the_mse_to_the_target(net):
    model, variables, sub = net
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, *SHAPE)).astype(np.float32)
    masks = {g: jnp.asarray(rng.random(c) < 0.6, jnp.float32).at[0].set(1.0)
             for g, c in models.mask_groups(model).items()}
    _, unmasked = model.apply(variables, x, train=False)
    h = unmasked[sub.start]
    sub_masks = {**{g: jnp.ones(c) for g, c in models.mask_groups(model).items()},
                 **{g: masks[g] for g in sub.groups}}
    # Reference output: the whole forward pass from the image (not the span from h).
    _, expected_feats = model.apply(variables, x, masks=sub_masks, train=False)
    out = np.asarray(expected_feats[sub.stop], np.float64)
    target = rng.normal(size=out.shape)
    params = {m: variables["params"][m] for m in sub.modules}
    loss = emo.constraint_loss(model, variables, sub, params, sub_masks, h,
                               jnp.asarray(target, jnp.float32))
    assert float(loss) == pytest.approx(np.mean((out - target) ** 2), rel=1e-4)


def test_constraint_step_keeps_the_unpruned_candidate_and_returns_each_loss(net):
    model, variables, sub = net
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.normal(size=(6, *SHAPE)), jnp.float32)
    cand = {g: jnp.stack([jnp.ones(c), jnp.asarray(rng.random(c) < 0.5, jnp.float32)
                          .at[0].set(1.0)]) for g, c in sub.groups.items()}
    own = {m: variables["params"][m] for m in sub.modules}
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), own)
    tx = optax.sgd(0.05, momentum=0.9)
    new, _, loss = emo.constraint_step(tx, model, variables, sub, stacked,
                                       jax.vmap(tx.init)(stacked), cand, images)
    # Per-candidate loss = mean squared difference to the unpruned tap (NumPy).
    _, feats = model.apply(variables, images, train=False)
    target = np.asarray(feats[sub.stop], np.float64)
    for k in range(2):
        masks = {**{g: jnp.ones(c) for g, c in models.mask_groups(model).items()},
                 **emo.take(cand, k)}
        out = np.asarray(model.apply(variables, images, masks=masks, train=False)[1][sub.stop],
                         np.float64)
        assert float(loss[k]) == pytest.approx(np.mean((out - target) ** 2), abs=1e-6, rel=1e-4)
    # The unpruned candidate reproduces f_s: (rounding-)zero loss and gradient, unchanged.
    assert float(loss[0]) < 1e-10 and float(loss[1]) > 1e-4
    for a, b in zip(jax.tree.leaves(emo.take(new, 0)), jax.tree.leaves(own)):
        np.testing.assert_allclose(a, b, atol=1e-7)
    assert any(not np.array_equal(a, b)
               for a, b in zip(jax.tree.leaves(emo.take(new, 1)), jax.tree.leaves(own)))


def test_impairment_is_the_ce_increase_of_the_whole_network(net):
    model, variables, sub = net
    rng = np.random.default_rng(4)
    cand = {g: jnp.stack([jnp.ones(c), jnp.asarray(rng.random(c) < 0.5, jnp.float32)
                          .at[0].set(1.0)]) for g, c in sub.groups.items()}
    own = {m: variables["params"][m] for m in sub.modules}
    perturbed = jax.tree.map(lambda a: a * 0.9, own)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), own, perturbed)
    images = rng.normal(size=(7, *SHAPE)).astype(np.float32)
    labels = rng.integers(0, 10, 7)
    delta = emo.impairments(model, variables, sub, stacked, cand, images, labels,
                            batch_size=3)
    assert delta.shape == (2,) and delta[0] == 0.0  # the all-ones, unchanged candidate
    ones = {g: jnp.ones(c) for g, c in models.mask_groups(model).items()}
    base = np_ce(model.apply(variables, images, train=False)[0], labels)
    pruned = np_ce(model.apply(emo.with_params(variables, perturbed), images,
                               masks={**ones, **emo.take(cand, 1)}, train=False)[0], labels)
    assert delta[1] == pytest.approx(pruned - base, rel=1e-4, abs=1e-6)
    np.testing.assert_allclose(emo.impairment([6.0, 9.0, 3.0], 3), [1.0, -1.0])
