"""PDD — pruning during distillation: differentiable channel masks learned during KD,
then the student is physically compacted and fine-tuned.

Paper setting (CIFAR-10, ResNet56 → PDD's widened ResNet20 ``resnet20_pdd``; stage 1: 50
epochs of KD + mask learning, batch 256, lr 0.01 ×0.1 at 20/40, weight decay 5e-3;
stage 2: 150 epochs of fine-tuning, ×0.1 at 50/100), on a TPU/GPU:
    python -m kdjax.main --config=configs/pdd.py --workdir=/tmp/pdd
VGG16 → VGG11, the CIFAR VGGs of the pruning literature (``vgg16_cifar`` → ``vgg11_cifar``;
masks after every conv-BN-ReLU):
    python -m kdjax.main --config=configs/pdd.py:vgg16_vgg11 --workdir=/tmp/pdd-vgg
With a teacher you already have: --config.teacher.checkpoint=DIR (a kdjax stage directory).

Data and selection in the paper presets: all 50,000 training images (``data.validation_size
= 0``, as the paper); the masks are those of the LAST stage-1 epoch and the reported pruned
student is the LAST stage-2 epoch (best-epoch test figure logged beside it); the teacher per
``teacher.select`` (default "last"). ``--config.data.validation_size=5000`` carves a
validation split back: the masks then come from the best-on-validation stage-1 checkpoint.
Mask placement: ``pdd.placement`` = "inner" (default for ResNets: each block's inner
conv-BN-ReLU, one mask per block — our reconstruction), "output" (one mask per residual
stage stream, applied after every block's add + ReLU — the authors' site, tied per stage),
"all" (every group; VGG). See BUILD_NOTES.md, PDD.

Demo on the embedded Fashion-MNIST (teacher included, minutes on a 2-core CPU):
    python -m kdjax.main --config=configs/pdd.py:demo --workdir=/tmp/pdd-demo
"""

import ml_collections

from kdjax import config_lib

PAIRS = {
    "": ("resnet56", "resnet20_pdd", "inner"),
    "vgg16_vgg11": ("vgg16_cifar", "vgg11_cifar", "all"),  # the pruning papers' CIFAR VGGs
}


def pdd_section(placement, stage1, stage2, kd_optim):
    return ml_collections.ConfigDict(dict(
        placement=placement,      # "inner" (block inner convs) | "output" (stage streams) | "all"
        mask_init_scale=1e-3,     # mask logits ~ N(0, 1)·1e-3
        stage1=stage1, stage2=stage2,
        finetune_kd=False,        # stage 2 with CE (PDD) or with the distill method
        kd_baseline=True,         # also train the unpruned student with the distill method
        kd_optim=kd_optim,
        round_to=1,               # exported widths rounded down to multiples (8/16 CPU, 128 TPU)
        # Extension, NOT part of PDD (off by default): penalise the masked/unmasked MACs
        # ratio r above a target during stage 1: loss += flops_weight · max(0, r − target).
        flops_target=0.0,
        flops_weight=1.0,
    ))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = config_lib.base("pdd")
    if arg in PAIRS:
        teacher, student, placement = PAIRS[arg]
        config.data = config_lib.cifar_data("cifar10")
        config.data.validation_size = 0  # the paper trains on all 50k; selection = last epoch
        stage1 = config_lib.optim(epochs=50, batch_size=256, lr=0.01, milestones=(20, 40),
                                  weight_decay=5e-3)
        stage2 = config_lib.optim(epochs=150, batch_size=256, lr=0.01, milestones=(50, 100),
                                  weight_decay=5e-3)
        kd_optim = config_lib.optim(epochs=200, batch_size=256, lr=0.01,
                                    milestones=(70, 140), weight_decay=5e-3)
        config.teacher = config_lib.teacher(
            teacher, optim_cfg=config_lib.optim(epochs=200, batch_size=128, lr=0.1,
                                                milestones=(100, 150), weight_decay=5e-4))
    elif arg == "demo":
        teacher, student, placement = config_lib.DEMO_TEACHER, "resnet14", "inner"
        config.data = config_lib.demo_data()
        stage1 = config_lib.demo_optim()
        stage1.epochs = 3
        stage2 = config_lib.demo_optim()
        stage2.epochs, stage2.lr = 2, 0.02
        kd_optim = config_lib.demo_optim()
        kd_optim.epochs = 5
        config.teacher = config_lib.teacher(teacher, optim_cfg=config_lib.demo_optim())
    else:
        raise ValueError(f"unknown preset {arg!r} for configs/pdd.py; valid: {sorted(PAIRS) + ['demo']}")
    config.student = ml_collections.ConfigDict(dict(name=student))
    config.pdd = pdd_section(placement, stage1, stage2, kd_optim)
    # PDD's KD: α·CE + (1−α)·T²·KL with α = 0.6, T = 3 (set for distill.method=kd; with
    # another method pass its weights, or -1 for its published defaults).
    config.distill = config_lib.distill("kd", temperature=3.0, ce_weight=0.6, weight=0.4)
    if arg == "demo":
        config.distill.init_epochs = 1  # fitnet/ab/ft/fsp: a 1-epoch init stage
    config.lock()
    return config
