"""Issue 17 speed options: channel rounding, pruned-latency bench, population evaluation
strategies, the matmul kernel-gradient convolution."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models
from kdjax.models import conv_grad
from kdjax.evolution import population
from kdjax.pruning import cascade, channel_search, cost, saliency, split
from kdjax.pruning import masks as masks_lib
from kdjax.train import sharding

SHAPE = (32, 32, 3)
MODEL = models.get_model("resnet20", 10)
GROUPS = models.mask_groups(MODEL)


def rounded_ok(kept: int, width: int, multiple: int) -> bool:
    """The documented rule: dense width, narrower than the multiple, or a multiple."""
    return kept == width or 1 <= kept < multiple or kept % multiple == 0


def built_macs(masks) -> float:
    """MACs of the physically narrower model (its own shapes, not the masked count)."""
    small = models.get_model("resnet20", 10, widths=masks_lib.count_kept(masks))
    return cost.model_cost(small, SHAPE)["macs"]


def random_scores(seed):
    rng = np.random.default_rng(seed)
    return {g: jnp.asarray(rng.exponential(size=c), jnp.float32) for g, c in GROUPS.items()}


def test_round_counts_rule():
    for multiple in (1, 3, 8, 16):
        for width in (5, 16, 24, 64):
            kept = np.arange(1, width + 1)
            got = np.asarray(saliency.round_counts(kept, width, multiple))
            want = [k if (k == width or k < multiple) else multiple * (k // multiple)
                    for k in kept]
            np.testing.assert_array_equal(got, want)
            assert np.all(got <= kept) and np.all(np.diff(got) >= 0)


@pytest.mark.parametrize("bad", [0, -8, 2.5, True, "8"])
def test_round_to_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="round_to"):
        saliency.check_round_to(bad)


def test_round_masks_keeps_top_scoring_subset():
    rng = np.random.default_rng(3)
    scores = random_scores(4)
    masks = {g: jnp.asarray(rng.random(c) < 0.8, jnp.float32) for g, c in GROUPS.items()}
    out = saliency.round_masks(scores, masks, 8)
    for g, c in GROUPS.items():
        m, o, s = np.asarray(masks[g]), np.asarray(out[g]), np.asarray(scores[g])
        assert np.all(o <= m)
        k = int(o.sum())
        assert rounded_ok(k, c, 8) and k <= m.sum()
        alive = np.flatnonzero(m)
        top = alive[np.argsort(-s[alive], kind="stable")[:k]]
        np.testing.assert_array_equal(np.flatnonzero(o), np.sort(top))


@pytest.mark.parametrize("multiple", [8, 16])
@pytest.mark.parametrize("ratio", [0.3, 0.8])
def test_prune_to_rounded_keeps_macs_budget(multiple, ratio):
    ones = masks_lib.ones_masks(MODEL)
    full = cost.model_cost(MODEL, SHAPE)["macs"]
    scores = random_scores(int(ratio * 100) + multiple)
    prune = jax.jit(lambda s, t: saliency.prune_to(s, ones, macs_target=t, model=MODEL,
                                                   input_shape=SHAPE, round_to=multiple))
    out = prune(scores, ratio * full)
    assert built_macs(out) <= ratio * full
    # The prefix is chosen on rounded MACs: at least as wide as rounding the plain result.
    plain = saliency.prune_to(scores, ones, macs_target=ratio * full, model=MODEL,
                              input_shape=SHAPE)
    norm = saliency.normalize_scores(scores, ones)
    assert built_macs(out) >= built_macs(saliency.round_masks(norm, plain, multiple))
    for g, c in GROUPS.items():
        assert rounded_ok(int(out[g].sum()), c, multiple), (g, int(out[g].sum()))


def test_prune_to_keep_ratio_rounds_down():
    ones = masks_lib.ones_masks(MODEL)
    scores = random_scores(7)
    plain = saliency.prune_to(scores, ones, keep_ratio=0.6)
    out = saliency.prune_to(scores, ones, keep_ratio=0.6, round_to=8)
    for g, c in GROUPS.items():
        assert np.all(np.asarray(out[g]) <= np.asarray(plain[g]))
        assert rounded_ok(int(out[g].sum()), c, 8)


def test_prune_event_rounded_keeps_nesting_and_targets():
    levels = 3
    ones = {g: jnp.ones((levels, c), jnp.float32) for g, c in GROUPS.items()}
    rng = np.random.default_rng(5)
    scores = {g: jnp.asarray(rng.exponential(size=(levels, c)), jnp.float32)
              for g, c in GROUPS.items()}
    full = cost.model_cost(MODEL, SHAPE)["macs"]
    targets = jnp.asarray([full, 0.6 * full, 0.3 * full], jnp.float32)
    out = jax.device_get(cascade.prune_event(scores, ones, targets, MODEL, SHAPE,
                                             round_to=8))
    assert cascade.is_nested(out)
    for k in range(1, levels):
        level = cascade.level(out, k)
        assert built_macs(level) <= float(targets[k])
        for g, c in GROUPS.items():
            assert rounded_ok(int(level[g].sum()), c, 8)


def test_uniform_for_budget_rounded():
    table = cost.cost_table(MODEL, SHAPE)
    full = cost.model_cost(MODEL, SHAPE)["macs"]
    for budget in (0.2, 0.5, 0.9):
        out = split.uniform_for_budget(table, GROUPS, budget * full, round_to=16)
        assert built_macs(out) <= budget * full
        for g, c in GROUPS.items():
            assert rounded_ok(int(out[g].sum()), c, 16)


# --- population evaluation ------------------------------------------------------

def subnet_problem(num_candidates=5):
    """A resnet8 sub-network's evaluator factory and its arguments (tests/test_emo_pms)."""
    from test_emo_pms import tiny_network

    net = tiny_network()
    sub = split.split(net.model, ("stage1", "stage2", "stage3"), SHAPE)[1]
    build = functools.partial(channel_search.population_fitness, net.model, sub.groups,
                              lambda m: split.retained_ratio(net.table, m), sub.start,
                              sub.stop, models.mask_groups(net.model))
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(8, *SHAPE)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 8))
    h = net.model.apply(net.variables, x, stop=sub.start)[1][sub.start]
    out = net.model.apply(net.variables, h, start=sub.start, stop=sub.stop)[1][sub.stop]
    selector = {"w": jnp.asarray(rng.normal(size=(out.shape[-1], 10)), jnp.float32),
                "b": jnp.zeros(10)}
    genomes = jnp.asarray(rng.random((num_candidates, len(split.layout(sub.groups)))) < 0.6)
    return build, genomes, (net.variables, selector, h, labels)


def test_population_strategies_agree_sharded_or_not():
    build, genomes, args = subnet_problem()
    want = np.asarray(jax.jit(build("vmap"))(genomes, *args))
    mesh = sharding.make_mesh(2)
    placed = sharding.replicate((genomes, *args), mesh)
    for strategy, chunk, where in [("loop", 0, None), ("map", 0, None), ("map", 2, None),
                                   ("vmap", 0, mesh), ("loop", 0, mesh), ("map", 2, mesh)]:
        inputs = placed if where is not None else (genomes, *args)
        got = np.asarray(jax.jit(build(strategy, chunk, where))(*inputs))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6,
                                   err_msg=f"{strategy} chunk {chunk} mesh {where}")


def test_sharded_population_splits_candidates_over_devices():
    seen = []

    def evaluate(xs, w):
        seen.append(xs.shape[0])  # trace time: the per-device slice
        return xs * w

    mesh = sharding.make_mesh(2)
    xs = jnp.arange(5.0)
    out = jax.jit(population.sharded(evaluate, mesh))(*sharding.replicate((xs, 3.0), mesh))
    np.testing.assert_array_equal(np.asarray(out), 3.0 * np.arange(5.0))
    assert seen == [3]  # ⌈5 / 2⌉ candidates per device (padded with a copy of row 0)
    assert len(out.sharding.device_set) == 2


def test_fastest_picks_a_strategy_and_rejects_unknown():
    fns = {s: population.batched(lambda x, w: x * w, s) for s in population.STRATEGIES}
    assert population.fastest(fns, (jnp.ones((4, 3)), 2.0), repeats=1) in population.STRATEGIES
    with pytest.raises(ValueError, match="population evaluation"):
        population.check_strategy("scan")


def test_backend_choice_is_the_measured_strategy():
    assert population.candidate_strategies("backend", "cpu") == ("loop",)
    assert population.candidate_strategies("backend", "tpu") == ("vmap",)
    assert population.candidate_strategies("auto") == population.STRATEGIES
    assert population.candidate_strategies("map") == ("map",)
    with pytest.raises(ValueError, match="valid: backend, auto, loop"):
        population.candidate_strategies("fast")


# --- matmul kernel-gradient convolution -------------------------------------------

@pytest.mark.parametrize("k, stride, cin, cout", [(3, 1, 4, 8), (3, 2, 8, 16), (1, 2, 6, 5)])
def test_matmul_kernel_grad_matches_xla_gradients(k, stride, cin, cout):
    rng = np.random.default_rng(k * 10 + stride)
    x = jnp.asarray(rng.normal(size=(3, 9, 9, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)), jnp.float32)
    pad = ((k // 2, k // 2),) * 2
    probe = jnp.asarray(rng.normal(size=(3, -(-9 // stride), -(-9 // stride), cout)),
                        jnp.float32)

    def loss(conv, x, w):
        return jnp.sum(probe * conv(x, w, (stride, stride), pad,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC")))

    want = jax.grad(functools.partial(loss, jax.lax.conv_general_dilated), (0, 1))(x, w)
    got = jax.jit(jax.grad(functools.partial(loss, conv_grad.conv_matmul_kernel_grad),
                           (0, 1)))(x, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_matmul_kernel_grad_in_a_model_train_step():
    from helpers import random_variables

    model = models.get_model("resnet8", 10)
    variables = random_variables(model)
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))

    def grads(mode):
        with conv_grad.conv_kernel_grad(mode):
            def loss(params):
                logits = model.apply({**variables, "params": params}, x, train=True,
                                     mutable=["batch_stats"])[0][0]
                return jnp.sum(jax.nn.log_softmax(logits)[:, 0])
            return jax.jit(jax.grad(loss))(variables["params"])

    for a, b in zip(jax.tree.leaves(grads("matmul")), jax.tree.leaves(grads("xla"))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="conv_kernel_grad"):
        conv_grad.check_mode("im2col")
    with pytest.raises(ValueError, match="feature"):
        conv_grad.conv_matmul_kernel_grad(x, jnp.ones((3, 3, 1, 3)), (1, 1), ((1, 1),) * 2,
                                          feature_group_count=3)


# --- bench modes ------------------------------------------------------------------

def bench_args(*extra):
    from kdjax import bench

    return bench.parse_args(["--batch", "4", "--image", "16", "16", "3", "--classes", "10",
                             "--warmup", "0", "--repeats", "1", *extra])


def test_pruned_latency_table_and_plot(tmp_path, capsys):
    from kdjax import bench_speed

    png = tmp_path / "latency.png"
    rows = bench_speed.pruned_latency("resnet8", bench_args(), str(png), targets=(0.5,),
                                      multiples=(1, 8))
    dense = cost.model_cost(models.get_model("resnet8", 10), (16, 16, 3))["macs"]
    assert [(r["target"], r["round_to"]) for r in rows] == [(1.0, 1), (0.5, 1), (0.5, 8)]
    for row in rows[1:]:
        widths = dict(row["model"].widths)
        assert row["macs"] <= 0.5 * dense  # the compacted model's own cost
        assert all(rounded_ok(w, c, row["round_to"])
                   for g, c in models.mask_groups(models.get_model("resnet8", 10)).items()
                   for w in [widths.get(g, c)])
        assert row["seconds"] > 0 and row["speedup"] > 0
    table = capsys.readouterr().out
    assert table.count("\n| 0.50 |") == 2 and png.stat().st_size > 1000


@pytest.mark.slow  # six compilations of a resnet8 span
def test_population_eval_bench_rows(capsys):
    from kdjax import bench_speed

    rows = bench_speed.population_eval(bench_args(), model_name="resnet8", population=4,
                                       eval_batch=4, chunk=2)
    assert {(r["strategy"], r["devices"]) for r in rows} == {
        (s, d) for s in ("loop", "vmap", "map (chunk 2)") for d in (1, 2)}
    assert all(r["evals_per_s"] > 0 for r in rows)
    assert capsys.readouterr().out.count("\n|") == 7


@pytest.mark.slow  # the default run has the stronger cross-framework check (test_convert_torch)
def test_batchnorm_as_identity_bound_drops_every_batchnorm():
    """The BN-folding bound's forward equals the ordinary forward of the same network
    whose BatchNorms were made identities through their variables (mean 0, var 1 − eps,
    scale 1, bias 0), and differs from the ordinary forward with trained-like statistics."""
    from kdjax import bench
    from kdjax.pipelines import common

    model = models.get_model("resnet8", 10)
    variables = common.init_variables(model, (16, 16, 3), 0)
    rng = np.random.default_rng(0)
    perturbed = jax.tree_util.tree_map(
        lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype), variables["batch_stats"])
    variables = {**variables, "batch_stats": perturbed}
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))

    def forward(v, bound):
        with bench.batchnorm_as_identity(bound):
            return model.apply(v, x, train=False)[0]

    eps = 1e-5  # flax.linen.BatchNorm's default, used by the zoo

    def identity_bn(path, leaf):
        name = path[-1].key
        fill = {"mean": 0.0, "var": 1.0 - eps, "scale": 1.0, "bias": 0.0}.get(name)
        in_bn = "bn" in path[-2].key  # the zoo names its BatchNorms bn, bn1, shortcut_bn, …
        return jnp.full_like(leaf, fill) if fill is not None and in_bn else leaf

    reference = jax.tree_util.tree_map_with_path(identity_bn, variables)
    bound = jax.jit(lambda v: forward(v, True))(variables)
    np.testing.assert_allclose(bound, forward(reference, False), rtol=1e-5, atol=1e-5)
    assert not np.allclose(bound, forward(variables, False), atol=1e-3)
