"""CIFAR VGG with BatchNorm (the RepDistiller variant): vgg8, vgg11, vgg13, vgg16, vgg19.

Five stages of conv3x3(with bias)-BN-ReLU layers; a 2x2 max-pool (stride 2)
follows stages 1, 2 and 3; stage 5 is followed by a global average pool and a
Dense classifier:
  stage1 -> pool -> stage2 -> pool -> stage3 -> pool -> stage4 -> stage5 -> gap -> fc.

Mask groups: every conv output is its own group "stage{S}.conv{K}" (K counts
from 0 within the stage), masked after its BN-ReLU.

Parameter names (independent of widths; batch_stats mirror the BN entries):
  stage{S}_conv{K}, stage{S}_bn{K}, fc.
Feature taps: stage1..stage5 (after the stage's last ReLU and mask, before
pooling), embedding ([B, C] pooled vector).
"""

from collections.abc import Mapping

import flax.linen as nn
import jax

from kdjax.models import common

TAPS = ("stage1", "stage2", "stage3", "stage4", "stage5", "embedding")
POOL_BEFORE = (False, True, True, True, False)

CONFIGS = {
    "vgg8": dict(stage_widths=((64,), (128,), (256,), (512,), (512,))),
    "vgg11": dict(stage_widths=((64,), (128,), (256, 256), (512, 512), (512, 512))),
    "vgg13": dict(stage_widths=((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))),
    "vgg16": dict(stage_widths=((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3)),
    "vgg19": dict(stage_widths=((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4)),
}


def default_groups(stage_widths: tuple[tuple[int, ...], ...]) -> dict[str, int]:
    """Unpruned mask groups "stage{S}.conv{K}" -> channels, in forward order."""
    return {f"stage{s}.conv{k}": width
            for s, convs in enumerate(stage_widths, start=1)
            for k, width in enumerate(convs)}


class VGG(common.ZooModel):
    """CIFAR VGG-BN: [B, H, W, Cin] -> (logits [B, num_classes], features).

    `widths` overrides group widths (sorted (group, channels) pairs), which is
    how a physically pruned network is expressed.
    """

    stage_widths: tuple[tuple[int, ...], ...]
    num_classes: int
    widths: common.Widths = ()

    TAPS = TAPS

    def unpruned_groups(self) -> dict[str, int]:
        return default_groups(self.stage_widths)

    @nn.compact
    def __call__(self, x: jax.Array, masks: Mapping[str, jax.Array] | None = None,
                 train: bool = False, start: str | None = None,
                 stop: str | None = None):
        """Forward pass from `start` (None: image) to `stop` (None: logits).

        Returns (logits [B, num_classes] or None if stopped at a tap, features).
        """
        groups = self.mask_groups()
        common.check_masks(masks, groups)

        def stage(s):
            def run(h):
                if POOL_BEFORE[s - 1]:
                    h = common.max_pool2x2(h)
                for k in range(len(self.stage_widths[s - 1])):
                    group = f"stage{s}.conv{k}"
                    h = common.conv3x3(groups[group], use_bias=True,
                                       name=f"stage{s}_conv{k}")(h)
                    h = nn.relu(common.batch_norm(train, f"stage{s}_bn{k}")(h))
                    h = common.apply_mask(h, common.group_mask(masks, group))
                return h
            return run

        def head(h):
            return common.classifier(self.num_classes)(h)

        segments = (*(stage(s) for s in range(1, 6)), common.global_avg_pool, head)
        return common.run_segments(TAPS, segments, x, start, stop)
