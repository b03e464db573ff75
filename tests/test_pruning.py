"""Pruning core: cost model, compaction, saliency, prune_to, STE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models
from kdjax.pruning import compact as compact_lib
from kdjax.pruning import cost, masks as masks_lib, saliency, ste
from kdjax.train import checkpoint as ckpt_lib

SHAPE = (32, 32, 3)


@pytest.mark.parametrize("name, macs_m, params", [
    ("resnet8x4", 177.07, 1_233_540), ("resnet32x4", 1083.04, 7_433_860),
    ("resnet20", 40.82, 278_324), ("resnet56", 125.75, 861_620)])
def test_reference_costs(name, macs_m, params):
    c = cost.model_cost(models.get_model(name, 100), SHAPE)
    assert round(c["macs"] / 1e6, 2) == macs_m and c["params"] == params


def random_masks(model, seed, keep=0.6):
    rng = np.random.default_rng(seed)
    out = {}
    for g, c in models.mask_groups(model).items():
        m = rng.random(c) < keep
        m[rng.integers(c)] = True
        out[g] = jnp.asarray(m, jnp.float32)
    return out


def test_one_inner_channel_removed_by_hand():
    model = models.get_model("resnet8", 10)
    masks = masks_lib.ones_masks(model)
    masks["stage2.block0"] = masks["stage2.block0"].at[0].set(0.0)
    full = cost.model_cost(model, SHAPE)
    pruned = cost.model_cost(model, SHAPE, masks)
    # stage2.block0: conv1 16->32 (3x3, stride 2 -> 16x16) loses one filter, conv2 32->32
    # (16x16) loses one input channel, bn1 loses scale+bias.
    macs_lost = 16 * 16 * 9 * 16 + 16 * 16 * 9 * 32
    params_lost = 9 * 16 + 9 * 32 + 2
    assert full["macs"] - pruned["macs"] == macs_lost
    assert full["params"] - pruned["params"] == params_lost


@pytest.mark.parametrize("name", ["resnet20", "resnet8x4", "vgg8", "wrn_16_2"])
def test_jnp_masked_macs_equals_cost_model(name):
    model = models.get_model(name, 10)
    table = cost.layer_table(model, SHAPE)
    for seed in range(2):
        masks = random_masks(model, seed)
        want = cost.model_cost(model, SHAPE, masks)["macs"]
        assert abs(float(cost.masked_macs(table, masks)) - want) <= 1e-6 * want + 1
    # a population [P, C] gives one value per candidate
    pop = {g: jnp.stack([random_masks(model, s)[g] for s in range(3)]) for g in masks}
    assert cost.masked_macs(table, pop).shape == (3,)


def variables_with_statistics(model, seed):
    x = jax.random.normal(jax.random.PRNGKey(seed), (8, 16, 16, 3))
    variables = model.init(jax.random.PRNGKey(seed + 1), x)
    _, updates = model.apply(variables, 2.0 * x + 0.5, train=True, mutable=["batch_stats"])
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(seed), p.shape),
                          variables["params"])
    return {"params": params, "batch_stats": updates["batch_stats"]}


@pytest.mark.parametrize("name", ["resnet8x4", "resnet20", "vgg8", "wrn_16_2"])
def test_compaction_equivalence_and_cost(name, tmp_path):
    model = models.get_model(name, 10)
    variables = variables_with_statistics(model, 3)
    masks = random_masks(model, 4)
    small, small_vars = compact_lib.compact(model, variables, masks)
    x = jax.random.normal(jax.random.PRNGKey(9), (4, 16, 16, 3))
    want = model.apply(variables, x, masks=masks)[0]
    got = jax.jit(small.apply)(small_vars, x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert cost.model_cost(small, SHAPE)["macs"] == cost.model_cost(model, SHAPE, masks)["macs"]
    assert cost.model_cost(small, SHAPE)["params"] == cost.model_cost(model, SHAPE, masks)["params"]
    # The compacted model is an ordinary zoo model: it saves and loads as a kdjax checkpoint.
    widths = dict(small.widths)
    assert models.get_model(name, 10, widths) == small
    spec = ckpt_lib.model_spec(name, 10, (16, 16, 3), widths)
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(tmp_path / "best") as manager:
        manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(small_vars),
                                                meta=ocp.args.JsonSave({"model": spec})))
    loaded_spec, loaded = ckpt_lib.load_variables(tmp_path)
    rebuilt = models.get_model(loaded_spec["name"], 10, loaded_spec["widths"])
    np.testing.assert_allclose(rebuilt.apply(loaded, x)[0], want, rtol=1e-5, atol=1e-5)


def test_compaction_rejects_empty_group():
    model = models.get_model("resnet8", 10)
    masks = masks_lib.ones_masks(model)
    masks["stage1.block0"] = jnp.zeros_like(masks["stage1.block0"])
    with pytest.raises(ValueError, match="at least one"):
        compact_lib.compact(model, variables_with_statistics(model, 0), masks)


def test_ste_value_and_gradient():
    m = jnp.array([-2.0, -0.5, 0.0, 0.3, 1.5, 0.99])
    np.testing.assert_array_equal(ste.pdd_mask(m), [0, 0, 0, 1, 1, 1])
    weights = jnp.arange(1.0, 7.0)
    grad = jax.grad(lambda x: jnp.sum(weights * ste.pdd_mask(x)))(m)
    np.testing.assert_allclose(grad, weights * np.maximum(0.0, 1.0 - np.abs(np.asarray(m))),
                               rtol=1e-6)


def test_taylor_scores_match_finite_differences():
    model = models.get_model("vgg8", 10)
    variables = variables_with_statistics(model, 1)
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 16, 16, 3))
    labels = jnp.arange(4) % 10

    def loss(masks):
        logits = model.apply(variables, x, masks=masks)[0]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[jnp.arange(4), labels])

    ones = masks_lib.ones_masks(model)
    scores = saliency.taylor_scores(loss, ones)
    group, eps = "stage2.conv0", 1e-2
    for c in (0, 5, 17):
        up = dict(ones, **{group: ones[group].at[c].add(eps)})
        down = dict(ones, **{group: ones[group].at[c].add(-eps)})
        fd = (float(loss(up)) - float(loss(down))) / (2 * eps)
        assert abs(abs(fd) - float(scores[group][c])) < 1e-3 + 1e-2 * abs(fd)


def test_l1_and_bn_scores_by_hand():
    model = models.get_model("resnet8x4", 10)
    params = variables_with_statistics(model, 5)["params"]
    l1 = saliency.l1_scores(model, params)
    np.testing.assert_allclose(
        l1["stage1.block0"], np.abs(params["stage1_block0"]["conv1"]["kernel"]).sum((0, 1, 2)), rtol=1e-5)
    # the stage-1 stream is written by conv2 and the projection shortcut of block 0
    want = (np.abs(params["stage1_block0"]["conv2"]["kernel"]).sum((0, 1, 2))
            + np.abs(params["stage1_block0"]["shortcut_conv"]["kernel"]).sum((0, 1, 2)))
    np.testing.assert_allclose(l1["stage1"], want, rtol=1e-5)
    bn = saliency.bn_scale_scores(model, params)
    np.testing.assert_allclose(bn["stem"], np.abs(params["stem_bn"]["scale"]), rtol=1e-6)


def test_prune_to_never_empties_a_group_and_hits_targets():
    model = models.get_model("resnet20", 10)
    ones = masks_lib.ones_masks(model)
    rng = np.random.default_rng(0)
    scores = {g: jnp.asarray(rng.random(m.shape) + 1.0) for g, m in ones.items()}
    scores["stage2.block1"] = jnp.zeros_like(scores["stage2.block1"]) + 1e-9  # adversarial
    pruned = saliency.prune_to(scores, ones, keep_ratio=0.2)
    kept = masks_lib.count_kept(pruned)
    assert all(k >= 1 for k in kept.values())
    total = sum(int(m.size) for m in ones.values())
    assert sum(kept.values()) == int(np.ceil(0.2 * total))
    full = cost.model_cost(model, SHAPE)["macs"]
    target = 0.5 * full
    by_macs = saliency.prune_to(scores, ones, macs_target=target, model=model, input_shape=SHAPE)
    assert cost.model_cost(model, SHAPE, by_macs)["macs"] <= target
    # minimal: one channel fewer removed would miss the target
    order = saliency.removal_order(scores, ones)
    removed = sum(int(m.size - np.count_nonzero(by_macs[g])) for g, m in ones.items())
    less = saliency._apply_removals(ones, order[:removed - 1])
    assert cost.model_cost(model, SHAPE, less)["macs"] > target
    # already-pruned channels stay pruned
    again = saliency.prune_to(scores, by_macs, keep_ratio=0.1)
    assert all(np.all(np.asarray(again[g]) <= np.asarray(by_macs[g])) for g in ones)


def test_sparsity_summary_and_population():
    model = models.get_model("resnet8", 10)
    masks = random_masks(model, 1)
    summary = masks_lib.sparsity_summary(model, masks)
    assert summary["kept"] == sum(int(np.count_nonzero(m)) for m in masks.values())
    pop = masks_lib.population_ones(model, 4)
    counts = masks_lib.count_kept(pop)
    groups = models.mask_groups(model)
    assert all(counts[g].shape == (4,) and np.all(counts[g] == c) for g, c in groups.items())
