"""MobileNet-v1-style depthwise-separable networks for 64x64 inputs: mobilenet16, mobilenet9.

Defined by us (the cross-layer KD paper names a MobileNet-16 and a MobileNet-9 for
64x64 downsampled ImageNet but no public zoo defines them). Counting weight layers
with a depthwise-separable block as one layer, as the names suggest:

  stem conv3x3(32, stride 1)-BN-ReLU (stride 1: the input is already 64x64),
  blocks of depthwise conv3x3(stride)-BN-ReLU then pointwise conv1x1-BN-ReLU,
  global average pool, Dense.

  mobilenet16 = stem + 14 blocks + fc: MobileNet-v1's 13 blocks with a sixth repeat
    of the 512-wide block:  64 | 128/2, 128 | 256/2, 256 | 512/2, 512 x 6 | 1024/2, 1024.
  mobilenet9 = stem + 7 blocks + fc: the same progression without the repeats inside
    the 256 and 512 stages:  64 | 128/2, 128 | 256/2 | 512/2 | 1024/2, 1024.
  ("w/2" is a block whose depthwise conv has stride 2.) On 64x64 inputs the stages run
  at 64, 32, 16, 8 and 4 pixels. Convs have no bias.

Mask groups (name -> channels): "stem" (stem output) and "stageS.blockB" (block B's
pointwise output). A depthwise conv maps channel c to channel c, so its output
belongs to its input's group: that group's mask multiplies the depthwise BN-ReLU too
(a BN bias cannot revive a pruned channel), and pruning the group removes the
depthwise filters along with the producing and consuming pointwise channels.

Parameter names (independent of widths; batch_stats mirror the BN entries):
  stem_conv, stem_bn, stage{S}_block{B}: dw_conv, dw_bn, pw_conv, pw_bn, fc.
Feature taps: stem, stage1..stage5 (after each stage's last block), embedding
([B, C] pooled vector).
"""

from collections.abc import Mapping

import flax.linen as nn
import jax

from kdjax.models import common

TAPS = ("stem", "stage1", "stage2", "stage3", "stage4", "stage5", "embedding")
STEM_WIDTH = 32

CONFIGS = {
    "mobilenet16": dict(stages=(((64, 1),), ((128, 2), (128, 1)), ((256, 2), (256, 1)),
                                ((512, 2),) + ((512, 1),) * 6, ((1024, 2), (1024, 1)))),
    "mobilenet9": dict(stages=(((64, 1),), ((128, 2), (128, 1)), ((256, 2),), ((512, 2),),
                               ((1024, 2), (1024, 1)))),
}


def default_groups(stages: tuple[tuple[tuple[int, int], ...], ...]) -> dict[str, int]:
    """Unpruned mask groups "stem", "stage{S}.block{B}" -> channels, in forward order."""
    groups = {"stem": STEM_WIDTH}
    for s, blocks in enumerate(stages, start=1):
        groups.update({f"stage{s}.block{b}": width for b, (width, _) in enumerate(blocks)})
    return groups


class SeparableBlock(nn.Module):
    """Depthwise conv3x3(stride)-BN-ReLU, pointwise conv1x1-BN-ReLU:
    [B, H, W, in_width] -> [B, ceil(H/s), ceil(W/s), out_width]."""

    in_width: int
    out_width: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, in_mask: jax.Array | None,
                 out_mask: jax.Array | None, train: bool) -> jax.Array:
        h = common.depthwise3x3(self.in_width, self.stride, name="dw_conv")(x)
        h = nn.relu(common.batch_norm(train, "dw_bn")(h))
        h = common.apply_mask(h, in_mask)
        h = common.conv1x1(self.out_width, name="pw_conv")(h)
        h = nn.relu(common.batch_norm(train, "pw_bn")(h))
        return common.apply_mask(h, out_mask)


class MobileNet(common.ZooModel):
    """Depthwise-separable stack: [B, H, W, Cin] -> (logits [B, num_classes], features).

    `stages[s]` lists (width, stride) per block of stage s+1; `widths` overrides group
    widths (sorted (group, channels) pairs), which is how a pruned network is expressed.
    """

    stages: tuple[tuple[tuple[int, int], ...], ...]
    num_classes: int
    widths: common.Widths = ()

    TAPS = TAPS

    def unpruned_groups(self) -> dict[str, int]:
        return default_groups(self.stages)

    def segments(self, groups: dict[str, int], masks: Mapping[str, jax.Array] | None,
                 train: bool) -> tuple:
        """The forward pass split at the taps (see `common.ZooModel`)."""
        names = list(groups)  # each block's input group is the group produced before it

        def stem(h):
            h = common.conv3x3(groups["stem"], name="stem_conv")(h)
            h = nn.relu(common.batch_norm(train, "stem_bn")(h))
            return common.apply_mask(h, common.group_mask(masks, "stem"))

        def stage(s):
            def run(h):
                for b, (_, stride) in enumerate(self.stages[s - 1]):
                    group = f"stage{s}.block{b}"
                    in_group = names[names.index(group) - 1]
                    block = SeparableBlock(in_width=groups[in_group], out_width=groups[group],
                                           stride=stride, name=f"stage{s}_block{b}")
                    h = block(h, common.group_mask(masks, in_group),
                              common.group_mask(masks, group), train)
                return h
            return run

        def head(h):
            return common.classifier(self.num_classes)(h)

        segments = (stem, *(stage(s) for s in range(1, len(self.stages) + 1)),
                    common.global_avg_pool, head)
        return segments
