"""PDD: learned-mask wrapper, mask extraction, and a 2-step run through both stages."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import config_lib, models
from kdjax.data import pipeline as data_pipeline
from kdjax.distill import Outputs
from kdjax.pruning import learned_masks
from kdjax.pruning.learned_masks import LearnedMasks, binary_masks
from kdjax.pipelines import common, pdd
from kdjax.pruning import compact as compact_lib
from kdjax.pruning import cost as cost_lib
from kdjax.train import checkpoint as ckpt_lib

from test_train import load_config

STAGE1_LR = 1e-4  # tiny steps: validation top-1 never beats step 1, so best (1) != last (4)


def wrapped_model(name, placement):
    """(zoo model, its LearnedMasks wrapper for ``placement``, input x [4, 16, 16, 3],
    the wrapper's initial variables)."""
    model = models.get_model(name, 10)
    wrapped = LearnedMasks(model=model, learned=pdd.masked_groups(model, placement))
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
    return model, wrapped, x, wrapped.init(jax.random.PRNGKey(1), x)


def test_positive_logits_reproduce_the_unmasked_model():
    model, wrapped, x, variables = wrapped_model("resnet8", "inner")
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
    assert pdd.masked_groups(resnet, "output") == ("stage1", "stage2", "stage3")
    # resnet8x4's stem has its own group: not a block output, not masked
    assert pdd.masked_groups(models.get_model("resnet8x4", 10), "output") == (
        "stage1", "stage2", "stage3")
    vgg = models.get_model("vgg8", 10)
    assert pdd.masked_groups(vgg, "all") == tuple(models.mask_groups(vgg))
    for placement in ("inner", "output"):
        with pytest.raises(ValueError, match="residual"):
            pdd.masked_groups(vgg, placement)
    with pytest.raises(ValueError, match="'inner', 'output', 'all'"):
        pdd.masked_groups(resnet, "block")


def test_output_placement_masks_every_block_output():
    """A zero stage-2 stream mask zeroes those channels of the stage-2 output (after the
    last block's add + ReLU)."""
    _, wrapped, x, variables = wrapped_model("resnet14", "output")
    params = dict(variables["params"])
    logits = dict(params["mask_logits"])
    logits["stage2"] = jnp.where(jnp.arange(32) < 5, -1.0, 1.0)
    params["mask_logits"] = logits
    _, feats = wrapped.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
    np.testing.assert_array_equal(feats["stage2"][..., :5], 0.0)
    assert float(jnp.abs(feats["stage2"][..., 5:]).sum()) > 0


def test_fallback_channel_makes_the_compacted_net_differ():
    """All logits of a group ≤ 0: the stage-1 net zeroes the group, binary_masks keeps
    its largest-logit channel (reported by fallback_groups), so the compacted net is
    not the stage-1 net (BUILD_NOTES, PDD)."""
    model, wrapped, x, variables = wrapped_model("resnet8", "inner")
    params = dict(variables["params"])
    params["mask_logits"] = {g: jnp.abs(m) + 0.5 for g, m in params["mask_logits"].items()}
    params["mask_logits"]["stage2.block0"] = -jnp.arange(1.0, 33.0)
    assert pdd.fallback_groups(params) == ["stage2.block0"]
    masks = binary_masks(params, models.mask_groups(model))
    assert float(masks["stage2.block0"].sum()) == 1.0 and masks["stage2.block0"][0] == 1.0
    stage1, _ = wrapped.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
    inner = {"params": params["model"], "batch_stats": variables["batch_stats"]["model"]}
    small, small_vars = compact_lib.compact(model, inner, masks)
    assert not np.allclose(small.apply(small_vars, x)[0], stage1, atol=1e-3)


def test_resnet20_pdd_widening_matches_the_paper_increment():
    shape = (32, 32, 3)
    base = cost_lib.model_cost(models.get_model("resnet20", 10), shape)
    wide = cost_lib.model_cost(models.get_model("resnet20_pdd", 10), shape)
    # docs/pdd.md: 40.6M/0.270M -> 61.8M/0.339M, i.e. +21.2M MACs and +0.069M params.
    assert abs((wide["macs"] - base["macs"]) / 1e6 - 21.2) < 0.1
    assert abs((wide["params"] - base["params"]) / 1e6 - 0.069) < 0.001


@pytest.mark.slow  # heavy end to end; the default run keeps a lighter one
def test_pdd_two_steps_through_both_stages(tmp_path):
    config = config_lib.synthetic(load_config("pdd"), steps=2)
    config.teacher.name, config.student.name = "resnet8", "resnet8"
    small = config_lib.optim(epochs=1, batch_size=64, lr=0.05)
    config.teacher.optim = small
    config.pdd.stage1 = config.pdd.stage2 = config.pdd.kd_optim = small
    config.pdd.flops_target = 0.5  # also runs the (non-PDD) FLOPs-target extension
    config.data.validation_size = 0  # as the paper presets: masks of the last checkpoint
    summary = pdd.run(config, tmp_path)
    assert summary["masks_checkpoint"] == {"rule": "last (no validation split)", "step": 2}
    assert summary["before_finetune"]["validation"] is None
    assert 0.0 <= summary["before_finetune"]["test"]["top1"] <= 100.0
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
    regularizer = learned_masks.flops_penalty(target=0.0, weight=1.0)

    def penalty(params):
        logits, feats = wrapped.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
        return regularizer(Outputs(logits, feats))[0]

    grads = jax.grad(penalty)(variables["params"])["mask_logits"]
    assert all(float(jnp.sum(g)) > 0 for g in grads.values())  # lowering logits lowers MACs
    assert masks_lib.ones_masks(model).keys() >= set(grads)


def test_stage2_starts_from_the_compacted_best_stage1_net(tmp_path):
    """Stage 2 at lr 0 keeps its parameters, so they must be the compaction of the BEST
    stage-1 checkpoint — not a fresh initialisation, not the last checkpoint (best != last
    here); the widths are those of the best checkpoint's logits; the accuracy reported
    before stage 2 is the stage-1 net's, counted here with NumPy on the test split."""
    config = config_lib.synthetic(load_config("pdd"), steps=4)
    config.teacher.name, config.student.name = "resnet8", "resnet8"
    config.train.eval_every_steps = 1
    config.pdd.kd_baseline = False
    config.teacher.optim = config_lib.optim(epochs=1, batch_size=64, lr=0.05)
    config.pdd.stage1 = config_lib.optim(epochs=1, batch_size=64, lr=STAGE1_LR)
    config.pdd.stage2 = config_lib.optim(epochs=1, batch_size=64, lr=0.0)
    summary = pdd.run(config, tmp_path)
    _, best_step = ckpt_lib.load_meta(tmp_path / "masks", prefer=ckpt_lib.BEST_DIR)
    _, last_step = ckpt_lib.load_meta(tmp_path / "masks", prefer=ckpt_lib.LAST_DIR)
    assert best_step < last_step == 4, (best_step, last_step)  # precondition of the test
    assert summary["masks_checkpoint"] == {"rule": "best_validation", "step": best_step}
    _, best = ckpt_lib.load_variables(tmp_path / "masks", prefer=ckpt_lib.BEST_DIR)
    logits = best["params"]["mask_logits"]
    assert summary["fallback_groups"] == []
    student = models.get_model("resnet8", 10)
    want = {g: int(np.sum(np.asarray(logits[g]) > 0)) if g in logits else c
            for g, c in models.mask_groups(student).items()}
    assert summary["kept_widths"] == want
    inner = {"params": best["params"]["model"], "batch_stats": best["batch_stats"]["model"]}
    _, small_vars = compact_lib.compact(student, inner,
                                        binary_masks(best["params"],
                                                     models.mask_groups(student)))
    _, finetuned = ckpt_lib.load_variables(tmp_path / "finetune", prefer=ckpt_lib.LAST_DIR)
    for a, b in zip(jax.tree.leaves(small_vars["params"]),
                    jax.tree.leaves(finetuned["params"]), strict=True):
        np.testing.assert_array_equal(a, b)
    # before stage 2 = the stage-1 net (no fallback), counted independently
    ctx = common.setup(config, tmp_path)
    wrapped = LearnedMasks(model=student, learned=tuple(logits))
    batch = next(iter(data_pipeline.eval_batches(ctx.splits.test, config.data,
                                                  global_batch_size=len(ctx.splits.test))))
    out, _ = wrapped.apply(best, batch["image"])
    correct = np.sum(np.argmax(np.asarray(out), -1) == np.asarray(batch["label"]))
    assert summary["before_finetune"]["test"]["top1"] == pytest.approx(
        100.0 * correct / len(ctx.splits.test), abs=1e-4)
