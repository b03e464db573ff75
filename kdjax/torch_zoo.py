"""PyTorch twins of kdjax zoo models (optional: needs ``pip install 'kdjax[torch]'``).

Two uses: the PyTorch side of ``python -m kdjax.bench --compare-torch`` (the same
architecture and step in PyTorch eager, alternated with ours) and the reference that
``kdjax.convert_torch`` is tested against. The modules use the state-dict key layout of
the public CIFAR distillation zoo (RepDistiller / mdistiller), so their checkpoints
convert directly:

  CIFAR ResNet   conv1, bn1, layer{S}.{B}.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}, fc
  VGG            block{S-1}.{3K} (conv with bias), block{S-1}.{3K+1} (BN), classifier

and of torchvision's ImageNet ResNets (resnet18/34/50 and the ``*_cifar`` variants with
the 3x3 stem): conv1, bn1, layer{1..4}.{B}.{conv1,bn1,conv2,bn2[,conv3,bn3],
downsample.0,downsample.1}, fc.

Architectures are built from kdjax's own model configs, so a twin always has exactly the
parameters of the kdjax model (``tests/test_convert_torch.py`` checks the counts).
"""

from __future__ import annotations

import torch
from torch import nn

from kdjax.models import imagenet_resnet as jax_imagenet_resnet
from kdjax.models import resnet as jax_resnet
from kdjax.models import vgg as jax_vgg


# The VGGs of the CIFAR distillation zoo (pools before stages 2-4, no hidden layers).
REPDISTILLER_VGGS = tuple(n for n, c in jax_vgg.CONFIGS.items() if set(c) == {"stage_widths"})


class _ResidualBlock(nn.Module):
    """Shared shortcut of the residual blocks: identity or ``downsample`` = conv1x1-BN."""

    def _set_shortcut(self, in_width: int, out_width: int, stride: int, projection: bool):
        self.downsample = None
        if projection:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_width, out_width, 1, stride, bias=False), nn.BatchNorm2d(out_width))

    def _output(self, h, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(h + shortcut)


class BasicBlock(_ResidualBlock):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU (NCHW)."""

    def __init__(self, in_width: int, out_width: int, stride: int, projection: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_width, out_width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_width)
        self.conv2 = nn.Conv2d(out_width, out_width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_width)
        self._set_shortcut(in_width, out_width, stride, projection)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return self._output(self.bn2(self.conv2(h)), x)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of ``kdjax.models.resnet`` (same config dict), NCHW in, logits out."""

    def __init__(self, blocks_per_stage: int, base_widths, num_classes: int, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, base_widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(base_widths[0])
        in_width = base_widths[0]
        for s in (1, 2, 3):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(
                    in_width, base_widths[s], jax_resnet.STRIDES[s - 1] if b == 0 else 1,
                    jax_resnet.has_projection(s, b, base_widths)))
                in_width = base_widths[s]
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
        self.fc = nn.Linear(base_widths[3], num_classes)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.layer3(self.layer2(self.layer1(h)))
        return self.fc(h.mean(dim=(2, 3)))


class Bottleneck(_ResidualBlock):
    """conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU, conv1x1(4w)-BN + shortcut, ReLU (NCHW)."""

    def __init__(self, in_width: int, width: int, out_width: int, stride: int,
                 projection: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_width, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_width)
        self._set_shortcut(in_width, out_width, stride, projection)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self._output(self.bn3(self.conv3(h)), x)


class TorchvisionResNet(nn.Module):
    """The torchvision-layout ResNet of ``kdjax.models.imagenet_resnet`` (same config
    dict): ImageNet stem conv7x7/2 + max-pool 3x3/2, or the CIFAR 3x3 stem."""

    def __init__(self, block: str, blocks_per_stage, stem_kind: str, num_classes: int,
                 in_channels=3):
        super().__init__()
        m = jax_imagenet_resnet
        stem = m.STEM_WIDTH
        if stem_kind == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, stem, 7, 2, 3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.max_pool = stem_kind == "imagenet"
        in_width = stem
        for s, n in enumerate(blocks_per_stage, start=1):
            out_width, blocks = m.stream_width(block, s), []
            for b in range(n):
                stride, projection = m.STRIDES[s - 1] if b == 0 else 1, m.has_projection(block, s, b)
                blocks.append(BasicBlock(in_width, out_width, stride, projection)
                              if block == "basic" else
                              Bottleneck(in_width, m.BASE_WIDTHS[s - 1], out_width, stride,
                                         projection))
                in_width = out_width
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
        self.fc = nn.Linear(in_width, num_classes)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        if self.max_pool:
            h = nn.functional.max_pool2d(h, 3, 2, 1)
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return self.fc(h.mean(dim=(2, 3)))


class VGG(nn.Module):
    """The RepDistiller VGG-BN of ``kdjax.models.vgg``: pools after stages 1–3, GAP, one
    Linear."""

    def __init__(self, stage_widths, num_classes: int, in_channels=3):
        super().__init__()
        in_width = in_channels
        for s, convs in enumerate(stage_widths):
            layers = []
            for width in convs:
                layers += [nn.Conv2d(in_width, width, 3, 1, 1), nn.BatchNorm2d(width),
                           nn.ReLU()]
                in_width = width
            setattr(self, f"block{s}", nn.Sequential(*layers))
        self.classifier = nn.Linear(in_width, num_classes)
        self.num_stages = len(stage_widths)

    def forward(self, x):
        h = x
        for s in range(self.num_stages):
            if jax_vgg.REPDISTILLER_POOLS[s]:
                h = nn.functional.max_pool2d(h, 2)
            h = getattr(self, f"block{s}")(h)
        return self.classifier(h.mean(dim=(2, 3)))


def get_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The PyTorch twin of kdjax zoo model ``name`` (CIFAR ResNets, VGGs, torchvision
    ResNets)."""
    if name in jax_resnet.CONFIGS:
        return CifarResNet(num_classes=num_classes, in_channels=in_channels,
                           **jax_resnet.CONFIGS[name])
    if name in REPDISTILLER_VGGS:
        return VGG(num_classes=num_classes, in_channels=in_channels, **jax_vgg.CONFIGS[name])
    if name in jax_imagenet_resnet.CONFIGS:
        return TorchvisionResNet(num_classes=num_classes, in_channels=in_channels,
                                 **jax_imagenet_resnet.CONFIGS[name])
    available = sorted([*jax_resnet.CONFIGS, *REPDISTILLER_VGGS, *jax_imagenet_resnet.CONFIGS])
    raise ValueError(f"no PyTorch twin for model {name!r}; available: {', '.join(available)}")


def randomize_batch_norm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN scales, biases and running statistics (in place), so that a conversion
    test would notice a swapped or dropped BN tensor; returns ``model``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                module.bias.copy_(0.3 * torch.randn(c, generator=gen))
                module.running_mean.copy_(0.3 * torch.randn(c, generator=gen))
                module.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return model
