"""PyTorch → kdjax conversion: a randomly initialised PyTorch twin (random BN statistics),
converted, gives the same eval-mode logits as PyTorch itself; bad state dicts are refused."""

import numpy as np
import pytest
import torch

from kdjax import convert_torch, models, torch_zoo
from kdjax.pruning.cost import model_cost
from kdjax.train import checkpoint as ckpt_lib


def torch_logits(net, images_nhwc):
    with torch.no_grad():
        return net.eval()(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2))).numpy()


@pytest.mark.parametrize("name,classes", [("resnet20", 10), ("resnet8x4", 100), ("vgg8", 100)])
def test_converted_twin_gives_pytorch_logits(tmp_path, name, classes):
    torch.manual_seed(0)
    net = torch_zoo.randomize_batch_norm(torch_zoo.get_model(name, classes), seed=1)
    model = models.get_model(name, classes)
    n_torch = sum(p.numel() for p in net.parameters())
    assert n_torch == model_cost(model, (32, 32, 3))["params"]  # same architecture
    path = tmp_path / "teacher.pth"
    torch.save({"model": net.state_dict(), "epoch": 240}, path)  # RepDistiller's file shape
    out = tmp_path / "converted"
    assert convert_torch.main([f"--model={name}", f"--num_classes={classes}",
                               f"--state_dict={path}", f"--out={out}"]) == 0
    spec, variables = ckpt_lib.load_variables(out)
    assert spec["name"] == name and spec["num_classes"] == classes
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    ours, _ = model.apply(variables, images, train=False)
    np.testing.assert_allclose(np.asarray(ours), torch_logits(net, images), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["resnet50", "resnet18"])
def test_torchvision_resnet_converts_to_the_same_logits(name):
    """torchvision's key layout (conv1, bn1, layer1..4.{i}.conv1..bn3, downsample.{0,1},
    fc), random weights and BN statistics, at 64x64 to stay fast."""
    torch.manual_seed(0)
    net = torch_zoo.randomize_batch_norm(torch_zoo.get_model(name, 10), seed=2)
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    assert "layer1.0.downsample.0.weight" in state or name == "resnet18"
    assert "layer4.1.bn2.running_var" in state and "fc.weight" in state
    model = models.get_model(name, 10)
    assert sum(p.numel() for p in net.parameters()) == model_cost(model, (64, 64, 3))["params"]
    variables = convert_torch.convert_state_dict(state, model, (64, 64, 3))
    images = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    ours, _ = model.apply(variables, images, train=False)
    np.testing.assert_allclose(np.asarray(ours), torch_logits(net, images), atol=1e-4, rtol=1e-4)


def test_mismatched_state_dict_is_refused_with_the_keys(tmp_path):
    state = {k: v.numpy() for k, v in torch_zoo.get_model("resnet8", 10).state_dict().items()}
    model = models.get_model("resnet14", 10)
    with pytest.raises(ValueError, match=r"missing keys \[.*layer1\.1\.conv1\.weight"):
        convert_torch.convert_state_dict(state, model, (32, 32, 3))
    wrong_classes = models.get_model("resnet8", 100)
    with pytest.raises(ValueError, match=r"fc\.weight: \(10, 64\)"):
        convert_torch.convert_state_dict(state, wrong_classes, (32, 32, 3))
    with pytest.raises(ValueError, match="supported families"):
        convert_torch.convert_state_dict(state, models.get_model("vgg11_cifar", 10), (32, 32, 3))
    state["extra.weight"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra\.weight'\]"):
        convert_torch.convert_state_dict(state, models.get_model("resnet8", 10), (32, 32, 3))


def test_cli_errors_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    assert convert_torch.main(["--model=resnet8", "--num_classes=10", f"--state_dict={bad}",
                               f"--out={tmp_path / 'o'}"]) == 2
    assert "not a readable PyTorch file" in capsys.readouterr().err
    assert convert_torch.main(["--model=resnet8", "--num_classes=10",
                               f"--state_dict={tmp_path / 'none.pth'}",
                               f"--out={tmp_path / 'o'}"]) == 2
    assert not (tmp_path / "o").exists()


def test_bench_compare_torch_alternates_and_prints_ratios(capsys):
    from kdjax import bench

    assert bench.main(["--pairs", "resnet8:resnet8", "--compare-torch", "--rounds", "2",
                       "--repeats", "1", "--warmup", "1", "--batch", "16", "--classes", "10",
                       "--image", "16", "16", "3", "--peak-size", "256",
                       "--bn-folding-bound"]) == 0
    out = capsys.readouterr().out
    assert "matmul peak" in out
    rows = [line for line in out.splitlines() if line.startswith("| resnet8") or
            line.startswith("| KD")]
    assert len(rows) == 4, out
    assert rows[3].startswith("| resnet8 inference, BatchNorm dropped (bound) |")
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        theirs, ours, ratio = cells[1].split(" / "), cells[2].split(" / "), cells[3]
        assert len(theirs) == len(ours) == 2  # two rounds each
        expected = np.median([float(v) for v in ours]) / np.median([float(v) for v in theirs])
        assert float(ratio.rstrip("x")) == pytest.approx(expected, rel=0.02)


@pytest.mark.slow  # ≈ 25 s; the default run keeps the bound row's wiring (compare test)
def test_batchnorm_identity_bound_drops_the_same_work_on_both_sides(tmp_path):
    """The bench's --bn-folding-bound row: PyTorch's twin without its BatchNorms and
    kdjax's converted model with BatchNorm intercepted give the same logits (and both
    differ from the models with BN)."""
    from kdjax import bench, bench_torch

    torch.manual_seed(0)
    net = torch_zoo.randomize_batch_norm(torch_zoo.get_model("resnet8", 10), seed=1)
    path = tmp_path / "twin.pth"
    torch.save(net.state_dict(), path)
    out = tmp_path / "converted"
    assert convert_torch.main(["--model=resnet8", "--num_classes=10", f"--state_dict={path}",
                               f"--out={out}"]) == 0
    _, variables = ckpt_lib.load_variables(out)
    model = models.get_model("resnet8", 10)
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    with bench.batchnorm_as_identity(True):
        ours, _ = model.apply(variables, images, train=False)
    stripped = bench_torch.without_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in stripped.modules())
    np.testing.assert_allclose(np.asarray(ours), torch_logits(stripped, images),
                               atol=1e-4, rtol=1e-4)
    assert not np.allclose(np.asarray(ours), torch_logits(net, images), atol=1e-2)
