"""PDD: learned-mask wrapper, mask extraction, and a 2-step run through both stages."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import config_lib, models
from kdjax.distill import Outputs
from kdjax.models.learned_masks import LearnedMasks, binary_masks
from kdjax.pipelines import pdd
from kdjax.pruning import cost as cost_lib

from test_train import load_config


def test_positive_logits_reproduce_the_unmasked_model():
    model = models.get_model("resnet8", 10)
    wrapped = LearnedMasks(model=model, learned=pdd.masked_groups(model, "inner"))
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
    variables = wrapped.init(jax.random.PRNGKey(1), x)
    params = dict(variables["params"])
    params["mask_logits"] = jax.tree.map(lambda m: jnp.abs(m) + 0.5, params["mask_logits"])
    got, _ = wrapped.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
    inner = {"params": params["model"], "batch_stats": variables["batch_stats"]["model"]}
    want, _ = model.apply(inner, x)
    np.testing.assert_array_equal(got, want)
    # Negative logits gate the channel off: the output changes.
    params["mask_logits"] = jax.tree.map(lambda m: -m, params["mask_logits"])
    off, _ = wrapped.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
    assert not np.allclose(off, want)


def test_mask_gradient_reaches_the_logits():
    model = models.get_model("resnet8", 10)
    wrapped = LearnedMasks(model=model, learned=("stage1.block0",))
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
    variables = wrapped.init(jax.random.PRNGKey(1), x)

    def loss(params):
        return jnp.sum(wrapped.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)[0] ** 2)

    grads = jax.grad(loss)(variables["params"])
    assert float(jnp.abs(grads["mask_logits"]["stage1.block0"]).sum()) > 0


def test_binary_masks_never_empty_a_group():
    groups = {"a": 4, "b": 3, "c": 2}
    params = {"mask_logits": {"a": jnp.array([-1.0, -0.2, -3.0, -0.5]),
                              "b": jnp.array([0.1, -0.1, 0.3])}}
    masks = binary_masks(params, groups)
    np.testing.assert_array_equal(masks["a"], [0, 1, 0, 0])  # all ≤ 0: keep the largest
    np.testing.assert_array_equal(masks["b"], [1, 0, 1])
    np.testing.assert_array_equal(masks["c"], [1, 1])        # not learned: kept


def test_placement():
    resnet = models.get_model("resnet20", 10)
    inner = pdd.masked_groups(resnet, "inner")
    assert inner and all(".block" in g for g in inner) and "stage1" not in inner
    vgg = models.get_model("vgg8", 10)
    assert pdd.masked_groups(vgg, "all") == tuple(models.mask_groups(vgg))
    with pytest.raises(ValueError, match="residual"):
        pdd.masked_groups(vgg, "inner")


def test_resnet20_pdd_widening_matches_the_paper_increment():
    shape = (32, 32, 3)
    base = cost_lib.model_cost(models.get_model("resnet20", 10), shape)
    wide = cost_lib.model_cost(models.get_model("resnet20_pdd", 10), shape)
    # PAPERS.md: 40.6M/0.270M -> 61.8M/0.339M, i.e. +21.2M MACs and +0.069M params.
    assert abs((wide["macs"] - base["macs"]) / 1e6 - 21.2) < 0.1
    assert abs((wide["params"] - base["params"]) / 1e6 - 0.069) < 0.001


def test_pdd_two_steps_through_both_stages(tmp_path):
    config = config_lib.synthetic(load_config("pdd"), steps=2)
    config.teacher.name, config.student.name = "resnet8", "resnet8"
    small = config_lib.optim(epochs=1, batch_size=64, lr=0.05)
    config.teacher.optim = small
    config.pdd.stage1 = config.pdd.stage2 = config.pdd.kd_optim = small
    config.pdd.flops_target = 0.5  # also runs the (non-PDD) FLOPs-target extension
    summary = pdd.run(config, tmp_path)
    for stage in ("teacher", "kd", "masks", "finetune"):
        assert (tmp_path / stage / "results.json").exists(), stage
    saved = json.loads((tmp_path / "summary.json").read_text())
    groups = models.mask_groups(models.get_model("resnet8", 10))
    assert set(saved["kept_widths"]) == set(groups)
    assert all(1 <= saved["kept_widths"][g] <= c for g, c in groups.items())
    assert summary["pruned_cost"]["macs"] <= summary["unpruned_cost"]["macs"]
    assert (tmp_path / "summary.md").read_text().startswith("## PDD")
    logged = [json.loads(line) for line in open(tmp_path / "masks" / "metrics.jsonl")]
    assert any("macs_ratio" in r for r in logged if r["split"] == "train")


def test_flops_extension_ratio_and_gradient():
    from kdjax.pruning import masks as masks_lib

    model = models.get_model("resnet8", 10)
    table = cost_lib.cost_table(model, (16, 16, 3))
    learned = pdd.masked_groups(model, "inner")
    wrapped = LearnedMasks(model=model, learned=learned, cost_table=table)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
    variables = wrapped.init(jax.random.PRNGKey(1), x)
    _, features = wrapped.apply(variables, x)
    hard = binary_masks(variables["params"], models.mask_groups(model))
    want = (cost_lib.model_cost(model, (16, 16, 3), hard)["macs"]
            / cost_lib.model_cost(model, (16, 16, 3))["macs"])
    assert abs(float(features["macs_ratio"]) - want) < 1e-5
    # the penalty alone pushes the mask logits (through the straight-through gradient)
    regularizer = pdd.flops_penalty(target=0.0, weight=1.0)

    def penalty(params):
        logits, feats = wrapped.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
        return regularizer(Outputs(logits, feats))[0]

    grads = jax.grad(penalty)(variables["params"])["mask_logits"]
    assert all(float(jnp.sum(g)) > 0 for g in grads.values())  # lowering logits lowers MACs
    assert masks_lib.ones_masks(model).keys() >= set(grads)
