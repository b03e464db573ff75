"""Wide ResNets WRN-d-k for CIFAR: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

Architecture, widths [16, 16k, 32k, 64k] and n = (d - 4) / 6 pre-activation
blocks per stage: stem conv3x3(16); stages 1-3 with strides 1, 2, 2 (on the
first block); final BN-ReLU; global average pool; Dense. A block computes
p = BN-ReLU(x), then conv3x3(stride)-BN-ReLU-conv3x3 on p, plus a shortcut:
x itself when the base in/out widths match, else conv1x1(stride) of p.
Convs have no bias; there is no dropout.

Mask groups are those of the CIFAR ResNet (see `kdjax.models.resnet`): "stem"
(only when k != 1; for k = 1 the stem is coupled into "stage1"), "stageS" for
each residual stream and "stageS.blockB" for each block's inner channels.
Stream masks multiply the stem output, every block output (after the add) and
every pre-activation BN-ReLU of stream channels (each block's first one, and
the final one), so that BN biases cannot revive a masked channel. Inner masks
multiply each block's middle BN-ReLU.

Parameter names (independent of widths; batch_stats mirror the BN entries):
  stem_conv,
  stage{S}_block{B}: bn1, conv1, bn2, conv2[, shortcut_conv],
  final_bn, fc.
Feature taps: stem, stage1, stage2, stage3 (residual-stream outputs, before
any BN), embedding (pooled final BN-ReLU, [B, 64k]).
"""

from collections.abc import Mapping

import flax.linen as nn
import jax

from kdjax.models import common
from kdjax.models.resnet import STRIDES, default_groups, has_projection, stem_group

TAPS = ("stem", "stage1", "stage2", "stage3", "embedding")


def _wrn_config(depth: int, k: int) -> dict:
    return dict(blocks_per_stage=(depth - 4) // 6, base_widths=(16, 16 * k, 32 * k, 64 * k))


CONFIGS = {
    "wrn_16_1": _wrn_config(16, 1),
    "wrn_16_2": _wrn_config(16, 2),
    "wrn_40_1": _wrn_config(40, 1),
    "wrn_40_2": _wrn_config(40, 2),
}


class PreActBlock(nn.Module):
    """Pre-activation wide block: [B, H, W, Cin] -> [B, H/s, W/s, out_width]."""

    inner_width: int
    out_width: int
    stride: int
    projection: bool

    @nn.compact
    def __call__(self, x: jax.Array, in_mask: jax.Array | None,
                 inner_mask: jax.Array | None, out_mask: jax.Array | None,
                 train: bool) -> jax.Array:
        p = nn.relu(common.batch_norm(train, "bn1")(x))
        p = common.apply_mask(p, in_mask)
        h = common.conv3x3(self.inner_width, self.stride, name="conv1")(p)
        h = nn.relu(common.batch_norm(train, "bn2")(h))
        h = common.apply_mask(h, inner_mask)
        h = common.conv3x3(self.out_width, name="conv2")(h)
        if self.projection:
            x = common.conv1x1(self.out_width, self.stride, name="shortcut_conv")(p)
        return common.apply_mask(h + x, out_mask)


class WideResNet(common.ZooModel):
    """Wide ResNet: [B, H, W, Cin] -> (logits [B, num_classes], features).

    `widths` overrides group widths (sorted (group, channels) pairs), which is
    how a physically pruned network is expressed.
    """

    blocks_per_stage: int
    base_widths: tuple[int, int, int, int]
    num_classes: int
    widths: common.Widths = ()

    TAPS = TAPS

    def unpruned_groups(self) -> dict[str, int]:
        return default_groups(self.blocks_per_stage, self.base_widths)

    def segments(self, groups: dict[str, int], masks: Mapping[str, jax.Array] | None,
                 train: bool) -> tuple:
        """The forward pass split at the taps (see `common.ZooModel`)."""
        first_group = stem_group(self.base_widths)

        def stem(h):
            h = common.conv3x3(groups[first_group], name="stem_conv")(h)
            return common.apply_mask(h, common.group_mask(masks, first_group))

        def stage(s):
            def run(h):
                in_group = first_group if s == 1 else f"stage{s - 1}"
                for b in range(self.blocks_per_stage):
                    block = PreActBlock(
                        inner_width=groups[f"stage{s}.block{b}"],
                        out_width=groups[f"stage{s}"],
                        stride=STRIDES[s - 1] if b == 0 else 1,
                        projection=has_projection(s, b, self.base_widths),
                        name=f"stage{s}_block{b}")
                    h = block(h, common.group_mask(masks, in_group),
                              common.group_mask(masks, f"stage{s}.block{b}"),
                              common.group_mask(masks, f"stage{s}"), train)
                    in_group = f"stage{s}"
                return h
            return run

        def embedding(h):
            h = nn.relu(common.batch_norm(train, "final_bn")(h))
            h = common.apply_mask(h, common.group_mask(masks, "stage3"))
            return common.global_avg_pool(h)

        def head(h):
            return common.classifier(self.num_classes)(h)

        segments = (stem, stage(1), stage(2), stage(3), embedding, head)
        return segments
