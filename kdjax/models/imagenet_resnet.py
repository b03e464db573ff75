"""ResNet-18/34/50 in torchvision's layout (v1.5), with an ImageNet or a CIFAR stem.

Architecture (torchvision's `resnet18/34/50`): stem, four stages of BasicBlocks
(resnet18: 2-2-2-2, resnet34: 3-4-6-3) or Bottlenecks (resnet50: 3-4-6-3) with base
widths 64, 128, 256, 512 and strides 1, 2, 2, 2 (on the first block), global average
pool, Dense. Convs have no bias; every conv is followed by BN.
  ImageNet stem: conv7x7(64, stride 2, padding 3)-BN-ReLU, max-pool 3x3/2 (padding 1).
  CIFAR stem (`*_cifar`): conv3x3(64, stride 1)-BN-ReLU, no max-pool.
  BasicBlock: conv3x3(stride)-BN-ReLU-conv3x3-BN (`kdjax.models.resnet.BasicBlock`).
  Bottleneck (expansion 4): conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU (the stride sits on
    the 3x3 conv, as in torchvision's v1.5), conv1x1(4w)-BN.
  Shortcut: identity, or conv1x1(stride)-BN when the stride is not 1 or the unpruned
    input and output widths differ; the block output is ReLU(main + shortcut).

Mask groups (name -> channels), in order of first production:
  "stem"                 stem output, only when stage 1 starts with a projection (resnet50);
                         otherwise the stem writes the stage-1 stream ("stage1").
  "stageS"               residual stream of stage S (block outputs, projection shortcut
                         output, and the stem output when coupled).
  "stageS.blockB"        BasicBlock B's inner channels (conv1 output).
  "stageS.blockB.conv1", "stageS.blockB.conv2"
                         Bottleneck B's two inner widths (1x1 and 3x3 conv outputs).
Masks multiply the stem output (after BN-ReLU, before the max-pool: the pooled inputs
are ≥ 0, so a zero channel stays zero), every inner BN-ReLU and every block output.

Parameter names (independent of widths; batch_stats mirror the BN entries):
  stem_conv, stem_bn, stage{S}_block{B}: conv1, bn1, conv2, bn2[, conv3, bn3]
  [, shortcut_conv, shortcut_bn], fc.
Feature taps: stem (after the max-pool), stage1..stage4, embedding ([B, C] pooled vector).
"""

from collections.abc import Mapping

import flax.linen as nn
import jax

from kdjax.models import common
from kdjax.models.resnet import BasicBlock, residual_output

TAPS = ("stem", "stage1", "stage2", "stage3", "stage4", "embedding")
STRIDES = (1, 2, 2, 2)
BASE_WIDTHS = (64, 128, 256, 512)
STEM_WIDTH = 64
EXPANSION = {"basic": 1, "bottleneck": 4}

CONFIGS = {
    "resnet18": dict(block="basic", blocks_per_stage=(2, 2, 2, 2), stem_kind="imagenet"),
    "resnet34": dict(block="basic", blocks_per_stage=(3, 4, 6, 3), stem_kind="imagenet"),
    "resnet50": dict(block="bottleneck", blocks_per_stage=(3, 4, 6, 3), stem_kind="imagenet"),
    "resnet18_cifar": dict(block="basic", blocks_per_stage=(2, 2, 2, 2), stem_kind="cifar"),
    "resnet50_cifar": dict(block="bottleneck", blocks_per_stage=(3, 4, 6, 3), stem_kind="cifar"),
}


def stream_width(block: str, s: int) -> int:
    """Unpruned channels of stage S's residual stream."""
    return BASE_WIDTHS[s - 1] * EXPANSION[block]


def has_projection(block: str, s: int, b: int) -> bool:
    """Whether block B of stage S has a conv shortcut (decided by the unpruned widths)."""
    in_width = STEM_WIDTH if s == 1 else stream_width(block, s - 1)
    return b == 0 and (STRIDES[s - 1] != 1 or in_width != stream_width(block, s))


def inner_groups(block: str, s: int, b: int) -> tuple[str, ...]:
    """Names of block B's inner mask groups: one for a BasicBlock, two for a Bottleneck."""
    if block == "basic":
        return (f"stage{s}.block{b}",)
    return (f"stage{s}.block{b}.conv1", f"stage{s}.block{b}.conv2")


def stem_group(block: str) -> str:
    """Mask group written by the stem: "stage1" when coupled, else "stem"."""
    return "stem" if has_projection(block, 1, 0) else "stage1"


def default_groups(block: str, blocks_per_stage: tuple[int, ...]) -> dict[str, int]:
    """Unpruned mask groups, in order of first production."""
    groups = {stem_group(block): STEM_WIDTH}
    for s, n in enumerate(blocks_per_stage, start=1):
        for b in range(n):
            groups.update({g: BASE_WIDTHS[s - 1] for g in inner_groups(block, s, b)})
            groups.setdefault(f"stage{s}", stream_width(block, s))
    return groups


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU, conv1x1-BN + shortcut, ReLU:
    [B, H, W, Cin] -> [B, ceil(H/s), ceil(W/s), out_width]."""

    inner_widths: tuple[int, int]
    out_width: int
    stride: int
    projection: bool

    @nn.compact
    def __call__(self, x: jax.Array, inner_masks: tuple, out_mask: jax.Array | None,
                 train: bool) -> jax.Array:
        h = common.conv1x1(self.inner_widths[0], name="conv1")(x)
        h = nn.relu(common.batch_norm(train, "bn1")(h))
        h = common.apply_mask(h, inner_masks[0])
        h = common.conv3x3(self.inner_widths[1], self.stride, name="conv2")(h)
        h = nn.relu(common.batch_norm(train, "bn2")(h))
        h = common.apply_mask(h, inner_masks[1])
        h = common.conv1x1(self.out_width, name="conv3")(h)
        h = common.batch_norm(train, "bn3")(h)
        return residual_output(h, x, self.stride, self.projection, out_mask, train)


class ResNet(common.ZooModel):
    """torchvision-layout ResNet: [B, H, W, Cin] -> (logits [B, num_classes], features).

    `widths` overrides group widths (sorted (group, channels) pairs), which is
    how a physically pruned network is expressed.
    """

    block: str
    blocks_per_stage: tuple[int, int, int, int]
    stem_kind: str
    num_classes: int
    widths: common.Widths = ()

    TAPS = TAPS

    def unpruned_groups(self) -> dict[str, int]:
        return default_groups(self.block, self.blocks_per_stage)

    def _block(self, groups: dict[str, int], s: int, b: int) -> nn.Module:
        inner = tuple(groups[g] for g in inner_groups(self.block, s, b))
        fields = dict(out_width=groups[f"stage{s}"],
                      stride=STRIDES[s - 1] if b == 0 else 1,
                      projection=has_projection(self.block, s, b),
                      name=f"stage{s}_block{b}")
        if self.block == "basic":
            return BasicBlock(inner_width=inner[0], **fields)
        return Bottleneck(inner_widths=inner, **fields)

    def segments(self, groups: dict[str, int], masks: Mapping[str, jax.Array] | None,
                 train: bool) -> tuple:
        """The forward pass split at the taps (see `common.ZooModel`)."""

        def stem(h):
            group = stem_group(self.block)
            if self.stem_kind == "imagenet":
                h = nn.Conv(groups[group], (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                            use_bias=False, kernel_init=common.CONV_INIT, name="stem_conv")(h)
            else:
                h = common.conv3x3(groups[group], name="stem_conv")(h)
            h = nn.relu(common.batch_norm(train, "stem_bn")(h))
            h = common.apply_mask(h, common.group_mask(masks, group))
            if self.stem_kind == "imagenet":
                h = nn.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
            return h

        def stage(s):
            def run(h):
                for b in range(self.blocks_per_stage[s - 1]):
                    inner = tuple(common.group_mask(masks, g)
                                  for g in inner_groups(self.block, s, b))
                    out = common.group_mask(masks, f"stage{s}")
                    inner = inner[0] if self.block == "basic" else inner
                    h = self._block(groups, s, b)(h, inner, out, train)
                return h
            return run

        def head(h):
            return common.classifier(self.num_classes)(h)

        segments = (stem, *(stage(s) for s in range(1, 5)), common.global_avg_pool, head)
        return segments
