"""Vanilla Hinton KD: 0.1·CE + 0.9·T²·KL(p_t ‖ p_s), T = 4, reported beside the teacher
and the same student trained from scratch.

Paper recipe (RepDistiller protocol, CIFAR-100, resnet32x4 → resnet8x4, 240 epochs,
batch 64, lr 0.05 ×0.1 at 150/180/210; needs a prepared TFDS dataset, see README):
    python -m kdjax.main --config=configs/kd.py --workdir=/tmp/kd
Presets with the same recipe: ``:resnet56_resnet20``, ``:vgg13_vgg8``.
Data and selection in the paper presets: all 50,000 training images (``data.validation_size
= 0``), the reported student is the LAST epoch's (as the RepDistiller tables; the best-epoch
test figure is logged beside it); the teacher is selected by ``teacher.select`` (default
"last"). To carve a validation split back (then ``best/`` = best on validation):
    --config.data.validation_size=5000
With a teacher you already have:
    python -m kdjax.main --config=configs/kd.py --workdir=/tmp/kd \
        --config.teacher.checkpoint=/tmp/sup/model

Demo on the embedded Fashion-MNIST (teacher included, minutes on a 2-core CPU):
    python -m kdjax.main --config=configs/kd.py:demo --workdir=/tmp/kd-demo
"""

import ml_collections

from kdjax import config_lib

PAIRS = {
    "": ("resnet32x4", "resnet8x4"),
    "resnet56_resnet20": ("resnet56", "resnet20"),
    "vgg13_vgg8": ("vgg13", "vgg8"),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = config_lib.base("kd")
    config.kd = ml_collections.ConfigDict(dict(
        temperature=4.0, ce_weight=0.1, kd_weight=0.9,
        baseline=True,  # also train the student from scratch for comparison
    ))
    if arg in PAIRS:
        teacher, student = PAIRS[arg]
        config.data = config_lib.cifar_data("cifar100")
        config.data.validation_size = 0  # the paper trains on all 50k; selection = last epoch
        config.optim = config_lib.optim()
        config.teacher = config_lib.teacher(teacher, optim_cfg=config_lib.optim())
    elif arg == "demo":
        teacher, student = config_lib.DEMO_TEACHER, config_lib.DEMO_STUDENT
        config.data = config_lib.demo_data()
        config.optim = config_lib.demo_optim()
        config.teacher = config_lib.teacher(teacher, optim_cfg=config_lib.demo_optim())
    else:
        raise ValueError(f"unknown preset {arg!r} for configs/kd.py; valid: {sorted(PAIRS) + ['demo']}")
    config.student = ml_collections.ConfigDict(dict(name=student))
    config.lock()
    return config
