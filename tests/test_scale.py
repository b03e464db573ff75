"""ImageNet-scale features: throughput/MFU reporting, bf16 compute, ImageNet presets."""

import json

import numpy as np
import pytest

from kdjax.train import throughput


@pytest.mark.parametrize("kind, dtype, tflops", [
    # Spec-sheet figures (dense), jax device_kind strings as the runtimes report them.
    ("TPU v4", "bfloat16", 275), ("TPU v5 lite", "bfloat16", 197),
    ("TPU v5p", "bfloat16", 459), ("TPU v6 lite", "bfloat16", 918),
    ("TPU v4", "float32", 275),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312), ("NVIDIA A100-SXM4-40GB", "float32", 156),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989), ("NVIDIA H100 PCIe", "bfloat16", 756),
    ("NVIDIA H200", "bfloat16", 989), ("NVIDIA H200", "float32", 495),
])
def test_peak_table(kind, dtype, tflops):
    assert throughput.peak_flops(kind, dtype) == pytest.approx(tflops * 1e12)


def test_unknown_device_and_bad_dtype():
    assert throughput.peak_flops("cpu", "float32") is None
    assert throughput.describe(800.0, 8, 1e9, None) == (
        "100 img/s/device unknown device: MFU not shown")
    with pytest.raises(ValueError, match="float32, bfloat16"):
        throughput.peak_flops("TPU v4", "float16")


def test_mfu_closed_form():
    # ResNet-34 -> ResNet-18 at 224px: 3.6 and 1.8 GMACs (torchvision's published
    # counts); 2500 img/s on 8 devices of 275 TFLOP/s.
    flops = throughput.train_flops_per_image(student_macs=1.8e9, teacher_macs=3.6e9)
    assert flops == pytest.approx(2 * 3.6e9 + 3 * 2 * 1.8e9)
    util = throughput.mfu(2500 / 8, flops, 275e12)
    assert util == pytest.approx(312.5 * 18e9 / 275e12)
    assert throughput.describe(2500, 8, flops, 275e12) == "312 img/s/device MFU 2.0%"


def test_bench_prints_per_device_and_mfu_columns(capsys):
    from kdjax import bench

    assert bench.main(["--pairs", "resnet8:resnet8", "--repeats", "1", "--warmup", "1",
                       "--batch", "8", "--classes", "10", "--image", "16", "16", "3",
                       "--peak-size", "64"]) == 0
    out = capsys.readouterr().out
    assert throughput.UNKNOWN_DEVICE in out  # CPU: no spec-sheet peak
    header = next(line for line in out.splitlines() if line.startswith("| step"))
    assert "img/s/device" in header and "MFU" in header
    rows = [line for line in out.splitlines()
            if line.startswith("| resnet8") or line.startswith("| KD")]
    assert len(rows) == 3, out


# ----------------------------------------------------------------------------
# bf16 compute


def _np_kd(zs, zt, t):
    """float64 NumPy reference of T²·KL(softmax(zt/T) ‖ softmax(zs/T)), batch mean."""
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    lp, lq = log_softmax(zt / t), log_softmax(zs / t)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)) * t * t)


def _np_gram_loss(sa, sb, ta, tb):
    """float64 reference of mean_jk (G_s - G_t)² with G = A^T B / (H W), same sizes."""
    def gram(a, b):
        n, h, w, _ = a.shape
        return np.einsum("nsi,nsj->nij", a.reshape(n, h * w, -1), b.reshape(n, h * w, -1)) / (h * w)
    d = gram(sa, sb) - gram(ta, tb)
    return float(np.mean(d.reshape(len(d), -1) ** 2))


def test_kd_and_gram_losses_on_bf16_inputs():
    import jax.numpy as jnp

    from kdjax import losses
    from kdjax.train import precision

    rng = np.random.default_rng(0)
    # Logits and ReLU features of the sizes a bf16 ImageNet model produces.
    zs, zt = (rng.normal(0, 8, (16, 1000)) for _ in range(2))
    feats = [np.maximum(rng.normal(0, 4, (4, 8, 8, 64)), 0) for _ in range(4)]
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)
    # Raw bf16 inputs: finite.
    assert np.isfinite(float(losses.kd_loss(bf(zs), bf(zt), 4.0)))
    assert np.isfinite(float(losses.cross_layer_gram_loss(*map(bf, feats))))
    # As the train step computes them: bf16 outputs cast to float32, then the loss in
    # float32 equals the float64 reference on the same (bf16-rounded) values.
    up = lambda a: precision.cast_floating(bf(a), jnp.float32)
    rounded = lambda a: np.asarray(up(a), np.float64)
    assert float(losses.kd_loss(up(zs), up(zt), 4.0)) == pytest.approx(
        _np_kd(rounded(zs), rounded(zt), 4.0), rel=1e-4)
    assert float(losses.cross_layer_gram_loss(*map(up, feats))) == pytest.approx(
        _np_gram_loss(*map(rounded, feats)), rel=1e-4)


def test_bf16_forward_casts_and_keeps_float32_statistics():
    import jax
    import jax.numpy as jnp

    import flax.linen as nn

    from kdjax import models
    from kdjax.train import precision

    model = models.get_model("resnet8", 10)
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 16, 3))
    variables = model.init(jax.random.PRNGKey(1), x)
    seen = []

    def record(next_fun, args, kwargs, context):  # the dtype every conv computes in
        if context.method_name == "__call__" and type(context.module).__name__ == "Conv":
            seen.append(args[0].dtype)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        (logits, feats), updates = precision.apply(
            model, variables, x, jnp.bfloat16, train=True, mutable=["batch_stats"])
    assert seen and all(d == jnp.bfloat16 for d in seen)
    assert logits.dtype == jnp.float32
    assert all(f.dtype == jnp.float32 for f in jax.tree.leaves(feats))
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(updates))
    with pytest.raises(ValueError, match="float32, bfloat16"):
        precision.compute_dtype("float16")


# ----------------------------------------------------------------------------
# ImageNet presets: the first steps on TFDS's mock imagenet2012, streamed


def shrink_batches(section, size=8):
    """Every ``batch_size`` in a config (nested sections included) set to ``size``."""
    for key, value in section.items():
        if key == "batch_size":
            section[key] = size
        elif hasattr(value, "items"):
            shrink_batches(value, size)


def imagenet_smoke(name, preset="imagenet", models=None, steps=2, **sections):
    """``configs/<name>.py:<preset>`` cut to ``steps`` steps of batch 8 at 16x16 on mock
    data; ``models`` = {dotted key: tiny zoo model} overrides; ``sections`` update
    config sections (e.g. emo=dict(...))."""
    from test_train import load_config

    config = load_config(name, preset)
    config.data.update(dict(image_size=16, validation_size=8, num_workers=0))
    config.train.update(dict(max_steps=steps, eval_batch_size=16, log_every_steps=1,
                             num_devices=1))
    shrink_batches(config)
    for key, model in (models or {}).items():
        section, field = key.rsplit(".", 1)
        config[section][field] = model
    for section, values in sections.items():
        config[section].update(values)
    return config


def run_on_mock_imagenet(config, workdir):
    import tensorflow_datasets as tfds

    from kdjax import main as kdjax_main

    kdjax_main.validate(config)
    with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
        return kdjax_main.PIPELINES[config.pipeline](config, workdir)


def test_dynamic_kd_imagenet_preset_first_steps(tmp_path, caplog):
    config = imagenet_smoke("dynamic_kd", models={"teacher.name": "resnet8",
                                                  "student.name": "resnet8"})
    assert config.data.source == "tfds_stream" and config.data.augment == "inception_crop"
    with caplog.at_level("INFO", logger="kdjax"):
        run_on_mock_imagenet(config, tmp_path)
    for stage in ("teacher", "dynamic_kd"):
        saved = json.loads((tmp_path / stage / "results.json").read_text())
        assert saved["steps"] == 2
    # The progress line carries images/s per device and the MFU note (CPU: no peak).
    progress = [r.getMessage() for r in caplog.records if "step 2/2" in r.getMessage()]
    assert progress and all(f"img/s/device {throughput.UNKNOWN_DEVICE}" in line
                            for line in progress), progress


def test_progress_line_shows_throughput():
    from kdjax.train import metrics

    line = metrics.progress_line("kd", 10, 100, 0.5, {"loss": 1.0}, 2500.0, 90.0,
                                 throughput.describe(2500.0, 8, 18e9, 275e12))
    assert line == ("[kd] step 10/100 epoch 0.50 loss 1 2500 img/s "
                    "(312 img/s/device MFU 2.0%) ETA 1m30s")


@pytest.mark.slow
def test_emo_pms_imagenet_preset_first_steps(tmp_path):
    config = imagenet_smoke(
        "emo_pms", models={"teacher.name": "resnet8"},
        emo=dict(population=4, generations=1, candidates_per_subnet=2, eval_batch=8,
                 impairment_examples=8, selector_steps=2, constraint_steps=1,
                 boundaries=("stage2",)))
    assert config.target_flops_ratio == 0.5
    run_on_mock_imagenet(config, tmp_path)
    saved = json.loads((tmp_path / "emo_pms" / "results.json").read_text())
    assert saved["pruned"]["retained_macs_ratio"] <= 0.5 + 1e-9


def _bf16_setup(batch_size=32, shape=(16, 16, 3)):
    """resnet8 (10 classes), SGD, a fixed learnable synthetic batch."""
    import jax

    from kdjax import config_lib, data, models
    from kdjax.train import optim

    model = models.get_model("resnet8", 10)
    source = data.synthetic_source(batch_size, shape, 10, seed=0)
    batch = {"image": data.normalize(source.images, (0.5,) * 3, (0.5,) * 3),
             "label": source.labels}
    variables = model.init(jax.random.PRNGKey(0), batch["image"][:1])
    tx = optim.sgd(config_lib.optim(lr=0.05, milestones=()), steps_per_epoch=100)
    return model, variables, tx, batch


def test_bf16_step_matches_float32_loss_and_keeps_float32_state():
    import jax
    import jax.numpy as jnp

    from kdjax import config_lib, distill
    from kdjax.train.state import TrainState, make_train_step

    model, variables, tx, batch = _bf16_setup()
    teacher_vars = model.init(jax.random.PRNGKey(5), batch["image"][:1])
    method = distill.make_method(config_lib.distill("kd"), student_taps=model.taps(),
                                 teacher_taps=model.taps())
    kd = distill.objective(method, method.default_ce_weight)  # 0.1·CE + 0.9·T²·KL, T = 4
    losses_by_dtype = {}
    for dtype in ("float32", "bfloat16"):
        state = TrainState.create(variables, tx, jax.random.PRNGKey(1))
        step = jax.jit(make_train_step(model, tx, kd, teacher=model, compute_dtype=dtype))
        new_state, metrics = step(state, batch, teacher_vars)
        losses_by_dtype[dtype] = float(metrics["loss"])
        # Parameters, optimizer state and BN statistics stay float32.
        floats = [x for x in jax.tree.leaves((new_state.params, new_state.opt_state,
                                              new_state.batch_stats))
                  if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floats and all(x.dtype == jnp.float32 for x in floats)
    # Tolerance: bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2 %); through
    # resnet8's 8 weight layers the logits move by about a percent of their size, and the
    # loss (≈ 2.4 at initialisation) by well under 2 %.
    assert losses_by_dtype["bfloat16"] == pytest.approx(losses_by_dtype["float32"], rel=0.02)
    assert losses_by_dtype["bfloat16"] != losses_by_dtype["float32"]  # bf16 really ran


def test_short_bf16_run_trains():
    import jax

    from kdjax.pipelines import common
    from kdjax.train.state import TrainState, make_train_step

    model, variables, tx, batch = _bf16_setup()
    state = TrainState.create(variables, tx, jax.random.PRNGKey(1))
    step = jax.jit(make_train_step(model, tx, common.supervised_objective,
                                   compute_dtype="bfloat16"))
    history = []
    for _ in range(15):
        state, metrics = step(state, batch)
        history.append(float(metrics["loss"]))
    assert np.all(np.isfinite(history))
    assert np.mean(history[-3:]) < 0.7 * np.mean(history[:3]), history


@pytest.mark.parametrize("name, preset, models_used", [
    ("dynamic_kd", "imagenet", {"resnet34", "resnet18"}),
    ("emo_pms", "imagenet", {"resnet50"}),
    ("cascaded", "resnet50_imagenet", {"resnet50"}),
    ("cross_layer", "imagenet64_mobilenet", {"mobilenet9"}),  # teachers: own section
])
def test_imagenet_presets_name_the_published_recipe(name, preset, models_used):
    from kdjax import main as kdjax_main
    from test_train import load_config

    from kdjax import models

    config = load_config(name, preset)
    named = {m for _, m in kdjax_main.model_name_keys(config)}
    assert named == models_used and named <= set(models.MODEL_NAMES)
    assert config.data.source == "tfds_stream" and config.data.test_split == "validation"
    if name == "cross_layer":  # 64x64 downsampled ImageNet, stored at its training size
        assert (config.data.name, config.data.image_size, config.data.augment) == (
            "imagenet_resized/64x64", 64, "crop_flip")
    else:
        assert (config.data.name, config.data.image_size) == ("imagenet2012", 224)
    if name == "dynamic_kd":
        o = config.optim
        assert (o.epochs, o.batch_size, o.lr, tuple(o.milestones), o.weight_decay) == (
            100, 256, 0.1, (30, 60, 90), 1e-4)


@pytest.mark.slow
def test_cascaded_imagenet_preset_first_steps(tmp_path):
    config = imagenet_smoke("cascaded", "resnet50_imagenet", models={"teacher.name": "resnet8"},
                            cascade=dict(num_tas=1, num_events=1, prune_every_epochs=1 / 3))
    config.cascade.finetune.epochs = 1  # main.validate refuses the preset's 0 (see report)
    config.train.compute_dtype = "bfloat16"  # the joint cascade step in bf16 as well
    run_on_mock_imagenet(config, tmp_path)
    assert (tmp_path / "summary.json").exists()


@pytest.mark.slow
def test_cross_layer_imagenet64_preset_first_steps(tmp_path):
    """The ImageNet-64 preset's whole pipeline (two mobilenet16 teachers, Gram stage,
    ensemble stage) on mock ``imagenet_resized/64x64``, whose test split is TFDS's
    ``validation``."""
    config = imagenet_smoke("cross_layer", "imagenet64_mobilenet")
    config.data.image_size = 64  # crop_flip streams images at their stored 64×64
    assert (config.data.name, config.data.test_split) == ("imagenet_resized/64x64",
                                                           "validation")
    assert config.teachers == ("mobilenet16@0", "mobilenet16@1")
    run_on_mock_imagenet(config, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"teacher_0", "teacher_1", "ensemble", "stage1", "stage2"} <= set(summary)
    for stage in ("teacher_0", "teacher_1", "stage1", "stage2"):
        saved = json.loads((tmp_path / stage / "results.json").read_text())
        assert saved["steps"] == 2, stage
