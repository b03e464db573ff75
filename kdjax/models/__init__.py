"""Model zoo as Flax Linen modules: CIFAR ResNets, Wide ResNets, VGGs (RepDistiller and
pruning-literature layouts), torchvision-layout ResNet-18/34/50 and MobileNet-style stacks.

Every model maps NHWC images [B, H, W, Cin] (any channel count; any size down to 16x16
for the pruning-literature VGGs, whose five stages halve it four times) to
`(logits [B, num_classes], features)`, where `features` is a dict of named
taps in forward order (`model.taps()`):

    variables = model.init(rng, x)                       # {'params', 'batch_stats'}
    logits, feats = model.apply(variables, x, masks=masks)
    (logits, feats), updates = model.apply(variables, x, train=True,
                                           mutable=['batch_stats'])
    _, feats = model.apply(variables, h, start="stage1", stop="stage2")

`masks` is None (unmasked) or a dict holding every mask group of
`model.mask_groups()` as a float vector [C] that multiplies those channels.
A population of masks with a leading axis works under `jax.vmap`.
`get_model(name, num_classes, widths)` overrides group widths to build a
physically pruned model whose parameter names match the full one.
"""

from collections.abc import Mapping

import flax.linen as nn

from kdjax.models import common, imagenet_resnet, mobilenet, resnet, vgg, wrn

_REGISTRY = {
    **{name: (resnet.CifarResNet, cfg) for name, cfg in resnet.CONFIGS.items()},
    **{name: (wrn.WideResNet, cfg) for name, cfg in wrn.CONFIGS.items()},
    **{name: (vgg.VGG, cfg) for name, cfg in vgg.CONFIGS.items()},
    **{name: (imagenet_resnet.ResNet, cfg) for name, cfg in imagenet_resnet.CONFIGS.items()},
    **{name: (mobilenet.MobileNet, cfg) for name, cfg in mobilenet.CONFIGS.items()},
}

# Named width variants of zoo models: name -> (base model, group widths).
# resnet20_pdd: the "ResNet20" of PDD's public code, which widens the inner channels of
# the last block of stages 1 and 2. Widths 32 and 144 add +21.24M MACs and +69.4k params
# (10 classes, 32x32) to resnet20 (our count: 40.81M / 272,474 -> 62.05M / 341,850),
# the same increments as docs/pdd.md's 40.6M / 0.270M -> 61.8M / 0.339M, whose base count
# differs from ours by a constant ~0.2M MACs / 2.5k params (a counting convention).
VARIANTS = {
    "resnet20_pdd": ("resnet20", {"stage1.block2": 32, "stage2.block2": 144}),
}

MODEL_NAMES = tuple(sorted([*_REGISTRY, *VARIANTS]))


def get_model(name: str, num_classes: int,
              widths: Mapping[str, int] | None = None) -> nn.Module:
    """Build zoo model `name` with a `num_classes` head.

    `widths` maps mask-group names to channel counts overriding the defaults.
    Raises ValueError for an unknown model name or mask group.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    if name in VARIANTS:
        name, preset = VARIANTS[name]
        widths = {**preset, **(widths or {})}
    cls, cfg = _REGISTRY[name]
    model = cls(num_classes=num_classes, widths=common.widths_tuple(widths), **cfg)
    model.mask_groups()  # validates the width overrides eagerly
    return model


def mask_groups(model: nn.Module) -> dict[str, int]:
    """Mask group name -> channel count of a (bound or unbound) zoo model, in forward order."""
    return model.mask_groups()


__all__ = ["MODEL_NAMES", "get_model", "mask_groups"]
