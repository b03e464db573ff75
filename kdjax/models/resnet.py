"""CIFAR ResNets (the RepDistiller zoo): resnet8..110, resnet8x4, resnet32x4.

Architecture, for base widths [w0, w1, w2, w3] and n BasicBlocks per stage:
stem conv3x3(w0)-BN-ReLU; stages 1-3 of n blocks with w1, w2, w3 channels and
strides 1, 2, 2 (on the first block); global average pool; Dense. A block is
conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (identity, or conv1x1(stride)-BN
when the stride is not 1 or the base in/out widths differ), then ReLU. Convs
have no bias.

Mask groups (name -> channels), in order of first production:
  "stem"            stem output; only when w0 != w1 (e.g. resnet8x4). Otherwise
                    the stem writes the stage-1 residual stream and is coupled
                    into "stage1".
  "stageS"          residual stream of stage S (block outputs, projection
                    shortcut output, and the stem output when coupled).
  "stageS.blockB"   inner channels of block B (conv1 output).
Masks multiply the stem output, every block output (after the final ReLU) and
every block's inner activation (after BN-ReLU), so a zero mask entry makes
that channel exactly zero everywhere downstream.

Parameter names (independent of widths; batch_stats mirror the BN entries):
  stem_conv, stem_bn,
  stage{S}_block{B}: conv1, bn1, conv2, bn2[, shortcut_conv, shortcut_bn],
  fc.
Feature taps: stem, stage1, stage2, stage3, embedding ([B, w3] pooled vector).
"""

from collections.abc import Mapping

import flax.linen as nn
import jax

from kdjax.models import common

TAPS = ("stem", "stage1", "stage2", "stage3", "embedding")
STRIDES = (1, 2, 2)

CONFIGS = {
    "resnet8": dict(blocks_per_stage=1, base_widths=(16, 16, 32, 64)),
    "resnet14": dict(blocks_per_stage=2, base_widths=(16, 16, 32, 64)),
    "resnet20": dict(blocks_per_stage=3, base_widths=(16, 16, 32, 64)),
    "resnet32": dict(blocks_per_stage=5, base_widths=(16, 16, 32, 64)),
    "resnet44": dict(blocks_per_stage=7, base_widths=(16, 16, 32, 64)),
    "resnet56": dict(blocks_per_stage=9, base_widths=(16, 16, 32, 64)),
    "resnet110": dict(blocks_per_stage=18, base_widths=(16, 16, 32, 64)),
    "resnet8x4": dict(blocks_per_stage=1, base_widths=(32, 64, 128, 256)),
    "resnet32x4": dict(blocks_per_stage=5, base_widths=(32, 64, 128, 256)),
}


def stem_group(base_widths: tuple[int, ...]) -> str:
    """Mask group written by the stem: "stage1" when coupled, else "stem"."""
    return "stage1" if base_widths[0] == base_widths[1] else "stem"


def default_groups(blocks_per_stage: int, base_widths: tuple[int, ...]) -> dict[str, int]:
    """Unpruned mask groups of a CIFAR ResNet / WRN, in order of first production.

    Shared with the WRN, whose stream/inner coupling is the same.
    """
    groups = {stem_group(base_widths): base_widths[0]}
    for s in (1, 2, 3):
        width = base_widths[s]
        for b in range(blocks_per_stage):
            groups[f"stage{s}.block{b}"] = width
            groups.setdefault(f"stage{s}", width)
    return groups


def has_projection(s: int, b: int, base_widths: tuple[int, ...]) -> bool:
    """Whether block B of stage S has a conv shortcut (decided by the unpruned widths)."""
    return b == 0 and (STRIDES[s - 1] != 1 or base_widths[s - 1] != base_widths[s])


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU: [B, H, W, Cin] -> [B, H/s, W/s, out_width]."""

    inner_width: int
    out_width: int
    stride: int
    projection: bool

    @nn.compact
    def __call__(self, x: jax.Array, inner_mask: jax.Array | None,
                 out_mask: jax.Array | None, train: bool) -> jax.Array:
        h = common.conv3x3(self.inner_width, self.stride, name="conv1")(x)
        h = nn.relu(common.batch_norm(train, "bn1")(h))
        h = common.apply_mask(h, inner_mask)
        h = common.conv3x3(self.out_width, name="conv2")(h)
        h = common.batch_norm(train, "bn2")(h)
        return residual_output(h, x, self.stride, self.projection, out_mask, train)


def residual_output(h: jax.Array, x: jax.Array, stride: int, projection: bool,
                    out_mask: jax.Array | None, train: bool) -> jax.Array:
    """mask · ReLU(h + shortcut(x)) for a post-activation block whose main branch gave h
    [B, H', W', C]; the shortcut is x itself, or conv1x1(C, stride)-BN ("shortcut_conv",
    "shortcut_bn", created in the calling block) when `projection`."""
    if projection:
        x = common.conv1x1(h.shape[-1], stride, name="shortcut_conv")(x)
        x = common.batch_norm(train, "shortcut_bn")(x)
    return common.apply_mask(nn.relu(h + x), out_mask)


class CifarResNet(common.ZooModel):
    """CIFAR ResNet: [B, H, W, Cin] -> (logits [B, num_classes], features).

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

        def stem(h):
            group = stem_group(self.base_widths)
            h = common.conv3x3(groups[group], name="stem_conv")(h)
            h = nn.relu(common.batch_norm(train, "stem_bn")(h))
            return common.apply_mask(h, common.group_mask(masks, group))

        def stage(s):
            def run(h):
                for b in range(self.blocks_per_stage):
                    block = BasicBlock(
                        inner_width=groups[f"stage{s}.block{b}"],
                        out_width=groups[f"stage{s}"],
                        stride=STRIDES[s - 1] if b == 0 else 1,
                        projection=has_projection(s, b, self.base_widths),
                        name=f"stage{s}_block{b}")
                    h = block(h, common.group_mask(masks, f"stage{s}.block{b}"),
                              common.group_mask(masks, f"stage{s}"), train)
                return h
            return run

        def head(h):
            return common.classifier(self.num_classes)(h)

        segments = (stem, stage(1), stage(2), stage(3), common.global_avg_pool, head)
        return segments
