"""EMO-PMS: sub-network split, retained-MACs objective, vmapped fitness, impairment,
GPIR selection, and a few-step end-to-end run (plus the baselines) on synthetic data."""

import importlib.util
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import config_lib, models
from kdjax.pipelines import common, emo_pms
from kdjax.pruning import channel_search
from kdjax.pruning import cost as cost_lib
from kdjax.pruning import emo as emo_lib
from kdjax.pruning import saliency
from kdjax.pruning import split as split_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAPE = (16, 16, 3)


def load_config(preset="demo"):
    spec = importlib.util.spec_from_file_location("cfg_emo", REPO / "configs" / "emo_pms.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset)
    config.unlock()
    return config


def random_masks(groups, rng, low=0.2):
    """Binary masks with ≥ 1 kept channel per group."""
    out = {}
    for g, c in groups.items():
        m = rng.random(c) < rng.uniform(low, 1.0)
        m[rng.integers(c)] = True
        out[g] = jnp.asarray(m, jnp.float32)
    return out


@pytest.mark.parametrize("name", ["resnet20", "resnet8x4", "vgg8"])
def test_split_covers_every_group_once(name):
    model = models.get_model(name, 10)
    subnets = split_lib.split(model, split_lib.default_boundaries(model), SHAPE)
    seen = [g for s in subnets for g in s.groups]
    assert sorted(seen) == sorted(models.mask_groups(model)) and len(seen) == len(set(seen))
    modules = [m for s in subnets for m in s.modules]
    assert len(modules) == len(set(modules))
    # Producer rule: the stem (or the coupled stage1 stream) belongs to the first subnet,
    # and a stream's consumer in the next stage does not steal it.
    first = subnets[0].groups
    assert ("stem" in first) if "stem" in models.mask_groups(model) else True
    for s, sub in enumerate(subnets, start=1):
        assert all(g.startswith(f"stage{s}") for g in sub.groups if g != "stem")
    assert [len(s) for s in split_lib.split_groups(model, ("stage2",), SHAPE)] \
        == [len([g for g in models.mask_groups(model) if g == "stem" or g[:6] in ("stage1", "stage2")]),
            len([g for g in models.mask_groups(model) if g[:6] not in ("stem", "stage1", "stage2")])]


def test_split_rejects_bad_boundaries():
    model = models.get_model("resnet8", 10)
    with pytest.raises(ValueError, match="not taps"):
        split_lib.split(model, ("stage9",), SHAPE)
    with pytest.raises(ValueError, match="forward order"):
        split_lib.split(model, ("stage2", "stage1"), SHAPE)


@pytest.mark.parametrize("name", ["resnet8x4", "vgg8"])
def test_retained_macs_matches_cost_model(name):
    model = models.get_model(name, 10)
    table = cost_lib.cost_table(model, SHAPE)
    full = cost_lib.model_cost(model, SHAPE)["macs"]
    rng = np.random.default_rng(0)
    subnets = split_lib.split(model, split_lib.default_boundaries(model), SHAPE)
    for _ in range(3):
        masks = random_masks(models.mask_groups(model), rng)
        expected = cost_lib.model_cost(model, SHAPE, masks)["macs"]
        np.testing.assert_allclose(float(split_lib.macs(table, masks)), expected, rtol=1e-6)
        for sub in subnets:  # only this subnet masked: ratio of its layers, rest unchanged
            own = {g: masks[g] for g in sub.groups}
            affected = float(split_lib.macs(split_lib.touching(table, sub.groups), {}))
            ratio = split_lib.retained_ratio(table, own)
            ones = {g: jnp.ones(c) for g, c in models.mask_groups(model).items()}
            exact = cost_lib.model_cost(model, SHAPE, {**ones, **own})["macs"]
            np.testing.assert_allclose(full - affected + float(ratio) * affected, exact,
                                       rtol=1e-6)
            pop = {g: jnp.stack([m, jnp.ones_like(m)]) for g, m in own.items()}
            np.testing.assert_allclose(split_lib.retained_ratio(table, pop), [ratio, 1.0],
                                       rtol=1e-6)


def test_combination_macs_is_exact():
    model = models.get_model("resnet8x4", 10)
    table = cost_lib.cost_table(model, SHAPE)
    subnets = split_lib.split_groups(model, ("stage1", "stage2", "stage3"), SHAPE)
    rng = np.random.default_rng(1)
    cands = [[random_masks(gs, rng) for _ in range(2)] for gs in subnets]
    kept = [{g: np.array([int(c[g].sum()) for c in cs]) for g in gs}
            for gs, cs in zip(subnets, cands)]
    grid = split_lib.combination_macs(table, subnets, kept)
    assert grid.shape == (2, 2, 2)
    for combo in np.ndindex(grid.shape):
        masks = {g: m for cs, k in zip(cands, combo) for g, m in cs[k].items()}
        assert grid[combo] == pytest.approx(cost_lib.model_cost(model, SHAPE, masks)["macs"])


def test_gpir_matches_brute_force_and_errors_when_infeasible():
    rng = np.random.default_rng(2)
    for trial in range(20):
        shape = tuple(rng.integers(1, 5, size=3))
        deltas = [rng.normal(size=k) for k in shape]
        macs = rng.uniform(1.0, 10.0, size=shape)
        budget = float(np.quantile(macs, 0.4))
        combo, total = split_lib.gpir_select(deltas, macs, budget)
        ref_combo, ref_total = split_lib.brute_force_select(deltas, macs, budget)
        assert total == pytest.approx(ref_total) and combo == tuple(ref_combo)
        assert macs[combo] <= budget
    with pytest.raises(ValueError, match="candidates_per_subnet"):
        split_lib.gpir_select([np.zeros(2), np.zeros(3)], np.full((2, 3), 5.0), 4.0)


def test_spread_indices_cover_the_range():
    values = np.array([0.9, 0.2, 0.5, 0.21, 1.0, 0.55])
    idx = split_lib.spread_indices(values, 3)
    assert len(set(idx.tolist())) == 3 and values[idx].min() == 0.2 and values[idx].max() == 1.0
    assert len(split_lib.spread_indices(values[:2], 5)) == 2


def tiny_network(name="resnet8"):
    model = models.get_model(name, 10)
    variables = common.init_variables(model, SHAPE, 0)
    table = cost_lib.cost_table(model, SHAPE)
    macs = float(split_lib.macs(table, {}))
    return emo_pms.Network(model, variables, table, macs, 0.5 * macs)


def test_population_evaluation_equals_single_evaluations():
    net = tiny_network()
    sub = split_lib.split(net.model, ("stage1", "stage2", "stage3"), SHAPE)[1]
    groups = sub.groups
    ratio_fn = lambda m: split_lib.retained_ratio(net.table, m)
    evaluate = channel_search.population_fitness(net.model, groups, ratio_fn, sub.start,
                                                 sub.stop, models.mask_groups(net.model))
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(8, *SHAPE)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 8))
    h = net.model.apply(net.variables, x, stop=sub.start)[1][sub.start]
    c = h.shape[-1] if sub.stop is None else net.model.apply(
        net.variables, h, start=sub.start, stop=sub.stop)[1][sub.stop].shape[-1]
    selector = {"w": jnp.asarray(rng.normal(size=(c, 10)), jnp.float32),
                "b": jnp.zeros(10)}
    genomes = jnp.asarray(rng.random((4, len(split_lib.layout(groups)))) < 0.6)
    genomes = genomes.at[0].set(True)
    batched = np.asarray(jax.jit(evaluate)(genomes, net.variables, selector, h, labels))
    ones = {g: jnp.ones(c) for g, c in models.mask_groups(net.model).items()}

    @jax.jit
    def reference(genome):  # no vmap: the model on one candidate's masks
        masks = split_lib.genome_to_masks(genome, groups)
        out = net.model.apply(net.variables, h, masks={**ones, **masks}, start=sub.start,
                              stop=sub.stop)[1][sub.stop]
        return emo_lib.selector_loss(selector, out, labels), split_lib.retained_ratio(
            net.table, masks)

    for i in range(len(genomes)):
        loss, ratio = reference(genomes[i])
        np.testing.assert_allclose(batched[i], [ratio, loss], rtol=1e-5, atol=1e-6)
    assert batched[0, 0] == pytest.approx(1.0)


def test_all_ones_candidate_has_zero_impairment():
    net = tiny_network()
    sub = split_lib.split(net.model, ("stage1", "stage2", "stage3"), SHAPE)[1]
    rng = np.random.default_rng(4)
    batches = iter([{"image": rng.normal(size=(8, *SHAPE)).astype(np.float32)}] * 3)
    cand = {g: jnp.stack([jnp.ones(c), jnp.asarray(rng.random(c) < 0.5, jnp.float32)
                          .at[0].set(1.0)])
            for g, c in sub.groups.items()}
    trained = emo_pms.constraint_train(net, sub, cand, batches, steps=3, lr=0.05)
    # The unpruned candidate reproduces f_s exactly: zero loss, zero gradient, unchanged.
    for a, b in zip(jax.tree.leaves(emo_lib.take(trained, 0)),
                    jax.tree.leaves({m: net.variables["params"][m] for m in sub.modules})):
        np.testing.assert_allclose(a, b, atol=1e-7)
    images = rng.normal(size=(12, *SHAPE)).astype(np.float32)
    labels = rng.integers(0, 10, 12)
    delta = emo_lib.impairments(net.model, net.variables, sub, trained, cand, images, labels,
                                batch_size=5)
    assert delta.shape == (2,)
    assert abs(delta[0]) < 1e-5 and abs(delta[1]) > 1e-4


def tiny_config(method="emo_pms"):
    config = config_lib.synthetic(load_config("demo"), steps=2)
    config.data.synthetic_shape = SHAPE
    config.teacher.name = "resnet8"
    config.teacher.optim = config_lib.optim(epochs=1, batch_size=64, lr=0.05)
    config.emo.update(dict(method=method, population=8, generations=2,
                           candidates_per_subnet=3, eval_batch=32, impairment_examples=48,
                           batch_size=32, selector_steps=3, constraint_steps=2,
                           taylor_batches=1, boundaries=("stage2",)))
    config.emo.finetune = config_lib.optim(epochs=1, batch_size=64, lr=0.01)
    config.target_flops_ratio = 0.6
    return config


def spy(monkeypatch, module, name, calls):
    """Wrap ``module.name`` so that every call's (args, kwargs, result) lands in calls[name]."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.setdefault(name, []).append((args, kwargs, result))
        return result

    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.slow  # heavy end to end; the default run keeps a lighter one
def test_end_to_end_synthetic(tmp_path, monkeypatch):
    """Two sub-networks: input→stage2 (selector head) and stage2→logits (the net's head),
    no validation split (the search holds out 64 training examples). Fine-tuning starts
    from exactly the assembled masked net with the constraint-trained parameters, and its
    widths are GPIR's pick (checked by brute force)."""
    calls = {}
    spy(monkeypatch, emo_pms, "search_emo_pms", calls)
    spy(monkeypatch, common, "run_stage", calls)
    config = tiny_config()
    config.data.validation_size, config.emo.holdout_size = 0, 64  # as the paper presets
    results = emo_pms.run(config, tmp_path)
    out = tmp_path / "emo_pms"
    for name in ("results.json", "scheme.json", "hypervolume.json", "hypervolume.png",
                 "pareto_input-stage2.json", "pareto_input-stage2.png",
                 "pareto_stage2-logits.json", "pareto_stage2-logits.png"):
        assert (out / name).exists(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["pruned"]["retained_macs_ratio"] <= 0.6 + 1e-9
    small = models.get_model("resnet8", 10, saved["pruned"]["widths"])
    macs = cost_lib.model_cost(small, SHAPE)["macs"]
    assert macs == results["pruned"]["macs"] <= 0.6 * results["unpruned"]["macs"]
    hv = json.loads((out / "hypervolume.json").read_text())
    assert len(hv) == 2 and all(len(v["per_generation"]) == 3 for v in hv.values())
    assert all(np.all(np.diff(v["per_generation"]) >= 0) for v in hv.values())  # archive
    scheme = json.loads((out / "scheme.json").read_text())
    assert len(scheme["search"]["subnets"]) == 2
    assert results["finetune"]["steps"] == 2
    for key in ("unpruned", "before_finetune", "after_finetune"):
        assert 0.0 <= saved[key]["test_top1"] <= 100.0
    assert saved["before_finetune"]["validation_top1"] is None  # no validation split

    (_, net, _), _, (masks, params, info) = calls["search_emo_pms"][0]
    (_, stage, *_), finetune, _ = calls["run_stage"][-1]
    assert stage == "emo_pms/finetune"
    # GPIR's pick: the least total impairment among the combinations within the budget
    subnets = info["subnets"]
    best, best_delta = None, np.inf
    for combo in itertools.product(*[range(len(s["candidates"])) for s in subnets]):
        widths = {g: c for k, s in zip(combo, subnets)
                  for g, c in s["candidates"][k]["kept"].items()}
        cost = cost_lib.model_cost(models.get_model("resnet8", 10, widths), SHAPE)["macs"]
        delta = sum(s["candidates"][k]["impairment"] for k, s in zip(combo, subnets))
        if cost <= 0.6 * results["unpruned"]["macs"] and delta < best_delta:
            best, best_delta = combo, delta
    assert [s["chosen"] for s in subnets] == list(best)
    picked = {g: c for s in subnets for g, c in s["candidates"][s["chosen"]]["kept"].items()}
    assert dict(finetune["widths"]) == picked == saved["pruned"]["widths"]
    # the compacted net fine-tuning starts from = the masked net with the trained params
    trained = emo_lib.with_params(net.variables, params)
    assert any(not np.array_equal(a, b) for m in params for a, b in zip(
        jax.tree.leaves(params[m]), jax.tree.leaves(net.variables["params"][m])))
    x = jnp.asarray(np.random.default_rng(5).normal(size=(6, *SHAPE)), jnp.float32)
    want = net.model.apply(trained, x, masks=masks)[0]
    got = finetune["model"].apply(finetune["initial_variables"], x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["l1", "taylor"])
def test_saliency_baselines_prune_the_lowest_scores(kind, tmp_path, monkeypatch):
    """The scores handed to prune_to are the method's (L1 of the producing filters;
    Taylor |∂CE/∂m| summed over the same training batches, recomputed here), and within
    every group each kept channel scores at least as high as each pruned one."""
    calls = {}
    spy(monkeypatch, emo_pms.saliency, "prune_to", calls)
    config = tiny_config(kind)
    ctx = common.setup(config, tmp_path)
    net = tiny_network()
    masks, _, _ = emo_pms.search_saliency(ctx, net, kind)
    (scores, _), _, _ = calls["prune_to"][0]
    if kind == "l1":
        want = saliency.l1_scores(net.model, net.variables["params"])
    else:
        want = {g: np.zeros(c) for g, c in models.mask_groups(net.model).items()}
        batches = emo_pms.train_batches(ctx, config.emo.batch_size, 7)
        ones = {g: jnp.ones(c) for g, c in models.mask_groups(net.model).items()}
        for _ in range(config.emo.taylor_batches):
            batch = next(batches)
            ce = lambda m: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(  # noqa
                net.model.apply(net.variables, batch["image"], masks=m)[0], batch["label"]))
            want = {g: want[g] + np.abs(v) for g, v in jax.grad(ce)(ones).items()}
    for g in want:
        np.testing.assert_allclose(scores[g], want[g], rtol=1e-4, atol=1e-7)
    pruned_any = False
    for g, m in masks.items():
        kept, score = np.asarray(m) > 0, np.asarray(scores[g])
        if not kept.all():
            pruned_any = True
            assert score[kept].min() >= score[~kept].max(), g
    assert pruned_any


def test_splits_follow_the_networks_data_seed(tmp_path):
    """A network trained with seed 0, pruned with seed 1: the splits are carved with the
    network's recorded seed; other data settings are refused."""
    config = tiny_config("uniform")
    config.train.max_steps = 1
    ctx = common.setup(config, tmp_path)
    _, _, trained = common.obtain_teacher(ctx)
    assert emo_pms.network_context(ctx, trained) is ctx
    config.seed, config.teacher.checkpoint = 1, str(tmp_path / "teacher")
    other = common.setup(config, tmp_path / "seed1")
    _, _, loaded = common.obtain_teacher(other)
    assert loaded["data_seed"] == 0 and loaded["step"] == 1
    carved = emo_pms.network_context(other, loaded)
    for split in ("train", "validation"):
        theirs, ours = getattr(ctx.splits, split), getattr(carved.splits, split)
        np.testing.assert_array_equal(ours.images, theirs.images)
        assert not np.array_equal(getattr(other.splits, split).images, theirs.images)
    config.data.validation_size = 32
    with pytest.raises(ValueError, match="data.validation_size: network 64, config 32"):
        emo_pms.network_context(common.setup(config, tmp_path / "v32"), loaded)


def test_search_holds_out_part_of_the_training_split_without_validation(tmp_path):
    config = tiny_config()
    config.data.validation_size, config.emo.holdout_size = 0, 100
    ctx = common.setup(config, tmp_path)
    search = emo_pms.search_context(ctx, data_seed=0).splits
    assert len(search.validation) == 100 and len(search.train) == len(ctx.splits.train) - 100
    rows = lambda *sources: sorted(img.tobytes() for s in sources for img in s.images)  # noqa
    assert rows(search.train, search.validation) == rows(ctx.splits.train)  # a partition
    assert search.test is ctx.splits.test
    config.emo.holdout_size = 0
    with pytest.raises(ValueError, match="emo.holdout_size"):
        emo_pms.search_context(common.setup(config, tmp_path), data_seed=0)
    with_validation = common.setup(tiny_config(), tmp_path)
    assert emo_pms.search_context(with_validation, data_seed=0) is with_validation


@pytest.mark.parametrize("method", ["uniform", "l1", "taylor", "whole_nsga2"])
def test_baselines_meet_the_target(method, tmp_path):
    """Each baseline's masks meet the MACs budget (the shared compaction + fine-tuning
    path is covered by the end-to-end test)."""
    config = tiny_config(method)
    ctx = common.setup(config, tmp_path)
    net = tiny_network()
    if method == "whole_nsga2":
        masks, _, info = emo_pms.search_whole_nsga2(ctx, net, tmp_path)
        assert info["evaluations"] == 2 * 8 * 3  # = 2 sub-networks x P x (1 + generations)
        assert (tmp_path / "pareto_whole.png").exists()
    elif method == "uniform":
        masks, _, _ = emo_pms.search_uniform(ctx, net)
    else:
        masks, _, _ = emo_pms.search_saliency(ctx, net, method)
    macs = cost_lib.model_cost(net.model, SHAPE, masks)["macs"]
    assert macs <= net.budget
    assert all(int(np.sum(m)) >= 1 for m in masks.values())
    if method == "uniform":  # keeping one more channel per group would break the budget
        ratios = {g: float(np.mean(m)) for g, m in masks.items()}
        assert max(ratios.values()) - min(ratios.values()) < 0.15
