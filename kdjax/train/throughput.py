"""Throughput figures as TPU codebases report them: images/s per device and model
FLOPs utilisation (MFU).

MFU = achieved model FLOP/s per device ÷ the device's peak FLOP/s for the compute
dtype, with model FLOPs counted analytically (kdjax.pruning.cost MACs, 2 FLOPs per
MAC): a forward pass costs 2·MACs per image and a training step 3× its forward
(backward ≈ 2× forward), so a KD step costs 2·MACs_teacher + 6·MACs_student per
image (teacher forward + 3× student forward). Rematerialisation, BN, softmax and
data movement are not counted, as is usual for MFU.

Peak dense (no sparsity) FLOP/s per chip, from the vendors' spec sheets:
  TPU v4 275 TFLOP/s bf16      cloud.google.com/tpu/docs/v4
  TPU v5e 197 TFLOP/s bf16     cloud.google.com/tpu/docs/v5e
  TPU v5p 459 TFLOP/s bf16     cloud.google.com/tpu/docs/v5p
  TPU v6e 918 TFLOP/s bf16     cloud.google.com/tpu/docs/v6e
  A100 (SXM4 and PCIe) 312 bf16, 156 TF32 tensor core
                               NVIDIA A100 Tensor Core GPU datasheet
  H100 SXM5 989 bf16, 495 TF32; H100 PCIe 756 bf16, 378 TF32
                               NVIDIA H100 Tensor Core GPU datasheet
  H200 SXM 989 bf16, 495 TF32  NVIDIA H200 Tensor Core GPU datasheet
float32 rows: Google publishes no float32 peak for its TPUs; at JAX's default
precision float32 matmuls and convolutions run on the same matrix units as
bfloat16 (one bf16 pass), so the bf16 figure is the ceiling used for both. On
NVIDIA GPUs JAX's default precision lets float32 matmuls/convolutions use TF32
tensor cores, so the TF32 figure is used (with precision "highest" the ceiling
would be the much lower plain-FP32 rate: 19.5 / 67 / 51 TFLOP/s for A100 /
H100 SXM / H100 PCIe).
"""

from __future__ import annotations

UNKNOWN_DEVICE = "unknown device: MFU not shown"
VALID_DTYPES = ("float32", "bfloat16")

# (lower-case substring of jax's device_kind, name, {dtype: peak TFLOP/s}); the
# first match wins, so more specific names come first.
PEAK_TFLOPS = (
    ("tpu v6 lite", "TPU v6e", {"bfloat16": 918.0, "float32": 918.0}),
    ("tpu v6e", "TPU v6e", {"bfloat16": 918.0, "float32": 918.0}),
    ("tpu v5 lite", "TPU v5e", {"bfloat16": 197.0, "float32": 197.0}),
    ("tpu v5e", "TPU v5e", {"bfloat16": 197.0, "float32": 197.0}),
    ("tpu v5", "TPU v5p", {"bfloat16": 459.0, "float32": 459.0}),
    ("tpu v4", "TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
    ("h200", "H200", {"bfloat16": 989.0, "float32": 495.0}),
    ("h100 pcie", "H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("h100", "H100 SXM", {"bfloat16": 989.0, "float32": 495.0}),
    ("a100", "A100", {"bfloat16": 312.0, "float32": 156.0}),
)


def check_dtype(dtype: str) -> None:
    """ValueError unless ``dtype`` is a compute dtype kdjax supports."""
    if dtype not in VALID_DTYPES:
        raise ValueError(f"unknown compute dtype {dtype!r}; valid: {', '.join(VALID_DTYPES)}")


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Peak FLOP/s of one device of ``device_kind`` (jax's ``Device.device_kind``) for
    ``dtype``; None when the device is not in the table (CPUs, other accelerators)."""
    check_dtype(dtype)
    kind = device_kind.lower()
    for key, _, peaks in PEAK_TFLOPS:
        if key in kind:
            return peaks[dtype] * 1e12
    return None


def train_flops_per_image(student_macs: int, teacher_macs: int = 0) -> int:
    """Model FLOPs of one training image: 3 × student forward (2·MACs) + teacher forward."""
    return 6 * student_macs + 2 * teacher_macs


def mfu(images_per_sec_per_device: float, flops_per_image: float,
        peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] (None when the peak is unknown)."""
    if peak is None:
        return None
    return images_per_sec_per_device * flops_per_image / peak


def describe(images_per_sec: float, num_devices: int, flops_per_image: float,
             peak: float | None) -> str:
    """``'123 img/s/device MFU 41.2%'`` (or the unknown-device note) for a log line."""
    per_device = images_per_sec / num_devices
    util = mfu(per_device, flops_per_image, peak)
    shown = UNKNOWN_DEVICE if util is None else f"MFU {100 * util:.1f}%"
    return f"{per_device:.0f} img/s/device {shown}"
