"""Tests for kdjax.pruning: masks, cost model, compaction, saliency, prune_to, STE."""

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import models
from kdjax.models import get_model
from kdjax.pruning import compact as compact_lib
from kdjax.pruning import cost
from kdjax.pruning import masks as masks_lib
from kdjax.pruning import saliency, ste
from kdjax.train import checkpoint as ckpt_lib
from kdjax.train.state import TrainState

from helpers import random_variables

SHAPE = (32, 32, 3)
K = 10


def images(n, seed=1, size=16):
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


def direct_cost(model, input_shape=SHAPE):
    """(MACs, params) of an unmasked model straight from its shapes, independently of
    kdjax.pruning.cost: Ho·Wo·Π kernel for every conv, Π kernel for every dense layer."""
    macs = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, (nn.Conv, nn.Dense)) and context.method_name == "__call__":
            kernel = context.module.variables["params"]["kernel"].shape
            macs.append(int(np.prod(out.shape[1:-1])) * int(np.prod(kernel)))
        return out

    def init(x):
        with nn.intercept_methods(record):
            return model.init(jax.random.key(0), x)

    shapes = jax.eval_shape(init, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    return sum(macs), sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]))


def cross_entropy(logits, labels):
    picked = jnp.take_along_axis(logits, labels[:, None], 1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - picked)


# --- masks ----------------------------------------------------------------------

def test_mask_utilities():
    model = get_model("resnet8", K)
    groups = models.mask_groups(model)
    ones = masks_lib.ones_masks(model)
    assert {g: m.shape for g, m in ones.items()} == {g: (c,) for g, c in groups.items()}
    assert masks_lib.count_kept(ones) == groups

    pop = masks_lib.random_masks(model, jax.random.key(3), keep_prob=0.1, population=5)
    counts = masks_lib.count_kept(pop)
    assert all(counts[g].shape == (5,) and np.all(counts[g] >= 1) for g in groups)
    full_pop = masks_lib.count_kept(masks_lib.population_ones(model, 5))
    np.testing.assert_array_equal(full_pop["stage2"], [32] * 5)
    one = {g: m[2] for g, m in pop.items()}
    summary = masks_lib.sparsity_summary(model, one)
    assert summary["kept"] == sum(int(np.sum(m)) for m in one.values())
    assert summary["total"] == sum(groups.values())
    assert summary["groups"]["stage3"]["kept"] == int(np.sum(one["stage3"]))
    assert summary["kept_ratio"] == summary["kept"] / summary["total"]

    soft = {g: jnp.linspace(0.0, 1.0, c) for g, c in groups.items()}
    hard = masks_lib.binarize(soft, 0.5)
    np.testing.assert_array_equal(hard["stage1"], np.linspace(0, 1, 16) > 0.5)
    both = masks_lib.apply_masks(hard, one)
    np.testing.assert_array_equal(both["stage3"], hard["stage3"] * one["stage3"])


def test_axis_groups_couplings():
    owners = masks_lib.axis_groups(get_model("resnet8x4", K))
    p = lambda *keys: owners[("params", *keys)]
    assert p("stem_conv", "kernel") == (None, None, None, "stem")
    assert p("stage1_block0", "shortcut_conv", "kernel") == (None, None, "stem", "stage1")
    assert p("stage2_block0", "conv1", "kernel") == (None, None, "stage1", "stage2.block0")
    assert p("stage2_block0", "conv2", "kernel") == (None, None, "stage2.block0", "stage2")
    assert p("fc", "kernel") == ("stage3", None) and p("fc", "bias") == (None,)
    assert owners[("batch_stats", "stage3_block0", "shortcut_bn", "var")] == ("stage3",)
    # WRN-16-1: the stem writes the stage-1 stream; the final BN reads stage 3.
    owners = masks_lib.axis_groups(get_model("wrn_16_1", K))
    assert owners[("params", "stem_conv", "kernel")][-1] == "stage1"
    assert owners[("params", "final_bn", "scale")] == ("stage3",)


# --- cost -----------------------------------------------------------------------

@pytest.mark.parametrize("name, macs_m, params", [
    ("resnet8x4", 177.07, 1_233_540), ("resnet32x4", 1083.04, 7_433_860),
    ("resnet20", 40.82, 278_324), ("resnet56", 125.75, 861_620)])
def test_reference_costs(name, macs_m, params):
    model = get_model(name, 100)
    c = cost.model_cost(model, SHAPE)
    assert round(c["macs"] / 1e6, 2) == macs_m
    assert c["params"] == params
    assert c["macs"] == sum(layer["macs"] for layer in c["layers"])
    assert cost.model_cost(model, SHAPE, masks_lib.ones_masks(model)) == c


def test_hand_computed_pruning_costs():
    model = get_model("resnet8", K)
    full = cost.model_cost(model, SHAPE)

    # One inner channel of stage 2 (32 wide, 16x16 after the stride-2 conv1): conv1
    # (3x3, 16 -> 32) loses a filter, bn1 a scale and bias, conv2 (3x3, 32 -> 32) an input.
    masks = masks_lib.ones_masks(model)
    masks["stage2.block0"] = masks["stage2.block0"].at[3].set(0.0)
    pruned = cost.model_cost(model, SHAPE, masks)
    assert full["macs"] - pruned["macs"] == 16 * 16 * 9 * 16 + 16 * 16 * 9 * 32
    assert full["params"] - pruned["params"] == 9 * 16 + 2 + 9 * 32
    # masked_cost is differentiable: ∂MACs/∂m_c is the same share for every inner channel
    table = cost.cost_table(model, SHAPE)
    grad = jax.grad(lambda m: cost.masked_cost(table, m)["macs"])(masks_lib.ones_masks(model))
    np.testing.assert_allclose(grad["stage2.block0"], 16 * 16 * 9 * (16 + 32), rtol=1e-6)

    # One channel of the stage-2 residual stream: written by conv2 (3x3, 32 in) and the
    # projection shortcut (1x1, 16 in) at 16x16, with bn2 and shortcut_bn; read by
    # stage 3's conv1 (3x3 -> 64) and shortcut (1x1 -> 64) at 8x8.
    masks = masks_lib.ones_masks(model)
    masks["stage2"] = masks["stage2"].at[0].set(0.0)
    pruned = cost.model_cost(model, SHAPE, masks)
    assert full["macs"] - pruned["macs"] == (16 * 16 * (9 * 32 + 16)
                                             + 8 * 8 * (9 * 64 + 64))
    assert full["params"] - pruned["params"] == 9 * 32 + 16 + 2 + 2 + 9 * 64 + 64


@pytest.mark.parametrize("name", ["resnet20", "resnet8x4", "vgg8", "wrn_16_2", "vgg16_cifar"])
def test_masked_cost_equals_cost_of_smaller_model(name):
    model = get_model(name, K)
    pop = masks_lib.random_masks(model, jax.random.key(7), keep_prob=0.5, population=2)
    table = cost.cost_table(model, SHAPE)
    relaxed = jax.jit(jax.vmap(lambda m: cost.masked_cost(table, m)))(pop)
    for i in range(2):
        masks = {g: m[i] for g, m in pop.items()}
        small = get_model(name, K, widths=masks_lib.count_kept(masks))
        want = cost.model_cost(small, SHAPE)
        got = cost.model_cost(model, SHAPE, masks)
        assert (got["macs"], got["params"]) == direct_cost(small)
        assert got["macs"] == want["macs"] < cost.model_cost(model, SHAPE)["macs"]
        assert got["params"] == want["params"]
        assert ([(layer["name"], layer["macs"], layer["params"]) for layer in got["layers"]]
                == [(layer["name"], layer["macs"], layer["params"]) for layer in want["layers"]])
        np.testing.assert_allclose(relaxed["macs"][i], want["macs"], rtol=1e-6)
        np.testing.assert_allclose(relaxed["params"][i], want["params"], rtol=1e-6)


# --- compaction -----------------------------------------------------------------

KEPT_BN = {  # a BN over an inner group's channels, per model
    "resnet8x4": (("stage2_block0", "bn1"), "stage2.block0"),
    "resnet20": (("stage2_block0", "bn1"), "stage2.block0"),
    "vgg8": (("stage2_bn0",), "stage2.conv0"),
    "wrn_16_2": (("stage2_block0", "bn2"), "stage2.block0"),
    "vgg11_cifar": (("stage4_bn1",), "stage4.conv1"),
    "vgg16_cifar": (("stage3_bn2",), "stage3.conv2"),
    "resnet18": (("stage3_block1", "bn1"), "stage3.block1"),
    "resnet50": (("stage2_block0", "bn2"), "stage2.block0.conv2"),
    "mobilenet9": (("stage3_block0", "dw_bn"), "stage2.block1"),  # depthwise BN
}


@pytest.mark.parametrize("name", sorted(KEPT_BN))
def test_compaction_equivalence(name):
    model = get_model(name, K)
    variables = random_variables(model, 3)
    masks = masks_lib.random_masks(model, jax.random.key(4), keep_prob=0.5)
    small, small_vars = compact_lib.compact(model, variables, masks)
    assert small == get_model(name, K, widths=masks_lib.count_kept(masks))
    x = images(4)
    masked_apply = jax.jit(lambda v, x, m: model.apply(v, x, masks=m)[0])
    want = masked_apply(variables, x, masks)
    got = jax.jit(lambda v, x: small.apply(v, x)[0])(small_vars, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    full = masked_apply(variables, x, masks_lib.ones_masks(model))
    assert not np.allclose(full, want, atol=1e-3)  # the masks did matter

    masked_cost = cost.model_cost(model, SHAPE, masks)
    small_cost = cost.model_cost(small, SHAPE)
    assert small_cost["macs"] == masked_cost["macs"]
    assert small_cost["params"] == masked_cost["params"]

    # Nothing re-initialised: the kept channels of a BN carry their statistics over.
    path, group = KEPT_BN[name]
    keep = np.flatnonzero(masks[group])
    for stat in ("mean", "var"):
        big, small_stat = variables["batch_stats"], small_vars["batch_stats"]
        for key in path:
            big, small_stat = big[key], small_stat[key]
        np.testing.assert_array_equal(small_stat[stat], np.asarray(big[stat])[keep])

    # The compacted variables round-trip through flax serialization.
    target = jax.eval_shape(small.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    restored = flax.serialization.from_bytes(target, flax.serialization.to_bytes(small_vars))
    jax.tree.map(np.testing.assert_array_equal, restored, small_vars)


def test_compacted_model_as_kdjax_checkpoint(tmp_path):
    model = get_model("resnet8x4", K)
    variables = random_variables(model, 5)
    masks = masks_lib.random_masks(model, jax.random.key(6), keep_prob=0.4)
    small, small_vars = compact_lib.compact(model, variables, masks)
    name, classes, widths = compact_lib.zoo_spec(small)
    spec = ckpt_lib.model_spec(name, classes, (16, 16, 3), widths)
    state = TrainState.create(small_vars, optax.sgd(0.1), jax.random.key(0))
    saver = ckpt_lib.StageCheckpointer(tmp_path, spec, {})
    saver.save(state, {}, {}, is_best=True)
    saver.close()
    loaded_spec, loaded = ckpt_lib.load_variables(tmp_path)
    rebuilt = get_model(loaded_spec["name"], loaded_spec["num_classes"], loaded_spec["widths"])
    assert rebuilt == small
    jax.tree.map(np.testing.assert_array_equal, loaded, small_vars)


def test_compaction_rejects_bad_input():
    model = get_model("resnet8", K)
    variables = random_variables(model, 0)
    masks = masks_lib.ones_masks(model)
    with pytest.raises(ValueError, match="at least one"):
        compact_lib.compact(model, variables, {**masks, "stage1.block0": jnp.zeros(16)})
    with pytest.raises(ValueError, match="0/1"):
        compact_lib.compact(model, variables, {**masks, "stage2": jnp.full(32, 0.5)})
    with pytest.raises(ValueError, match="zoo model"):
        compact_lib.zoo_spec(nn.Dense(3))


def test_zoo_spec_of_variant_rebuilds_it():
    model = get_model("resnet20_pdd", K)
    name, classes, widths = compact_lib.zoo_spec(model)
    assert name == "resnet20" and classes == K
    assert get_model(name, classes, widths) == model


# --- STE ------------------------------------------------------------------------

def test_ste_value_and_gradient():
    m = jnp.array([-2.0, -1.0, -0.5, 0.0, 1e-6, 0.3, 0.99, 1.0, 1.5])
    np.testing.assert_array_equal(ste.pdd_mask(m), [0, 0, 0, 0, 1, 1, 1, 1, 1])
    # value = (sign(m) + 1) / 2 wherever sign(m) != 0
    nz = np.asarray(m) != 0
    np.testing.assert_array_equal(np.asarray(ste.pdd_mask(m))[nz], (np.sign(m[nz]) + 1) / 2)
    w = jnp.arange(1.0, 10.0)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(w * ste.pdd_mask(x))))(m)
    np.testing.assert_allclose(grad, w * np.maximum(0.0, 1.0 - np.abs(np.asarray(m))), rtol=1e-6)
    # batched [P, C] under vmap, and the chain rule through it
    pop = jnp.stack([m, -m])
    g = jax.vmap(jax.grad(lambda x: jnp.sum(ste.pdd_mask(x) ** 2 * 3.0)))(pop)
    want = 6.0 * np.asarray(ste.pdd_mask(pop)) * np.maximum(0, 1 - np.abs(pop))
    np.testing.assert_allclose(g, want, rtol=1e-6)


# --- saliency -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet8", "vgg8"])
def test_taylor_score_is_sum_of_activation_times_gradient(name):
    """|∂L/∂m| == |Σ_places Σ a·∂L/∂a| computed explicitly from the tap activations: for
    resnet8 the stage-1 stream is gated at two places (stem and block output), both taps."""
    model = get_model(name, K)
    variables = random_variables(model, 1)
    x, labels = images(2, 2, size=8), jnp.arange(2)
    ones = masks_lib.ones_masks(model)
    loss = lambda m: cross_entropy(model.apply(variables, x, masks=m)[0], labels)
    scores = jax.jit(lambda m: saliency.taylor_scores(loss, m))(ones)

    @jax.jit
    def activations_and_gradients():
        """Every tap's activation a (after its mask) and ∂L/∂a, by resuming at the tap."""
        _, feats = model.apply(variables, x, masks=ones)
        grads = {}
        for tap in model.taps()[:-1]:
            tail = lambda h, tap=tap: cross_entropy(
                model.apply(variables, h, masks=ones, start=tap)[0], labels)
            grads[tap] = jax.grad(tail)(feats[tap])
        return feats, grads

    feats, grads = activations_and_gradients()
    explicit = lambda tap: jnp.sum(feats[tap] * grads[tap], axis=(0, 1, 2))

    if name == "resnet8":
        places = {"stage1": ["stem", "stage1"], "stage2": ["stage2"], "stage3": ["stage3"]}
    else:
        places = {f"stage{s}.conv0": [f"stage{s}"] for s in range(1, 6)}
    for group, taps in places.items():
        want = jnp.abs(sum(explicit(t) for t in taps))
        np.testing.assert_allclose(scores[group], want, rtol=1e-4, atol=1e-6)


def test_taylor_score_matches_finite_differences():
    """Inner (non-tap) group of a projection block, in float64: central differences."""
    model = get_model("resnet8", K)
    with jax.enable_x64(True):
        variables = jax.tree.map(lambda a: a.astype(jnp.float64), random_variables(model, 2))
        x, labels = images(2, 3, size=8).astype(jnp.float64), jnp.arange(2)
        ones = {g: m.astype(jnp.float64) for g, m in masks_lib.ones_masks(model).items()}
        loss = jax.jit(lambda m: cross_entropy(model.apply(variables, x, masks=m)[0], labels))
        scores = saliency.taylor_scores(loss, ones)
        eps, group = 1e-5, "stage2.block0"
        for c in (0, 9, 31):
            step = jnp.zeros_like(ones[group]).at[c].set(eps)
            fd = (loss({**ones, group: ones[group] + step})
                  - loss({**ones, group: ones[group] - step})) / (2 * eps)
            np.testing.assert_allclose(scores[group][c], abs(fd), rtol=1e-5, atol=1e-9)


def test_l1_and_bn_scores_by_hand():
    model = get_model("resnet8x4", K)
    params = random_variables(model, 5)["params"]
    l1 = jax.jit(lambda p: saliency.l1_scores(model, p))(params)
    filt = lambda *k: np.abs(np.asarray(params[k[0]][k[1]]["kernel"])).sum((0, 1, 2))
    np.testing.assert_allclose(l1["stage1.block0"], filt("stage1_block0", "conv1"), rtol=1e-5)
    # the stage-1 stream is written by conv2 and the projection shortcut of block 0
    np.testing.assert_allclose(l1["stage1"], filt("stage1_block0", "conv2")
                               + filt("stage1_block0", "shortcut_conv"), rtol=1e-5)
    np.testing.assert_allclose(l1["stem"], np.abs(params["stem_conv"]["kernel"]).sum((0, 1, 2)),
                               rtol=1e-5)
    bn = saliency.bn_scale_scores(model, params)
    np.testing.assert_allclose(bn["stem"], np.abs(params["stem_bn"]["scale"]), rtol=1e-6)
    stage3 = params["stage3_block0"]
    np.testing.assert_allclose(bn["stage3"], np.abs(stage3["bn2"]["scale"])
                               + np.abs(stage3["shortcut_bn"]["scale"]), rtol=1e-6)


# --- prune_to -------------------------------------------------------------------

def _scores(model, seed):
    rng = np.random.default_rng(seed)
    return {g: jnp.asarray(rng.random(c) + 0.5, jnp.float32)
            for g, c in models.mask_groups(model).items()}


def test_prune_to_keep_ratio_never_empties_a_group():
    model = get_model("resnet20", K)
    ones = masks_lib.ones_masks(model)
    total = sum(int(m.size) for m in ones.values())
    scores = _scores(model, 0)
    scores["stage2.block1"] = scores["stage2.block1"] * 1e-6  # adversarial: all the lowest
    by_ratio = jax.jit(lambda s, m, r: saliency.prune_to(s, m, keep_ratio=r))
    pruned = saliency.prune_to(scores, ones, keep_ratio=0.3, normalize="none")
    kept = masks_lib.count_kept(pruned)
    assert kept["stage2.block1"] == 1 and min(kept.values()) >= 1
    assert abs(sum(kept.values()) - 0.3 * total) <= 1
    # with per-group mean normalisation the rescaling no longer matters
    by_mean = by_ratio(scores, ones, 0.3)
    assert masks_lib.count_kept(by_mean)["stage2.block1"] > 1
    assert abs(sum(masks_lib.count_kept(by_mean).values()) - 0.3 * total) <= 1
    # ratio 0: exactly one channel left per group, the best-scoring one
    floor = by_ratio(scores, ones, 0.0)
    for g, m in floor.items():
        assert np.flatnonzero(m).tolist() == [int(np.argmax(scores[g]))]
    # already-pruned channels stay pruned, and the result is jit-safe
    again = by_ratio(_scores(model, 1), pruned, 0.2)
    assert all(np.all(np.asarray(again[g]) <= np.asarray(pruned[g])) for g in ones)
    assert abs(sum(masks_lib.count_kept(again).values()) - 0.2 * total) <= 1


def test_prune_to_macs_target_is_met_minimally():
    model = get_model("resnet20", K)
    ones = masks_lib.ones_masks(model)
    scores = _scores(model, 2)
    target = 0.5 * cost.model_cost(model, SHAPE)["macs"]
    fn = jax.jit(lambda s, m, t: saliency.prune_to(s, m, macs_target=t, model=model,
                                                   input_shape=SHAPE))
    pruned = fn(scores, ones, target)
    assert cost.model_cost(model, SHAPE, pruned)["macs"] <= target
    # minimal: restoring the last channel removed (highest normalised score) misses it
    norm = saliency.normalize_scores(scores, ones)
    removed = [(float(norm[g][c]), g, c) for g in ones for c in np.flatnonzero(pruned[g] == 0)]
    _, g, c = max(removed)
    restored = {**pruned, g: pruned[g].at[c].set(1.0)}
    assert cost.model_cost(model, SHAPE, restored)["macs"] > target
    # unreachable target: everything removable goes, one channel per group stays
    tiny = fn(scores, ones, 1.0)
    assert set(masks_lib.count_kept(tiny).values()) == {1}
    with pytest.raises(ValueError, match="exactly one"):
        saliency.prune_to(scores, ones)
