"""Literature models of the zoo against published numbers and independent hand counts:
vgg11_cifar / vgg16_cifar (pruning papers), torchvision's ResNet-18/34/50 (+ CIFAR
stems), and our vgg6 / mobilenet16 / mobilenet9.

Hand counts are closed forms written from the architecture descriptions (no model code):
a k x k conv with Cin -> Cout channels (groups g) producing an H x W map costs
H·W·k²·(Cin/g)·Cout MACs; a dense layer Din·Dout; params count weights, biases and BN
scale + shift (never running statistics).
"""

import numpy as np
import pytest

from kdjax import models
from kdjax.models import get_model
from kdjax.pruning import cost
from kdjax.pruning import masks as masks_lib


class Tally:
    """Running (MACs, params, BN params) of a network described layer by layer."""

    def __init__(self):
        self.macs = self.params = self.bn_params = 0

    def conv(self, cin, cout, k, out_hw, bias=False, groups=1, bn=True):
        self.macs += out_hw * out_hw * k * k * (cin // groups) * cout
        self.params += k * k * (cin // groups) * cout + (cout if bias else 0)
        self.bn(cout if bn else 0)

    def dense(self, din, dout, bn=False):
        self.macs += din * dout
        self.params += din * dout + dout
        self.bn(dout if bn else 0)

    def bn(self, channels):
        self.params += 2 * channels
        self.bn_params += 2 * channels


def conv_out(size, k, stride, pad):
    return (size + 2 * pad - k) // stride + 1


# --- VGG of the pruning literature -------------------------------------------------

VGG11_CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512]
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
VGG6_CFG = [64, "M", 128, "M", 256, "M", 512, "M", 512]


def vgg_tally(cfg, hidden, hidden_bn, classes, size=32, widths=None):
    """conv3x3(bias)-BN-ReLU per number, 2x2 max-pool per "M", then dense layers."""
    tally, cin, convs = Tally(), 3, iter(widths or [v for v in cfg if v != "M"])
    for v in cfg:
        if v == "M":
            size //= 2
            continue
        cout = next(convs)
        tally.conv(cin, cout, 3, size, bias=True)
        cin = cout
    for width in hidden:
        tally.dense(cin, width, bn=hidden_bn)
        cin = width
    tally.dense(cin, classes)
    return tally


PDD_VGG11_WIDTHS = [35, 69, 195, 96, 300, 109, 227, 368]


def test_pdd_widths_on_vgg11_cifar():
    """PDD's VGG-11 widths remove 75.03 % MACs / 76.41 % params here (10 classes; the
    paper reports 74.96 % / 76.43 %)."""
    full_model = get_model("vgg11_cifar", 10)
    groups = list(models.mask_groups(full_model))
    assert len(groups) == len(PDD_VGG11_WIDTHS)  # one group per conv
    small_model = get_model("vgg11_cifar", 10, widths=dict(zip(groups, PDD_VGG11_WIDTHS)))
    full = cost.model_cost(full_model, (32, 32, 3))
    small = cost.model_cost(small_model, (32, 32, 3))
    assert abs(100 * (1 - small["macs"] / full["macs"]) - 75.03) <= 0.01
    assert abs(100 * (1 - small["params"] / full["params"]) - 76.41) <= 0.01
    hand = vgg_tally(VGG11_CFG, (512, 512), False, 10, widths=PDD_VGG11_WIDTHS)
    assert (small["macs"], small["params"]) == (hand.macs, hand.params)


def test_vgg16_cifar_matches_hrank():
    """HRank/ABCPruner's VGG-16 (10 classes, 32x32): 14.98M params counting conv and
    dense weights and biases without BN; 313.73M FLOPs, which our conv + dense MAC count
    (313.46M) is 0.09 % below (see BUILD_NOTES for the convention)."""
    got = cost.model_cost(get_model("vgg16_cifar", 10), (32, 32, 3))
    hand = vgg_tally(VGG16_CFG, (512,), True, 10)
    assert (got["macs"], got["params"]) == (hand.macs, hand.params)
    assert round((got["params"] - hand.bn_params) / 1e6, 2) == 14.98
    assert abs(got["macs"] / 313.73e6 - 1) < 1e-3


@pytest.mark.parametrize("name, cfg, hidden, hidden_bn", [
    ("vgg11_cifar", VGG11_CFG, (512, 512), False),
    ("vgg6", VGG6_CFG, (), False)])
def test_vgg_hand_counts(name, cfg, hidden, hidden_bn):
    for classes in (10, 100):
        got = cost.model_cost(get_model(name, classes), (32, 32, 3))
        hand = vgg_tally(cfg, hidden, hidden_bn, classes)
        assert (got["macs"], got["params"]) == (hand.macs, hand.params)


# --- torchvision ResNets -------------------------------------------------------------

RESNETS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
           "resnet50": ("bottleneck", (3, 4, 6, 3))}


def resnet_tally(block, layers, classes, size, imagenet_stem):
    tally = Tally()
    if imagenet_stem:
        size = conv_out(size, 7, 2, 3)
        tally.conv(3, 64, 7, size)
        size = conv_out(size, 3, 2, 1)  # max-pool
    else:
        tally.conv(3, 64, 3, size)
    expansion = 1 if block == "basic" else 4
    cin = 64
    for s, n in enumerate(layers):
        planes = 64 * 2 ** s
        for b in range(n):
            stride = 2 if (s > 0 and b == 0) else 1
            out = conv_out(size, 3, stride, 1)
            if block == "basic":
                tally.conv(cin, planes, 3, out)
                tally.conv(planes, planes, 3, out)
            else:
                tally.conv(cin, planes, 1, size)
                tally.conv(planes, planes, 3, out)
                tally.conv(planes, 4 * planes, 1, out)
            if stride != 1 or cin != planes * expansion:
                tally.conv(cin, planes * expansion, 1, out)
            cin, size = planes * expansion, out
    tally.dense(cin, classes)
    return tally


@pytest.mark.parametrize("name, params, gmacs", [
    ("resnet18", 11_689_512, 1.81), ("resnet34", 21_797_672, 3.66),
    ("resnet50", 25_557_032, 4.09)])
def test_torchvision_resnet_counts(name, params, gmacs):
    """torchvision's published parameter counts and GFLOPS (= conv + dense MACs) at 224."""
    got = cost.model_cost(get_model(name, 1000), (224, 224, 3))
    assert got["params"] == params
    assert round(got["macs"] / 1e9, 2) == gmacs
    hand = resnet_tally(*RESNETS[name], 1000, 224, imagenet_stem=True)
    assert (got["macs"], got["params"]) == (hand.macs, hand.params)


@pytest.mark.parametrize("name", ["resnet18_cifar", "resnet50_cifar"])
def test_cifar_stem_resnet_counts(name):
    got = cost.model_cost(get_model(name, 100), (32, 32, 3))
    hand = resnet_tally(*RESNETS[name.removesuffix("_cifar")], 100, 32, imagenet_stem=False)
    assert (got["macs"], got["params"]) == (hand.macs, hand.params)


def test_resnet_mask_groups_and_coupling():
    r18 = models.mask_groups(get_model("resnet18", 10))
    assert "stem" not in r18 and r18["stage1"] == 64 and r18["stage4"] == 512
    assert len(r18) == 4 + 8  # four streams, one inner group per BasicBlock
    r50 = get_model("resnet50", 10)
    groups = models.mask_groups(r50)
    assert groups["stem"] == 64 and groups["stage1"] == 256 and groups["stage4"] == 2048
    assert len(groups) == 1 + 4 + 2 * 16
    owners = masks_lib.axis_groups(r50)
    p = lambda *keys: owners[("params", *keys)]
    assert p("stem_conv", "kernel") == (None, None, None, "stem")
    assert p("stage1_block0", "shortcut_conv", "kernel") == (None, None, "stem", "stage1")
    assert p("stage2_block0", "conv1", "kernel") == (None, None, "stage1",
                                                     "stage2.block0.conv1")
    assert p("stage2_block0", "conv2", "kernel") == (None, None, "stage2.block0.conv1",
                                                     "stage2.block0.conv2")
    assert p("stage2_block1", "conv3", "kernel") == (None, None, "stage2.block1.conv2",
                                                     "stage2")
    assert p("fc", "kernel") == ("stage4", None)


# --- MobileNets ----------------------------------------------------------------------

MOBILENETS = {  # (width, depthwise stride) per block, after a 32-wide stride-1 stem
    "mobilenet16": [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)]
                   + [(512, 1)] * 6 + [(1024, 2), (1024, 1)],
    "mobilenet9": [(64, 1), (128, 2), (128, 1), (256, 2), (512, 2), (1024, 2), (1024, 1)],
}


def mobilenet_tally(blocks, classes, size):
    tally, cin = Tally(), 32
    tally.conv(3, 32, 3, size)
    for cout, stride in blocks:
        size = conv_out(size, 3, stride, 1)
        tally.conv(cin, cin, 3, size, groups=cin)
        tally.conv(cin, cout, 1, size)
        cin = cout
    tally.dense(cin, classes)
    return tally


@pytest.mark.parametrize("name", sorted(MOBILENETS))
def test_mobilenet_counts(name):
    assert 1 + len(MOBILENETS[name]) + 1 == int(name.removeprefix("mobilenet"))
    got = cost.model_cost(get_model(name, 1000), (64, 64, 3))
    hand = mobilenet_tally(MOBILENETS[name], 1000, 64)
    assert (got["macs"], got["params"]) == (hand.macs, hand.params)


def test_depthwise_channel_pruning_cost():
    """One channel of mobilenet9's stage2.block0 (128 wide, 32x32): its pointwise filter
    (64 inputs) and BN, the next block's depthwise filter (3x3) and BN, and one input
    of the next pointwise conv (128 outputs) disappear."""
    model = get_model("mobilenet9", 10)
    owners = masks_lib.axis_groups(model)
    assert owners[("params", "stage2_block1", "dw_conv", "kernel")] == (
        None, None, None, "stage2.block0")
    full = cost.model_cost(model, (64, 64, 3))
    masks = masks_lib.ones_masks(model)
    masks["stage2.block0"] = masks["stage2.block0"].at[5].set(0.0)
    pruned = cost.model_cost(model, (64, 64, 3), masks)
    assert full["macs"] - pruned["macs"] == 32 * 32 * (64 + 9 + 128)
    assert full["params"] - pruned["params"] == 64 + 2 + 9 + 2 + 128
    table = cost.cost_table(model, (64, 64, 3))
    relaxed = cost.masked_cost(table, masks)
    np.testing.assert_allclose(relaxed["macs"], pruned["macs"], rtol=1e-6)


def test_models_report_their_layer_counts():
    """Weight layers (conv or dense; a depthwise-separable block counted once)."""
    def layers(name, shape):
        table = cost.cost_table(get_model(name, 10), shape)
        weights = [layer.name for layer in table.layers if layer.kind != "norm"]
        return len([n for n in weights if not n.endswith("pw_conv")])
    assert layers("vgg6", (32, 32, 3)) == 6
    assert layers("vgg11_cifar", (32, 32, 3)) == 11
    assert layers("vgg16_cifar", (32, 32, 3)) == 15  # 13 conv + 2 dense (HRank's layout)
    assert layers("mobilenet16", (64, 64, 3)) == 16
    assert layers("mobilenet9", (64, 64, 3)) == 9
