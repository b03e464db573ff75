"""Cascaded TA pruning: schedule (closed form), pruning events against a NumPy greedy
reference (nesting, targets, no empty group) over random draws, saliency against finite
differences of each level's own pair loss, 0 TAs = one teacher→student pair, exported
levels = the masked shared network, bit-identical resume, whole runs on synthetic data
(the runs through the pipeline are marked slow: ``pytest -m slow tests/test_cascaded.py``)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import config_lib, losses, models
from kdjax.pipelines import cascaded
from kdjax.pruning import cascade, compact as compact_lib, cost as cost_lib
from kdjax.pruning import masks as masks_lib, saliency
from kdjax.distill.methods import AT, KD
from kdjax.train import checkpoint as ckpt_lib

from helpers import np_log_softmax, np_softmax, random_variables
from test_train import load_config

SHAPE = (16, 16, 3)
MODEL = models.get_model("resnet8", 10)
GROUPS = models.mask_groups(MODEL)
KD_PAIR = cascaded.method_pair_loss(KD(weight=1.0, temperature=4.0))


# --------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [2, 3, 5])
def test_level_and_event_ratios_closed_form(levels):
    rho = 0.3
    geo = cascade.level_ratios(rho, levels, "geometric")
    lin = cascade.level_ratios(rho, levels, "linear")
    for k in range(levels):
        assert geo[k] == pytest.approx(rho ** (k / (levels - 1)), rel=1e-12)
        assert lin[k] == pytest.approx(1 - k * (1 - rho) / (levels - 1), rel=1e-12)
    events = cascade.event_ratios(geo, 4, "geometric")
    assert events.shape == (4, levels)
    np.testing.assert_allclose(events[-1], geo, rtol=1e-12)
    np.testing.assert_allclose(events[1], geo ** 0.5, rtol=1e-12)
    np.testing.assert_allclose(cascade.event_ratios(lin, 4, "linear")[0], 1 - (1 - lin) / 4,
                               rtol=1e-12)
    assert np.all(events[:, 0] == 1.0) and np.all(np.diff(events, axis=0) <= 0)


def test_schedule_events_fall_on_multiples_of_p_only():
    schedule = cascaded.Schedule(every=3, targets=np.ones((4, 2)))
    hits = [(int(s), int(e)) for s in range(20)
            for is_event, e in [schedule.event(jnp.int32(s))] if is_event]
    assert hits == [(3, 0), (6, 1), (9, 2), (12, 3)]


@pytest.mark.parametrize("bad", [dict(target=0.0), dict(target=1.5), dict(levels=1),
                                 dict(spacing="cubic")])
def test_bad_schedule_arguments_raise(bad):
    args = {"target": 0.5, "levels": 3, "spacing": "geometric", **bad}
    with pytest.raises(ValueError):
        cascade.level_ratios(**args)


# --------------------------------------------------------------------------
# Pruning events against a NumPy reference
# --------------------------------------------------------------------------


def np_macs(masks):
    return cost_lib.model_cost(MODEL, SHAPE, {g: np.asarray(m) for g, m in masks.items()})["macs"]


def reference_event(scores, masks, targets):
    """Greedy, channel by channel, in float64: level k starts from its parent's new mask and
    removes, in ascending key order (ties: groups by name — the pytree order — then channel
    index), channels that are not their group's highest-key alive channel, until its
    MACs ≤ target."""
    levels = next(iter(masks.values())).shape[0]
    new = [{g: np.asarray(m[0]) for g, m in masks.items()}]
    for k in range(1, levels):
        keys = {}
        for g, m in masks.items():
            own = np.asarray(m[k]) != 0
            s = np.asarray(scores[g][k], np.float64)
            mean = s[own].mean() if own.any() else 0.0
            keys[g] = np.where(own, s / (mean if mean > 0 else 1.0), -1.0)
        cur = {g: v.copy() for g, v in new[-1].items()}
        best = {g: int(np.argmax(np.where(cur[g] != 0, keys[g], -np.inf))) for g in cur}
        order = sorted(((keys[g][c], gi, c, g) for gi, g in enumerate(sorted(cur))
                        for c in np.flatnonzero(cur[g]) if c != best[g]))
        for _, _, c, g in order:
            if np_macs(cur) <= targets[k]:
                break
            cur[g][c] = 0.0
        new.append(cur)
    return {g: np.stack([n[g] for n in new]) for g in masks}


def random_nested(rng, levels):
    masks = {}
    for g, c in GROUPS.items():
        m = np.ones((levels, c), np.float32)
        for k in range(1, levels):
            m[k] = m[k - 1] * (rng.random(c) < 0.8)
            m[k, rng.choice(np.flatnonzero(m[k - 1]))] = 1.0  # keep the group non-empty
        masks[g] = m
    return masks


@pytest.fixture(scope="module")
def event_fn():
    return jax.jit(lambda s, m, t: cascade.prune_event(s, m, t, MODEL, SHAPE))


def test_prune_event_matches_reference_and_keeps_nesting(event_fn):
    """Random nested masks, random saliencies (with ties), random decreasing targets."""
    rng = np.random.default_rng(0)
    full = np_macs({g: np.ones(c) for g, c in GROUPS.items()})
    levels = 4
    for draw in range(12):
        masks = random_nested(rng, levels)
        scores = {g: np.round(rng.exponential(size=(levels, c)), 1).astype(np.float32)
                  for g, c in GROUPS.items()}
        targets = full * np.sort(rng.uniform(0.1, 1.0, levels))[::-1].copy()
        out = jax.device_get(event_fn(scores, masks, jnp.asarray(targets, jnp.float32)))
        assert cascade.is_nested(out), draw
        for g in GROUPS:
            assert np.all(out[g].sum(-1) >= 1), (draw, g)
            np.testing.assert_array_equal(out[g][0], 1.0)
        want = reference_event(scores, masks, targets)
        for g in GROUPS:
            np.testing.assert_array_equal(out[g], want[g], err_msg=f"draw {draw} group {g}")


def test_schedule_reaches_each_target_exactly(event_fn):
    """E events with fresh random saliencies: after the last one every level's MACs are at
    most its final target and the reference (which stops at the first feasible step) agrees."""
    rng = np.random.default_rng(1)
    levels, rho = 4, 0.35
    full = np_macs({g: np.ones(c) for g, c in GROUPS.items()})
    final = cascade.level_ratios(rho, levels)
    masks = {g: np.ones((levels, c), np.float32) for g, c in GROUPS.items()}
    for targets in cascade.event_ratios(final, 5) * full:
        scores = {g: rng.exponential(size=(levels, c)).astype(np.float32)
                  for g, c in GROUPS.items()}
        want = reference_event(scores, masks, targets)
        masks = jax.device_get(event_fn(scores, masks, jnp.asarray(targets, jnp.float32)))
        for g in GROUPS:
            np.testing.assert_array_equal(masks[g], want[g])
        for k in range(levels):
            assert np_macs({g: m[k] for g, m in masks.items()}) <= targets[k] * (1 + 1e-6)
    ratios = [np_macs({g: m[k] for g, m in masks.items()}) / full for k in range(levels)]
    # within one channel's worth of MACs of the target (resnet8: < 3 % of the network)
    np.testing.assert_allclose(ratios, final, atol=0.03)
    assert all(r <= f * (1 + 1e-6) for r, f in zip(ratios, final))


# --------------------------------------------------------------------------
# Joint loss, saliency, 0 TAs
# --------------------------------------------------------------------------


def np_pair_loss(z_s, z_t, labels, temperature=4.0):
    """float64 CE(z_s, y) + T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))."""
    ce = -np.mean(np_log_softmax(z_s)[np.arange(len(labels)), labels])
    p_t = np_softmax(np.asarray(z_t) / temperature)
    kl = np.sum(p_t * (np.log(p_t) - np_log_softmax(np.asarray(z_s) / temperature)), -1)
    return ce + temperature ** 2 * np.mean(kl)


@jax.jit
def _level_logits(variables, stats, mask, images):
    (logits, _), _ = MODEL.apply({"params": variables["params"], "batch_stats": stats}, images,
                                 masks=mask, train=True, mutable=["batch_stats"])
    return logits


def level_logits(variables, stats, mask, images):
    """One level alone, train-mode BN (an independent, non-vmapped forward)."""
    return np.asarray(_level_logits(variables, stats, mask, images), np.float64)


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_saliency_is_the_finite_difference_of_each_levels_own_pair_loss(stop_gradient):
    levels = 3
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), random_variables(MODEL))
        stats = jax.tree.map(lambda x: jnp.stack([x] * levels), variables["batch_stats"])
        masks = {g: jnp.asarray(m, jnp.float64) for g, m in random_nested(rng, levels).items()}
        images = jnp.asarray(rng.standard_normal((4, 8, 8, 3)))
        batch = {"image": images, "label": jnp.asarray(rng.integers(0, 10, 4))}
        pair = KD_PAIR
        forward = cascaded.level_forward(MODEL, stats, images)
        loss_fn = lambda o, stop: cascade.cascade_loss(o, batch, pair, 1.0, stop)  # noqa: E731
        grads = jax.jit(lambda p, m: cascade.cascade_grads(forward, p, m, loss_fn,
                                                           stop_gradient)[3])
        sal = grads(variables["params"], masks)
        level_mask = lambda k, m: {g: (m if g == "stage2.block0" else masks[g])[k]  # noqa
                                   for g in masks}
        labels = np.asarray(batch["label"])
        eps = 1e-5
        for k in (1, 2):
            teacher = level_logits(variables, stats, cascade.level(masks, k - 1), images)
            for c in (0, 5, 17, 31):
                diffs = []
                for sign in (1, -1):
                    m = masks["stage2.block0"].at[k, c].add(sign * eps)
                    z = level_logits(variables, stats, level_mask(k, m), images)
                    diffs.append(np_pair_loss(z, teacher, labels))
                fd = (diffs[0] - diffs[1]) / (2 * eps)
                assert float(sal["stage2.block0"][k, c]) == pytest.approx(abs(fd), rel=1e-5,
                                                                           abs=1e-9), (k, c)


def tiny_batch(seed=3, n=8, shape=(8, 8, 3)):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.standard_normal((n, *shape)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, n), jnp.int32)}


def test_zero_tas_is_one_teacher_student_pair():
    """L = 2: one step of the cascade = one SGD step on CE(teacher) + CE(student) +
    KD(sg(teacher) → student) written by hand with two separate forwards; its pruning
    event = prune_to of the student's mean saliency from the all-ones teacher."""
    variables = random_variables(MODEL, seed=4)
    tx = optax.sgd(0.1)
    rng = np.random.default_rng(5)
    student_mask = {g: m[1] for g, m in random_nested(rng, 2).items()}
    full = np_macs({g: np.ones(c) for g, c in GROUPS.items()})
    schedule = cascaded.Schedule(every=1, targets=np.array([[full, 0.3 * full]]))
    step = cascaded.make_cascade_step(MODEL, tx, schedule, KD_PAIR,
                                      ce_weight=1.0, stop_gradient=True, input_shape=SHAPE,
                                      normalize="mean")
    state = cascaded.CascadeState.create(variables, GROUPS, 2, tx, jax.random.PRNGKey(0))
    state = state.replace(masks={g: jnp.stack([jnp.ones_like(m), m])
                                 for g, m in student_mask.items()})
    batch = tiny_batch()
    new, metrics = jax.jit(step)(state, batch)

    def hand_loss(params, mask_s):
        def run(mask):
            (z, _), _ = MODEL.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                    batch["image"], masks=mask, train=True,
                                    mutable=["batch_stats"])
            return z
        z_t, z_s = run(None), run(mask_s)
        ce = lambda z: -jnp.mean(jax.nn.log_softmax(z)[jnp.arange(8), batch["label"]])  # noqa
        p_t = jax.nn.softmax(jax.lax.stop_gradient(z_t) / 4.0)
        kd = 16.0 * jnp.mean(jnp.sum(p_t * (jnp.log(p_t) - jax.nn.log_softmax(z_s / 4.0)), -1))
        return ce(z_t) + ce(z_s) + kd

    loss, (g_params, g_mask) = jax.jit(jax.value_and_grad(hand_loss, argnums=(0, 1)))(
        variables["params"], student_mask)
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5)
    want_params = optax.apply_updates(variables["params"],
                                      tx.update(g_params, tx.init(variables["params"]))[0])
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    want_mask = saliency.prune_to(jax.tree.map(jnp.abs, g_mask), student_mask,
                                  macs_target=0.3 * full, model=MODEL, input_shape=SHAPE)
    for g in GROUPS:
        np.testing.assert_array_equal(new.masks[g][1], want_mask[g])
        np.testing.assert_array_equal(new.masks[g][0], 1.0)
    assert int(new.saliency_steps) == 0


def test_a_feature_method_is_the_pair_loss_of_every_level():
    """distill.method=at in the cascade: the one vmapped step's loss = Σ_k γ·CE(z_k) +
    Σ_{k≥1} β·Σ_taps AT(f_k, f_{k-1}) from separate forwards of each masked level."""
    levels = 3
    variables = random_variables(MODEL, seed=11)
    rng = np.random.default_rng(12)
    masks = {g: jnp.asarray(m) for g, m in random_nested(rng, levels).items()}
    method = AT(weight=7.0)
    taps = method.s_taps
    full = np_macs({g: np.ones(c) for g, c in GROUPS.items()})
    schedule = cascaded.Schedule(every=1000, targets=np.full((1, levels), full))
    tx = optax.sgd(0.1)
    step = cascaded.make_cascade_step(MODEL, tx, schedule, cascaded.method_pair_loss(method),
                                      ce_weight=0.5, stop_gradient=True, input_shape=SHAPE,
                                      normalize="mean", taps=taps)
    state = cascaded.CascadeState.create(variables, GROUPS, levels, tx, jax.random.PRNGKey(0))
    state = state.replace(masks=masks)
    batch = tiny_batch()
    _, metrics = jax.jit(step)(state, batch)

    outs = []
    for k in range(levels):
        (z, feats), _ = MODEL.apply(variables, batch["image"], masks=cascade.level(masks, k),
                                    train=True, mutable=["batch_stats"])
        outs.append((z, feats))
    ce = lambda z: -np.mean(jax.nn.log_softmax(z)[np.arange(8), batch["label"]])  # noqa
    want = sum(0.5 * ce(z) for z, _ in outs) + 7.0 * sum(
        float(losses.attention_transfer_loss(outs[k][1][t], outs[k - 1][1][t]))
        for k in range(1, levels) for t in taps)
    assert float(metrics["loss"]) == pytest.approx(float(want), rel=1e-5)


def test_pair_methods_are_the_stateless_ones_and_others_fail_early():
    assert cascaded.pair_methods() == ("at", "kd", "nst", "pkt", "rkd", "sp")
    config = load_config("cascaded", "demo")
    config.distill.method = "crd"
    with pytest.raises(ValueError, match="valid: at, kd, nst, pkt, rkd, sp"):
        cascaded.validate(config)
    config.distill.method = "at"
    config.distill.student_taps = ("stage9",)
    config.distill.teacher_taps = ("stage9",)
    with pytest.raises(ValueError, match="unknown tap 'stage9'"):
        cascaded.validate(config)


@pytest.mark.parametrize("method, weight, ce_weight", [
    ("kd", 1.0, 1.0),        # the cascade's Σ_k [CE + KD]
    ("at", 1000.0, 1.0),     # RepDistiller's published β for AT, CE weight 1
    ("pkt", 30000.0, 1.0),   # RepDistiller's published β for PKT
])
def test_pair_weights_are_the_cascades_for_kd_and_published_for_others(method, weight,
                                                                      ce_weight):
    config = load_config("cascaded", "demo")
    config.distill.method = method
    pair, gamma = cascaded.method_from_config(config.distill, MODEL.taps())
    assert (pair.weight, gamma) == (weight, ce_weight)
    config.distill.weight, config.distill.ce_weight = 2.5, 0.25  # set: used as given
    pair, gamma = cascaded.method_from_config(config.distill, MODEL.taps())
    assert (pair.weight, gamma) == (2.5, 0.25)


def test_compacted_levels_equal_the_masked_levels():
    """Per-level BN statistics and nested masks: each compacted level reproduces LevelView
    (the masked shared network in eval mode) to 1e-5."""
    levels, rng = 3, np.random.default_rng(7)
    variables = random_variables(MODEL, seed=8)
    stats = [random_variables(MODEL, seed=9 + k)["batch_stats"] for k in range(levels)]
    state = cascaded.CascadeState.create(variables, GROUPS, levels, optax.sgd(0.1),
                                         jax.random.PRNGKey(0))
    state = state.replace(level_stats=jax.tree.map(lambda *x: jnp.stack(x), *stats),
                          masks={g: jnp.asarray(m) for g, m in random_nested(rng, levels).items()})
    images = tiny_batch(seed=10)["image"]
    for k in range(levels):
        want, _ = jax.jit(cascaded.LevelView(MODEL, k).apply)(
            {"params": state.params, "batch_stats": state.batch_stats}, images)
        small, small_vars = compact_lib.compact(MODEL, *cascaded.level_variables(state, k))
        got, _ = jax.jit(small.apply)(small_vars, images)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert models.mask_groups(small) == masks_lib.count_kept(cascade.level(state.masks, k))


# --------------------------------------------------------------------------
# Whole runs on synthetic data (teacher, cascade, export, fine-tuning, baselines)
# --------------------------------------------------------------------------


def tiny_config(steps, teacher="", num_tas=1, method="cascade", finetune=0):
    """resnet8 on 16×16 synthetic data, batch 64 (7 steps per epoch): events at steps 2, 4."""
    config = config_lib.synthetic(load_config("cascaded"), steps=steps)
    config.data.synthetic_shape = SHAPE
    config.teacher.name, config.teacher.checkpoint = "resnet8", teacher
    config.teacher.optim = config_lib.optim(epochs=1, batch_size=64, lr=0.05)
    config.cascade.optim = config_lib.optim(epochs=1, batch_size=64, lr=0.05)
    config.cascade.update(dict(num_tas=num_tas, method=method, num_events=2,
                               prune_every_epochs=2 / 7, taylor_batches=1))
    config.cascade.finetune.update(dict(epochs=finetune, batch_size=64))
    config.target_flops_ratio = 0.5
    return config


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cascade")
    return workdir, cascaded.run(tiny_config(steps=5, finetune=1), workdir)


@pytest.mark.slow
def test_whole_run_exports_every_level(e2e):
    workdir, summary = e2e
    for name in ("summary.json", "summary.md", "accuracy_macs.png"):
        assert (workdir / name).exists(), name
    rows = json.loads((workdir / "summary.json").read_text())["levels"]
    assert [r["role"] for r in rows] == ["teacher", "ta1", "student"]
    full = cost_lib.model_cost(MODEL, SHAPE)["macs"]
    for prev, row in zip(rows, rows[1:]):
        assert all(row["widths"][g] <= prev["widths"][g] for g in GROUPS)
    for row, ratio in zip(rows, cascade.level_ratios(0.5, 3)):
        small = models.get_model("resnet8", 10, row["widths"])
        assert cost_lib.model_cost(small, SHAPE)["macs"] == row["macs"] <= ratio * full
        assert row["target_macs_ratio"] == pytest.approx(ratio)
        spec, _ = ckpt_lib.load_variables(row["checkpoint"])
        assert spec["widths"] == row["widths"]
    assert summary["finetune"]["steps"] == 5
    assert "| 2 | student |" in (workdir / "summary.md").read_text()


@pytest.mark.slow
def test_exported_levels_equal_the_masked_shared_network(e2e):
    workdir, summary = e2e
    _, final = ckpt_lib.load_variables(workdir / "cascade" / "levels" / "shared")
    images = tiny_batch(seed=6, shape=SHAPE)["image"]
    for row in summary["levels"]:
        view = cascaded.LevelView(MODEL, row["level"])
        want, _ = view.apply(final, images)
        spec, small_vars = ckpt_lib.load_variables(row["checkpoint"])
        small = models.get_model(spec["name"], spec["num_classes"], spec["widths"])
        got, _ = small.apply(small_vars, images, train=False)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_resume_mid_schedule_is_bit_identical(e2e, tmp_path):
    """5 steps straight (e2e) vs 3 steps (one event done, a saliency window open) + resume."""
    teacher = str(e2e[0] / "teacher")
    first = cascaded.run(tiny_config(steps=3, teacher=teacher), tmp_path)
    assert first["cascade"]["steps"] == 3
    resumed = cascaded.run(tiny_config(steps=5, teacher=teacher), tmp_path)
    straight_dir = tmp_path.parent / "straight"
    straight = cascaded.run(tiny_config(steps=5, teacher=teacher), straight_dir)
    a = ckpt_lib.load_variables(tmp_path / "cascade", prefer=ckpt_lib.LAST_DIR)[1]
    b = ckpt_lib.load_variables(straight_dir / "cascade", prefer=ckpt_lib.LAST_DIR)[1]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert [r["widths"] for r in resumed["levels"]] == [r["widths"] for r in straight["levels"]]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["oneshot_l1", "oneshot_taylor"])
def test_oneshot_baselines_meet_the_target(e2e, method, tmp_path):
    summary = cascaded.run(tiny_config(steps=2, teacher=str(e2e[0] / "teacher"),
                                       method=method), tmp_path)
    student = summary["levels"][-1]
    assert student["macs_ratio"] <= 0.5 and student["role"] == "student"
    assert summary["finetune_only"]["steps"] == 2
    assert (tmp_path / method / "results.json").exists()


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["", "resnet50_cifar10", "resnet50_imagenet", "demo"])
def test_presets_load(preset):
    config = load_config("cascaded", preset)
    assert config.pipeline == "cascaded" and config.cascade.num_tas == 2
    cascaded.validate(config)


@pytest.mark.parametrize("key,value,match", [
    ("method", "magic", "cascade.method"), ("num_tas", 4, "num_tas"),
    ("num_tas", -1, "num_tas"), ("spacing", "cubic", "cascade.spacing"),
    ("num_events", 0, "num_events"), ("normalize", "max", "normalisation")])
def test_bad_cascade_keys_fail_early(key, value, match):
    config = load_config("cascaded", "demo")
    config.cascade[key] = value
    with pytest.raises(ValueError, match=match):
        cascaded.validate(config)


def test_events_that_do_not_fit_fail_early():
    full_steps = 10
    cfg = tiny_config(steps=full_steps).cascade
    cfg.num_events = 6
    with pytest.raises(ValueError, match="cascade.num_events"):
        cascaded.make_schedule(MODEL, SHAPE, cfg, 0.5, 7, full_steps)
