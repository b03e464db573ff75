"""Building blocks shared by the model zoo.

Layers follow PyTorch semantics so that published CIFAR recipes transfer:
3x3 convolutions use explicit padding 1 (never 'SAME', which pads differently
at stride 2), BatchNorm uses momentum 0.9 (Flax convention, i.e. 0.1 in PyTorch
terms) and epsilon 1e-5, conv kernels are Kaiming-normal over fan-out, and the
classifier uses PyTorch's default uniform bound 1/sqrt(fan_in) with a zero bias.

All activations are NHWC. Masks are per-channel float vectors multiplied onto
the last axis (see `apply_mask`).
"""

from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models import conv_grad

CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
DENSE_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

Widths = tuple[tuple[str, int], ...]


def conv3x3(features: int, stride: int = 1, use_bias: bool = False,
            name: str | None = None) -> nn.Conv:
    """3x3 convolution, padding 1: [B, H, W, Cin] -> [B, ceil(H/s), ceil(W/s), features]."""
    return nn.Conv(features, (3, 3), strides=(stride, stride),
                   padding=((1, 1), (1, 1)), use_bias=use_bias,
                   kernel_init=CONV_INIT, conv_general_dilated=conv_grad.current_conv(),
                   name=name)


def conv1x1(features: int, stride: int = 1, name: str | None = None) -> nn.Conv:
    """Bias-free 1x1 convolution: [B, H, W, Cin] -> [B, ceil(H/s), ceil(W/s), features]."""
    return nn.Conv(features, (1, 1), strides=(stride, stride),
                   padding=((0, 0), (0, 0)), use_bias=False,
                   kernel_init=CONV_INIT, conv_general_dilated=conv_grad.current_conv(),
                   name=name)


def depthwise3x3(channels: int, stride: int = 1, name: str | None = None) -> nn.Conv:
    """Bias-free depthwise 3x3 convolution, padding 1 (one filter per channel):
    [B, H, W, channels] -> [B, ceil(H/s), ceil(W/s), channels]; kernel [3, 3, 1, channels]."""
    return nn.Conv(channels, (3, 3), strides=(stride, stride),
                   padding=((1, 1), (1, 1)), feature_group_count=channels,
                   use_bias=False, kernel_init=CONV_INIT, name=name)


def batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
    """BatchNorm over the channel axis; batch statistics when `train`, running ones otherwise."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                        epsilon=1e-5, name=name)


def dense(features: int, name: str) -> nn.Dense:
    """Linear layer, PyTorch-style kernel init and a zero bias: [B, C] -> [B, features]."""
    return nn.Dense(features, kernel_init=DENSE_INIT,
                    bias_init=nn.initializers.zeros, name=name)


def classifier(num_classes: int, name: str = "fc") -> nn.Dense:
    """Linear head: [B, C] -> [B, num_classes]."""
    return dense(num_classes, name)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over all spatial positions: [B, H, W, C] -> [B, C]."""
    return jnp.mean(x, axis=(1, 2))


def max_pool2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, floor semantics: [B, H, W, C] -> [B, H//2, W//2, C]."""
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def group_mask(masks: Mapping[str, jax.Array] | None,
               group: str) -> jax.Array | None:
    """The [C] mask of `group`, or None when running unmasked."""
    return None if masks is None else masks[group]


def apply_mask(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Multiply channels by a mask: x [..., C], mask [C] or None (identity)."""
    return x if mask is None else x * mask.astype(x.dtype)


def check_masks(masks: Mapping[str, jax.Array] | None,
                groups: Mapping[str, int]) -> None:
    """Raise ValueError unless `masks` is None or holds exactly `groups`, each of shape (C,)."""
    if masks is None:
        return
    missing = [g for g in groups if g not in masks]
    extra = sorted(set(masks) - set(groups))
    if missing or extra:
        raise ValueError(f"masks must hold exactly the model's mask groups; "
                         f"missing {missing}, unexpected {extra}")
    for group, channels in groups.items():
        shape = jnp.shape(masks[group])
        if shape != (channels,):
            raise ValueError(f"mask for group {group!r} has shape {shape}, "
                             f"expected ({channels},)")


def widths_tuple(widths: Mapping[str, int] | None) -> Widths:
    """Width overrides as a hashable, sorted tuple of (group, channels) pairs."""
    if widths is None:
        return ()
    return tuple(sorted((str(g), int(c)) for g, c in widths.items()))


class ZooModel(nn.Module):
    """Shared interface of the zoo's networks (subclasses define the fields).

    Subclasses set the class constant ``TAPS`` (feature taps in forward order), a
    ``widths`` field (sorted (group, channels) overrides), ``unpruned_groups()`` and
    ``segments()``; the masked, splittable ``__call__`` is shared.
    """

    TAPS = ()  # class constant (not annotated, so not a dataclass field)

    def unpruned_groups(self) -> dict[str, int]:
        """Mask group -> channels of the architecture before any width override."""
        raise NotImplementedError

    def mask_groups(self) -> dict[str, int]:
        """Group name -> channel count (width overrides applied), in forward order."""
        return resolve_widths(self.unpruned_groups(), self.widths)

    def taps(self) -> tuple[str, ...]:
        """Feature tap names in forward order."""
        return self.TAPS

    def segments(self, groups: dict[str, int], masks: Mapping[str, jax.Array] | None,
                 train: bool) -> tuple[Callable[[jax.Array], jax.Array], ...]:
        """The forward pass as one callable per tap of ``TAPS`` (producing that tap from
        the previous one), then one producing the logits (see `run_segments`). Called
        inside ``__call__``, so the callables may create submodules."""
        raise NotImplementedError

    @nn.compact
    def __call__(self, x: jax.Array, masks: Mapping[str, jax.Array] | None = None,
                 train: bool = False, start: str | None = None,
                 stop: str | None = None):
        """Forward pass from `start` (None: image) to `stop` (None: logits).

        Returns (logits [B, num_classes] or None if stopped at a tap, features).
        """
        groups = self.mask_groups()
        check_masks(masks, groups)
        return run_segments(self.TAPS, self.segments(groups, masks, train), x, start, stop)


def resolve_widths(defaults: Mapping[str, int], overrides: Widths) -> dict[str, int]:
    """Default group widths with `overrides` applied, keeping the order of `defaults`.

    Raises ValueError for an unknown group or a non-positive width.
    """
    unknown = sorted(g for g, _ in overrides if g not in defaults)
    if unknown:
        raise ValueError(f"unknown mask groups in widths: {unknown}; "
                         f"valid groups: {list(defaults)}")
    bad = [(g, c) for g, c in overrides if c < 1]
    if bad:
        raise ValueError(f"widths must be positive, got {bad}")
    resolved = dict(defaults)
    resolved.update(overrides)
    return resolved


def run_segments(taps: Sequence[str], segments: Sequence[Callable[[jax.Array], jax.Array]],
                 h: jax.Array, start: str | None, stop: str | None
                 ) -> tuple[jax.Array | None, dict[str, jax.Array]]:
    """Run a forward pass split into segments, each ending at a named tap.

    `segments[i]` produces `taps[i]`; one extra final segment produces the
    logits. `start` (a tap name, or None for the input image) means `h` is
    that tap's activation and execution resumes right after it; `stop` (a tap
    name, or None for the logits) ends execution right after that tap.
    Returns (logits or None when stopped early, {tap: activation} in order).
    """
    for arg, value in (("start", start), ("stop", stop)):
        if value is not None and value not in taps:
            raise ValueError(f"{arg}={value!r} is not a tap; taps are {list(taps)}")
    first = 0 if start is None else taps.index(start) + 1
    if stop is not None and taps.index(stop) < first:
        raise ValueError(f"stop={stop!r} does not come after start={start!r}")
    features = {}
    for i in range(first, len(taps)):
        h = segments[i](h)
        features[taps[i]] = h
        if taps[i] == stop:
            return None, features
    return segments[-1](h), features
