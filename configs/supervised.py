"""Train one model from scratch with cross-entropy (a teacher, or a student baseline).

Paper recipe (CIFAR-100, resnet32x4, 240 epochs; needs a prepared TFDS dataset,
see README "Datasets"), on a TPU/GPU:
    python -m kdjax.main --config=configs/supervised.py --workdir=/tmp/sup

Other zoo models: --config.model.name=resnet56 (any name in kdjax.models.MODEL_NAMES).

Demo on the embedded Fashion-MNIST, minutes on a 2-core CPU:
    python -m kdjax.main --config=configs/supervised.py:demo --workdir=/tmp/sup-demo
"""

import ml_collections

from kdjax import config_lib


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = config_lib.base("supervised")
    config.model = ml_collections.ConfigDict(dict(name="resnet32x4", stage="model"))
    if arg == "":
        config.data = config_lib.cifar_data("cifar100")
        config.optim = config_lib.optim()
    elif arg == "demo":
        config.data = config_lib.demo_data()
        config.model.name = "resnet20"
        config.optim = config_lib.demo_optim()
    else:
        raise ValueError(f"unknown preset {arg!r} for configs/supervised.py; valid: '', 'demo'")
    config.lock()
    return config
