"""Tests for kdjax.models: architecture fidelity, masks, compaction equivalence, splits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models
from kdjax.models import MODEL_NAMES, get_model
from kdjax.pruning.compact import compact

from helpers import random_variables

NUM_CLASSES = 10


def _images(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _param_count(model, shape=(1, 32, 32, 3)):
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def _ones_masks(model):
    return {g: jnp.ones((c,), jnp.float32) for g, c in models.mask_groups(model).items()}


def _random_masks(model, seed):
    """Random 0/1 masks with at least one kept channel per group."""
    rng = np.random.default_rng(seed)
    masks = {}
    for group, channels in models.mask_groups(model).items():
        keep = rng.random(channels) < 0.5
        keep[rng.integers(channels)] = True
        masks[group] = jnp.asarray(keep, jnp.float32)
    return masks


@pytest.mark.parametrize("name,expected", [
    ("resnet8x4", 1_233_540), ("resnet32x4", 7_433_860),
    ("resnet20", 278_324), ("resnet56", 861_620),
    # Not given in the brief; they agree with RepDistiller's rounded 2.26M / 3.96M / 9.46M.
    ("wrn_40_2", 2_255_156), ("vgg8", 3_965_028), ("vgg13", 9_462_180)])
def test_param_counts(name, expected):
    assert _param_count(get_model(name, 100)) == expected


def test_init_follows_pytorch_recipe():
    model = get_model("resnet8", 100)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    assert set(variables) == {"params", "batch_stats"}
    params = variables["params"]
    conv = params["stage3_block0"]["conv2"]
    assert set(conv) == {"kernel"}  # no bias
    fan_out = 3 * 3 * 64
    np.testing.assert_allclose(np.std(conv["kernel"]), np.sqrt(2.0 / fan_out), rtol=0.05)
    bn = params["stage3_block0"]["bn2"]
    np.testing.assert_array_equal(bn["scale"], 1.0)
    np.testing.assert_array_equal(bn["bias"], 0.0)
    stats = variables["batch_stats"]["stage3_block0"]["bn2"]
    np.testing.assert_array_equal(stats["mean"], 0.0)
    np.testing.assert_array_equal(stats["var"], 1.0)
    bound = 1.0 / np.sqrt(64)
    assert np.abs(params["fc"]["kernel"]).max() <= bound
    assert np.abs(params["fc"]["kernel"]).max() > 0.9 * bound
    np.testing.assert_array_equal(params["fc"]["bias"], 0.0)


def test_batch_norm_momentum_and_epsilon():
    model = get_model("resnet8", NUM_CLASSES)
    variables = random_variables(model, 12)
    variables["batch_stats"]["stem_bn"]["var"] = jnp.zeros(16).at[0].set(4.0)
    x = _images((2, 8, 8, 3))
    _, state = model.apply(variables, x, capture_intermediates=True,
                           mutable=["intermediates"])
    conv = state["intermediates"]["stem_conv"]["__call__"][0]
    bn = state["intermediates"]["stem_bn"]["__call__"][0]
    params, stats = variables["params"]["stem_bn"], variables["batch_stats"]["stem_bn"]
    expected = ((conv - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * params["scale"]
                + params["bias"])
    np.testing.assert_allclose(bn, expected, rtol=1e-5, atol=1e-5)

    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    new_mean = updates["batch_stats"]["stem_bn"]["mean"]
    np.testing.assert_allclose(new_mean, 0.9 * stats["mean"] + 0.1 * conv.mean(axis=(0, 1, 2)),
                               rtol=1e-5, atol=1e-6)


def _halvings(size, floor, *steps):
    """size halved cumulatively by each step count (floor or ceil division)."""
    out = []
    for k in steps:
        size = size // 2 ** k if floor else -(-size // 2 ** k)
        out.append(size)
    return out


def _expected_spatial(name, size):
    """Spatial size of each 4-d tap (stem included where there is one) for a size x size
    input: floor for max-pools without padding, ceil for padded stride-2 convs/pools."""
    if name in ("vgg6", "vgg11_cifar", "vgg16_cifar"):
        return _halvings(size, True, 0, 1, 1, 1, 1)
    if name.startswith("vgg"):
        return _halvings(size, True, 0, 1, 1, 1, 0)
    if name.startswith("mobilenet"):
        return _halvings(size, False, 0, 0, 1, 1, 1, 1)
    if name in ("resnet18", "resnet34", "resnet50"):  # conv 7x7/2 then max-pool 3x3/2
        return _halvings(size, False, 2, 0, 1, 1, 1)
    if name.endswith("_cifar"):
        return _halvings(size, False, 0, 0, 1, 1, 1)
    return _halvings(size, False, 0, 0, 1, 1)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_runs(name):
    model = get_model(name, NUM_CLASSES)
    for shape in ((2, 32, 32, 3), (2, 28, 28, 1)):
        variables = random_variables(model, in_channels=shape[-1])
        logits, feats = model.apply(variables, _images(shape))
        assert logits.shape == (2, NUM_CLASSES)
        assert tuple(feats) == model.taps()
        spatial = [f.shape[1] for f in feats.values() if f.ndim == 4]
        assert spatial == _expected_spatial(name, shape[1])
        assert feats["embedding"].shape == (2, feats[model.taps()[-2]].shape[-1])
        assert bool(jnp.all(jnp.isfinite(logits)))


def _reference_conv3x3(x, kernel, stride):
    """PyTorch-style conv (zero padding 1 on every side) in numpy: NHWC x HWIO."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out_h = (x.shape[1] + 2 - 3) // stride + 1
    out_w = (x.shape[2] + 2 - 3) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
    for di in range(3):
        for dj in range(3):
            window = padded[:, di:di + stride * out_h:stride, dj:dj + stride * out_w:stride]
            out += window @ kernel[di, dj]
    return out


def test_strided_conv_uses_symmetric_padding():
    model = get_model("resnet8", NUM_CLASSES)
    variables = random_variables(model, 13)
    (_, feats), state = model.apply(variables, _images((2, 8, 8, 3)),
                                    capture_intermediates=True, mutable=["intermediates"])
    conv_out = state["intermediates"]["stage2_block0"]["conv1"]["__call__"][0]
    kernel = variables["params"]["stage2_block0"]["conv1"]["kernel"]
    expected = _reference_conv3x3(feats["stage1"], kernel, stride=2)
    np.testing.assert_allclose(conv_out, expected, rtol=1e-4, atol=1e-4)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_model("resnet9000", 10)
    for name in MODEL_NAMES:
        assert name in str(err.value)


def test_bad_widths():
    with pytest.raises(ValueError, match="stage1.block0"):
        get_model("resnet20", 10, widths={"stem": 8})  # resnet20 has no "stem" group
    with pytest.raises(ValueError, match="positive"):
        get_model("vgg8", 10, widths={"stage1.conv0": 0})
    model = get_model("resnet20", 10, widths={"stage2": 7, "stage1.block0": 3})
    assert model.widths == (("stage1.block0", 3), ("stage2", 7))
    assert models.mask_groups(model)["stage2"] == 7


def test_mask_groups_coupling():
    unbound = get_model("resnet8x4", 10)
    assert unbound.mask_groups() == models.mask_groups(unbound)
    assert "stem" not in models.mask_groups(get_model("resnet20", 10))
    assert "stem" not in models.mask_groups(get_model("wrn_16_1", 10))
    assert models.mask_groups(get_model("resnet8x4", 10))["stem"] == 32
    assert models.mask_groups(get_model("wrn_40_2", 10))["stem"] == 16
    assert list(models.mask_groups(get_model("vgg8", 10))) == [
        f"stage{s}.conv0" for s in range(1, 6)]


def test_bad_masks_rejected():
    model = get_model("resnet8", 10)
    variables = random_variables(model)
    x = _images((1, 8, 8, 3))
    masks = _ones_masks(model)
    with pytest.raises(ValueError, match="missing"):
        model.apply(variables, x, masks={k: v for k, v in masks.items() if k != "stage2"})
    with pytest.raises(ValueError, match="unexpected"):
        model.apply(variables, x, masks={**masks, "stem": jnp.ones(16)})
    with pytest.raises(ValueError, match="shape"):
        model.apply(variables, x, masks={**masks, "stage2": jnp.ones(31)})


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "vgg8"])
def test_all_ones_masks_exact(name):
    model = get_model(name, NUM_CLASSES)
    variables = random_variables(model, 3)
    x = _images((2, 16, 16, 3))
    plain = model.apply(variables, x)
    masked = model.apply(variables, x, masks=_ones_masks(model))
    jax.tree.map(np.testing.assert_array_equal, plain, masked)


def _zero_channel(model, group, channel):
    masks = _ones_masks(model)
    masks[group] = masks[group].at[channel].set(0.0)
    return masks


@pytest.mark.parametrize("name,group,taps", [
    ("resnet8x4", "stem", ["stem"]),
    ("resnet8x4", "stage2", ["stage2"]),
    ("resnet20", "stage1", ["stem", "stage1"]),
    ("vgg8", "stage3.conv0", ["stage3"]),
    ("wrn_16_2", "stage2", ["stage2"]),
    ("wrn_16_1", "stage1", ["stem", "stage1"]),
    ("wrn_16_2", "stage3", ["stage3", "embedding"]),
    ("resnet18", "stage1", ["stem", "stage1"]),
    ("resnet50", "stem", ["stem"]),
    ("resnet50", "stage2", ["stage2"]),
    ("mobilenet9", "stage2.block1", ["stage2"]),
    ("vgg16_cifar", "stage3.conv2", ["stage3"]),
])
def test_zeroed_stream_channel_in_taps(name, group, taps):
    model = get_model(name, NUM_CLASSES)
    variables = random_variables(model, 4)
    x = _images((2, 16, 16, 3))
    _, feats = model.apply(variables, x, masks=_zero_channel(model, group, 5))
    for tap in taps:
        assert bool(jnp.all(feats[tap][..., 5] == 0)), tap
        assert bool(jnp.any(feats[tap][..., 4] != 0)), tap


def test_zeroed_inner_channel_is_dead():
    """A masked inner channel of a projection block cannot influence anything downstream."""
    model = get_model("resnet8x4", NUM_CLASSES)
    variables = random_variables(model, 5)
    x = _images((2, 16, 16, 3))
    masks = _zero_channel(model, "stage2.block0", 7)

    def perturb(path, leaf):
        keys = [p.key for p in path]
        if keys[:2] != ["params", "stage2_block0"]:
            return leaf
        if keys[2] == "conv1":
            return leaf.at[..., 7].add(5.0)
        return leaf.at[7].add(9.0) if keys[2] == "bn1" else leaf

    perturbed = jax.tree_util.tree_map_with_path(perturb, variables)
    before = model.apply(variables, x, masks=masks)
    after = model.apply(perturbed, x, masks=masks)
    jax.tree.map(np.testing.assert_array_equal, before, after)
    unmasked_before, _ = model.apply(variables, x)
    unmasked_after, _ = model.apply(perturbed, x)
    assert not np.allclose(unmasked_before, unmasked_after)


# --- deletion equivalence -------------------------------------------------------

def _variable_shapes(model):
    return jax.tree.map(lambda a: a.shape,
                        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3))))


@pytest.mark.parametrize("name", ["resnet8x4", "resnet20", "vgg8", "wrn_16_2", "wrn_16_1"])
def test_deletion_equivalence(name):
    model = get_model(name, NUM_CLASSES)
    variables = random_variables(model, 7)
    masks = _random_masks(model, 8)
    x = _images((2, 8, 8, 3))

    small, small_vars = compact(model, variables, masks)
    assert small == get_model(name, NUM_CLASSES,
                              widths={g: int(m.sum()) for g, m in masks.items()})
    assert jax.tree.map(jnp.shape, small_vars) == _variable_shapes(small)

    masked_logits, _ = model.apply(variables, x, masks=masks)
    small_logits, _ = jax.jit(small.apply)(small_vars, x)  # one compile beats many eager ones
    np.testing.assert_allclose(small_logits, masked_logits, rtol=1e-5, atol=1e-5)
    full_logits, _ = model.apply(variables, x)
    assert not np.allclose(full_logits, masked_logits, atol=1e-3)


# --- vmap, splits, train mode ---------------------------------------------------

def test_vmap_over_mask_population():
    model = get_model("resnet8", NUM_CLASSES)
    variables = random_variables(model, 9)
    x = _images((2, 16, 16, 3))
    population = [_random_masks(model, seed) for seed in range(3)]
    stacked = jax.tree.map(lambda *m: jnp.stack(m), *population)
    batched = jax.vmap(lambda m: model.apply(variables, x, masks=m)[0])(stacked)
    assert batched.shape == (3, 2, NUM_CLASSES)
    for i, masks in enumerate(population):
        np.testing.assert_allclose(batched[i], model.apply(variables, x, masks=masks)[0],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "vgg8", "resnet18", "mobilenet9",
                                  "vgg11_cifar"])
def test_start_stop_compose(name):
    model = get_model(name, NUM_CLASSES)
    variables = random_variables(model, 10)
    masks = _random_masks(model, 11)
    x = _images((2, 16, 16, 3))
    logits, feats = model.apply(variables, x, masks=masks)

    taps = model.taps()
    h, previous = x, None
    for tap in taps:
        out, part = model.apply(variables, h, masks=masks, start=previous, stop=tap)
        assert out is None and list(part)[-1] == tap
        np.testing.assert_allclose(part[tap], feats[tap], rtol=1e-5, atol=1e-6)
        h, previous = part[tap], tap
    tail, rest = model.apply(variables, h, masks=masks, start=taps[-1])
    assert rest == {}
    np.testing.assert_allclose(tail, logits, rtol=1e-5, atol=1e-6)

    mid = taps[1]
    out, part = model.apply(variables, feats[mid], masks=masks, start=mid)
    assert list(part) == list(taps[2:])
    np.testing.assert_allclose(out, logits, rtol=1e-5, atol=1e-6)


def test_start_stop_validation():
    model = get_model("resnet8", NUM_CLASSES)
    variables = random_variables(model)
    x = _images((1, 8, 8, 3))
    with pytest.raises(ValueError, match="not a tap"):
        model.apply(variables, x, stop="stage4")
    with pytest.raises(ValueError, match="after"):
        model.apply(variables, x, start="stage2", stop="stage1")


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "vgg16_cifar", "mobilenet9"])
def test_train_mode_updates_batch_stats(name):
    model = get_model(name, NUM_CLASSES)
    variables = random_variables(model)
    x = _images((4, 16, 16, 3))
    (logits, feats), updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (4, NUM_CLASSES) and tuple(feats) == model.taps()
    old = jax.tree.leaves(variables["batch_stats"])
    new = jax.tree.leaves(updates["batch_stats"])
    assert len(old) == len(new) > 0
    assert all(not np.allclose(a, b) for a, b in zip(old, new))
