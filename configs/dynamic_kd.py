"""DynamicKD: KD with an entropy controller c (optimizer-side state) that scales the
student's logits inside the distillation term, q_c = softmax(c·z_s/T), and is updated
on-line by gradient descent on the KD term (PAPERS.md §1; reconstruction notes in
BUILD_NOTES.md).

Paper setting (CIFAR-100 resnet32x4 → resnet8x4, RepDistiller recipe: 240 epochs,
batch 64, lr 0.05 ×0.1 at 150/180/210, T = 4, γ = 0.1, α = 0.9), on a TPU/GPU:
    python -m kdjax.main --config=configs/dynamic_kd.py --workdir=/tmp/dkd
Presets with the same recipe: ``:resnet56_resnet20``, ``:vgg13_vgg8``. Add
``--config.dynamic_kd.baselines=True`` to train the from-scratch and vanilla-KD
students with the same teacher for comparison.

Demo on the embedded Fashion-MNIST (teacher, student, KD and DynamicKD, minutes on a
2-core CPU):
    python -m kdjax.main --config=configs/dynamic_kd.py:demo --workdir=/tmp/dkd-demo
"""

import ml_collections

from kdjax import config_lib

PAIRS = {
    "": ("resnet32x4", "resnet8x4"),
    "resnet56_resnet20": ("resnet56", "resnet20"),
    "vgg13_vgg8": ("vgg13", "vgg8"),
}


def dynamic_kd_section(baselines: bool) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        temperature=4.0, ce_weight=0.1, kd_weight=0.9,
        baselines=baselines,
        controller=ml_collections.ConfigDict(dict(
            kind="scalar",            # "scalar" | "per_class"
            init=1.0,                 # c = 1: the loss starts as vanilla KD
            lr=0.01,                  # gradient step on θ = log c (own learning rate)
            clip=(0.1, 10.0),         # c is clipped to this range
            mode="gradient",          # "gradient" | "entropy_feedback" (ablation)
            feedback_rate=0.01,       # η of the entropy-feedback variant
            warmup_epochs=0.0,        # c frozen at init before this many epochs
        )),
    ))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = config_lib.base("dynamic_kd")
    if arg in PAIRS:
        teacher, student = PAIRS[arg]
        config.data = config_lib.cifar_data("cifar100")
        config.optim = config_lib.optim()
        config.teacher = config_lib.teacher(teacher, optim_cfg=config_lib.optim())
        config.dynamic_kd = dynamic_kd_section(baselines=False)
    elif arg == "demo":
        teacher, student = config_lib.DEMO_TEACHER, config_lib.DEMO_STUDENT
        config.data = config_lib.demo_data()
        config.optim = config_lib.demo_optim()
        config.teacher = config_lib.teacher(teacher, optim_cfg=config_lib.demo_optim())
        config.dynamic_kd = dynamic_kd_section(baselines=True)
    else:
        raise ValueError(f"unknown preset {arg!r} for configs/dynamic_kd.py; "
                         f"valid: {sorted(PAIRS) + ['demo']}")
    config.student = ml_collections.ConfigDict(dict(name=student))
    config.lock()
    return config
