"""ImageNet-scale features: throughput/MFU reporting, bf16 compute, ImageNet presets."""

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
