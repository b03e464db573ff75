"""Turn a PyTorch state dict of a zoo architecture into a kdjax teacher checkpoint.

    python -m kdjax.convert_torch --model=resnet32x4 --num_classes=100 \
        --state_dict=ckpt_epoch_240.pth --out=/tmp/teachers/resnet32x4
    python -m kdjax.main --config=configs/kd.py --workdir=/tmp/kd \
        --config.teacher.checkpoint=/tmp/teachers/resnet32x4

Accepted key layouts: the CIFAR distillation zoo (RepDistiller / mdistiller ResNets,
ResNet x4 and VGGs) and torchvision's ResNets (resnet18/34/50, e.g. its ImageNet
weights; see ``kdjax.torch_zoo``):
    python -m kdjax.convert_torch --model=resnet50 --num_classes=1000 \
        --input_shape=224,224,3 --state_dict=resnet50-0676ba61.pth --out=/tmp/teachers/r50 A file holding ``{"model": state_dict}``
or ``{"state_dict": ...}`` and ``module.``-prefixed keys (DataParallel) are accepted.
Layouts: conv OIHW → HWIO, Linear [out, in] → [in, out]; BN weight/bias → scale/bias,
running mean/var → batch_stats (``num_batches_tracked`` is dropped). Every kdjax
variable must find its tensor with the right shape and every tensor must be used,
otherwise nothing is written and the error lists the missing/unexpected/mismatched keys.
Exit codes: 0 written; 2 bad arguments or a state dict that does not fit the model.
"""

from __future__ import annotations

import argparse
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import models
from kdjax.models import imagenet_resnet as jax_imagenet_resnet
from kdjax.models import resnet as jax_resnet
from kdjax.models import vgg as jax_vgg

IGNORED_SUFFIXES = ("num_batches_tracked",)


def _resnet_module(path: tuple[str, ...]) -> str:
    """Flax module path of a CIFAR or torchvision-layout ResNet → PyTorch module prefix
    (both zoos name blocks layer{S}.{B} with a downsample.{0,1} projection)."""
    top = {"stem_conv": "conv1", "stem_bn": "bn1", "fc": "fc"}
    if path[0] in top:
        return top[path[0]]
    s, b = re.fullmatch(r"stage(\d+)_block(\d+)", path[0]).groups()
    inner = {"shortcut_conv": "downsample.0", "shortcut_bn": "downsample.1"}.get(path[1], path[1])
    return f"layer{s}.{b}.{inner}"


def _vgg_module(path: tuple[str, ...]) -> str:
    """Flax module path of a CIFAR VGG → PyTorch module prefix (conv k of stage s is
    Sequential index 3k of block s−1, its BN index 3k+1)."""
    if path[0] == "fc":
        return "classifier"
    kind, s, k = re.fullmatch(r"stage(\d+)_(conv|bn)(\d+)", path[0]).group(2, 1, 3)
    return f"block{int(s) - 1}.{3 * int(k) + (kind == 'bn')}"


def module_namer(model):
    """The Flax-path → PyTorch-prefix function for ``model``'s family."""
    if isinstance(model, (jax_resnet.CifarResNet, jax_imagenet_resnet.ResNet)):
        return _resnet_module
    if isinstance(model, jax_vgg.VGG) and (model.pool_before, model.head_pool, model.hidden) == (
            jax_vgg.REPDISTILLER_POOLS, "avg", ()):
        return _vgg_module
    raise ValueError(f"converting {type(model).__name__} models from PyTorch is not supported; "
                     f"supported families: CIFAR ResNet (resnet8..110, x4), VGG "
                     f"(vgg8..19), "
                     f"torchvision ResNet (resnet18/34/50[_cifar])")


def torch_name(collection: str, path: tuple[str, ...], leaf: str, ndim: int, namer) -> str:
    """PyTorch state-dict key of one kdjax variable."""
    prefix = namer(path)
    if collection == "batch_stats":
        return f"{prefix}.running_{leaf}"
    return f"{prefix}.{ {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}[leaf] }"


def to_flax_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """PyTorch tensor layout → Flax: conv OIHW → HWIO, Linear [out, in] → [in, out]."""
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    return array


def convert_state_dict(state_dict: dict, model, input_shape) -> dict:
    """{'params', 'batch_stats'} of ``model`` filled from a PyTorch ``state_dict``
    ({key: numpy array or tensor}); raises ValueError listing every problem."""
    namer = module_namer(model)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_shape)))
    tensors = {k.removeprefix("module."): np.asarray(v) for k, v in state_dict.items()
               if not k.endswith(IGNORED_SUFFIXES)}
    used, missing, mismatched = set(), [], []

    def fill(path, leaf_shape):
        keys = [p.key for p in path]
        collection, modules, leaf = keys[0], tuple(keys[1:-1]), keys[-1]
        key = torch_name(collection, modules, leaf, len(leaf_shape.shape), namer)
        if key not in tensors:
            missing.append(key)
            return None
        used.add(key)
        value = to_flax_layout(tensors[key], leaf)
        if value.shape != leaf_shape.shape:
            mismatched.append(f"{key}: {tensors[key].shape} (as {value.shape}) vs kdjax "
                              f"{leaf_shape.shape}")
            return None
        return jnp.asarray(value, jnp.float32)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    unexpected = sorted(set(tensors) - used)
    if missing or mismatched or unexpected:
        problems = [f"missing keys {missing}" if missing else "",
                    f"shape mismatches {mismatched}" if mismatched else "",
                    f"unexpected keys {unexpected}" if unexpected else ""]
        raise ValueError("the state dict does not fit this kdjax model: "
                         + "; ".join(p for p in problems if p))
    return dict(variables)


def load_state_dict(path: str) -> dict:
    """A state dict from a ``.pth``/``.pt`` file (plain, or under 'model'/'state_dict')."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"--state_dict {path} does not exist") from None
    except Exception as err:  # pickle/zip errors of a damaged or foreign file
        raise ValueError(f"--state_dict {path} is not a readable PyTorch file: {err}") from err
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"--state_dict {path} holds a {type(obj).__name__}, not a state dict")
    return {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m kdjax.convert_torch",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="kdjax zoo model name")
    parser.add_argument("--num_classes", type=int, required=True)
    parser.add_argument("--input_shape", default="32,32,3", help="H,W,C of the training images")
    parser.add_argument("--state_dict", required=True, help="PyTorch .pth/.pt file")
    parser.add_argument("--out", required=True, help="directory of the kdjax teacher checkpoint")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from kdjax.train import checkpoint as ckpt_lib

    try:
        shape = tuple(int(d) for d in args.input_shape.split(","))
        model = models.get_model(args.model, args.num_classes)
        variables = convert_state_dict(load_state_dict(args.state_dict), model, shape)
        spec = ckpt_lib.model_spec(args.model, args.num_classes, shape)
        ckpt_lib.save_variables(args.out, spec, variables,
                                {"converted_from": str(args.state_dict)})
    except ValueError as err:
        print(f"kdjax.convert_torch: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.model}, {args.num_classes} classes); use it with "
          f"--config.teacher.checkpoint={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
