"""CIFAR VGGs with BatchNorm: the RepDistiller family (vgg8, vgg11, vgg13, vgg16, vgg19),
the layout of the channel-pruning literature (vgg11_cifar, vgg16_cifar) and our vgg6.

Five stages of conv3x3(with bias)-BN-ReLU layers; a 2x2 max-pool (stride 2) precedes
each stage whose ``pool_before`` flag is set; after stage 5 a global pool, optional
hidden Dense layers and the Dense classifier:

  RepDistiller (pool before stages 2, 3, 4; stage 5 at 4x4 on 32x32 inputs):
    stage1 -> pool -> stage2 -> pool -> stage3 -> pool -> stage4 -> stage5 -> gap -> fc.
  Pruning literature (pool before stages 2..5; stage 5 at 2x2 on 32x32 inputs):
    stage1 -> pool -> ... -> pool -> stage5 -> global pool -> [hidden dense] -> fc.
    vgg11_cifar: global max-pool, Dense 512-ReLU, Dense 512-ReLU, Dense classes (the
      classic CIFAR VGG-11 whose five max-pools end at 1x1 — PDD's VGG-11).
    vgg16_cifar: global average pool, Dense 512-BN-ReLU, Dense classes (the VGG-16 of
      HRank / ABCPruner, whose AvgPool2d(2) acts on the final 2x2 map).
    vgg6 (ours, 6 weight layers): vgg11_cifar's layout with one conv per stage
      (64, 128, 256, 512, 512) and the classifier only. No published zoo defines a
      VGG-6; see BUILD_NOTES for its cost against the VGG-11s.
  At 32x32 the global pool equals those models' 2x2 pool of the final 2x2 map; at other
  input sizes it keeps the classifier's input at 512 (a flatten would not).

Mask groups: every conv output is its own group "stage{S}.conv{K}" (K counts from 0
within the stage), masked after its BN-ReLU. Hidden dense units are not mask groups
(the pruning papers prune conv filters only).

Parameter names (independent of widths; batch_stats mirror the BN entries):
  stage{S}_conv{K}, stage{S}_bn{K}, hidden{J}[, hidden_bn{J}], fc.
Feature taps: stage1..stage5 (after the stage's last ReLU and mask, before pooling),
embedding ([B, C] globally pooled vector, before any hidden dense layer).
"""

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from kdjax.models import common

TAPS = ("stage1", "stage2", "stage3", "stage4", "stage5", "embedding")
REPDISTILLER_POOLS = (False, True, True, True, False)
PRUNING_POOLS = (False, True, True, True, True)

CONFIGS = {
    "vgg8": dict(stage_widths=((64,), (128,), (256,), (512,), (512,))),
    "vgg11": dict(stage_widths=((64,), (128,), (256, 256), (512, 512), (512, 512))),
    "vgg13": dict(stage_widths=((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))),
    "vgg16": dict(stage_widths=((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3)),
    "vgg19": dict(stage_widths=((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4)),
    "vgg11_cifar": dict(stage_widths=((64,), (128,), (256, 256), (512, 512), (512, 512)),
                        pool_before=PRUNING_POOLS, head_pool="max", hidden=(512, 512)),
    "vgg16_cifar": dict(stage_widths=((64, 64), (128, 128), (256,) * 3, (512,) * 3,
                                      (512,) * 3),
                        pool_before=PRUNING_POOLS, hidden=(512,), hidden_bn=True),
    "vgg6": dict(stage_widths=((64,), (128,), (256,), (512,), (512,)),
                 pool_before=PRUNING_POOLS, head_pool="max"),
}



def global_max_pool(x: jax.Array) -> jax.Array:
    """Max over all spatial positions: [B, H, W, C] -> [B, C] (-inf for an empty map, so
    that shape-only probes at tiny inputs, e.g. 8x8 where stage 5 is 0x0, still trace)."""
    return jnp.max(x, axis=(1, 2), initial=-jnp.inf)


_HEAD_POOLS = {"avg": common.global_avg_pool, "max": global_max_pool}


def default_groups(stage_widths: tuple[tuple[int, ...], ...]) -> dict[str, int]:
    """Unpruned mask groups "stage{S}.conv{K}" -> channels, in forward order."""
    return {f"stage{s}.conv{k}": width
            for s, convs in enumerate(stage_widths, start=1)
            for k, width in enumerate(convs)}


class VGG(common.ZooModel):
    """CIFAR VGG-BN: [B, H, W, Cin] -> (logits [B, num_classes], features).

    `widths` overrides group widths (sorted (group, channels) pairs), which is
    how a physically pruned network is expressed. `pool_before[s]`: max-pool before
    stage s+1; `head_pool`: "avg" or "max" global pool after stage 5; `hidden`: widths
    of the Dense-[BN]-ReLU layers before the classifier (`hidden_bn` adds the BN).
    """

    stage_widths: tuple[tuple[int, ...], ...]
    num_classes: int
    widths: common.Widths = ()
    pool_before: tuple[bool, ...] = REPDISTILLER_POOLS
    head_pool: str = "avg"
    hidden: tuple[int, ...] = ()
    hidden_bn: bool = False

    TAPS = TAPS

    def unpruned_groups(self) -> dict[str, int]:
        return default_groups(self.stage_widths)

    def segments(self, groups: dict[str, int], masks: Mapping[str, jax.Array] | None,
                 train: bool) -> tuple:
        """The forward pass split at the taps (see `common.ZooModel`)."""

        def stage(s):
            def run(h):
                if self.pool_before[s - 1]:
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
            for j, width in enumerate(self.hidden):
                h = common.dense(width, f"hidden{j}")(h)
                if self.hidden_bn:
                    h = common.batch_norm(train, f"hidden_bn{j}")(h)
                h = nn.relu(h)
            return common.classifier(self.num_classes)(h)

        segments = (*(stage(s) for s in range(1, 6)), _HEAD_POOLS[self.head_pool], head)
        return segments
