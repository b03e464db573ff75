"""Cascaded channel pruning with hierarchical self-distillation: teacher → K teaching
assistants → student, all nested channel masks over ONE set of weights (the teacher's),
trained together and pruned every P steps by each level's Taylor saliency of its own KD
loss against the next larger level; every level is exported as its own compacted model.

Paper setting, CIFAR-10 VGG-16 (the paper's MACs targets are not available to us; 0.35 —
65 % of the MACs removed — is our choice, see BUILD_NOTES), on a TPU/GPU:
    python -m kdjax.main --config=configs/cascaded.py --workdir=/tmp/casc-vgg
ResNet-50 on CIFAR-10 / on ImageNet:
    python -m kdjax.main --config=configs/cascaded.py:resnet50_cifar10 --workdir=/tmp/casc-r50
  ImageNet (streamed from a prepared TFDS imagenet2012 at 224×224, random-resized crop +
  flip, see README "ImageNet scale"), with torchvision's ResNet-50 as the unpruned network:
    python -m kdjax.convert_torch --model=resnet50 --num_classes=1000 \
        --input_shape=224,224,3 --state_dict=resnet50-0676ba61.pth --out=/tmp/teachers/r50
    python -m kdjax.main --config=configs/cascaded.py:resnet50_imagenet --workdir=/tmp/casc-in \
        --config.teacher.checkpoint=/tmp/teachers/r50 --config.train.compute_dtype=bfloat16
Number of TAs (0 = the single teacher→student pair, the ablation):
    --config.cascade.num_tas=0|1|2|3     (levels' MACs targets: --config.cascade.spacing=linear)
Baselines at the same MACs target and total epochs (one-shot pruning of the teacher + KD):
    --config.cascade.method=oneshot_l1 | oneshot_taylor
Reuse a trained network: --config.teacher.checkpoint=DIR (e.g. /tmp/casc-vgg/teacher).

Demo on the embedded Fashion-MNIST (resnet8 trained first, 2 TAs, 50 % MACs target):
    python -m kdjax.main --config=configs/cascaded.py:demo --workdir=/tmp/casc-demo

Keys (``cascade``): method; num_tas (0–3); spacing ("geometric" | "linear", levels and
events); num_events E and prune_every_epochs (events at P, 2P, …, E·P steps, P =
round(prune_every_epochs · steps per epoch)); normalize (per-group saliency normalisation
"mean" | "l2" | "none"); round_to (kept widths rounded down to a multiple, 1 = off;
groups narrower than it keep their width); teacher_stop_gradient (no gradient through the teacher side of a
pair); optim (the cascade stage); finetune (student KD fine-tuning, epochs 0 = off);
taylor_batches (oneshot_taylor). ``distill`` (the shared section): method ("kd";
also at, sp, rkd, pkt, nst), temperature, ce_weight γ, weight β: loss
Σ_k [γ·CE(s_k) + β·D(t_k → s_k)], D = T²·KL(p_t ‖ p_s) for kd.
"""

import ml_collections

from kdjax import config_lib

# VGG-16-BN on CIFAR-10 as trained by the HRank / ABCPruner baselines (160 epochs, lr 0.1
# ÷10 at 80 and 120, weight decay 5e-4); the CIFAR ResNet recipe of He et al. 2016 (164
# epochs, ÷10 at 82 and 123, weight decay 1e-4); ImageNet ResNet-50: 90 epochs, batch 256,
# lr 0.1 ÷10 at 30 and 60, weight decay 1e-4 (torchvision's reference recipe).
VGG_CIFAR10 = dict(epochs=160, batch_size=128, lr=0.1, milestones=(80, 120), weight_decay=5e-4)
RESNET_CIFAR10 = dict(epochs=164, batch_size=128, lr=0.1, milestones=(82, 123),
                      weight_decay=1e-4)
RESNET_IMAGENET = dict(epochs=90, batch_size=256, lr=0.1, milestones=(30, 60), weight_decay=1e-4)

# preset: (model, teacher recipe, cascade recipe, target MACs ratio, events, epochs per event)
PRESETS = {
    "": ("vgg16_cifar", VGG_CIFAR10,
         dict(epochs=100, batch_size=128, lr=0.01, milestones=(50, 75), weight_decay=5e-4),
         0.35, 20, 2.0),
    "resnet50_cifar10": ("resnet50_cifar", RESNET_CIFAR10,
                         dict(epochs=100, batch_size=128, lr=0.01, milestones=(50, 75),
                              weight_decay=1e-4),
                         0.5, 20, 2.0),
    "resnet50_imagenet": ("resnet50", RESNET_IMAGENET,
                          dict(epochs=30, batch_size=256, lr=0.01, milestones=(15, 25),
                               weight_decay=1e-4),
                          0.5, 10, 1.0),
}


# The demo prunes a resnet8, not the other demos' resnet20: every level is a forward and
# backward pass of the whole network, and with resnet20 the demo took ≈ 28 min on a 2-core
# CPU (BUILD_NOTES, cascaded demo).
DEMO_MODEL = "resnet8"


def distill_section(**overrides) -> ml_collections.ConfigDict:
    """Pair loss of every level: Hinton KD, T = 4, Σ_k [CE + KD] (γ = β = 1: the pipeline's
    ``KD_PAIR_WEIGHTS``, used while weight / ce_weight stay −1). The shared ``distill``
    section: any method without params/state of its own plugs in (kd, at, sp, rkd, pkt,
    nst; e.g. ``--config.distill.method=at``, its weights then the method's published
    defaults unless set)."""
    return config_lib.distill("kd", **overrides)


def cascade_section(optim_cfg, num_events, prune_every_epochs, **overrides):
    section = dict(
        method="cascade",            # cascade | oneshot_l1 | oneshot_taylor
        num_tas=2,                   # K teaching assistants: L = K + 2 levels
        spacing="geometric",         # geometric | linear (level targets and event steps)
        num_events=num_events,       # E pruning events ...
        prune_every_epochs=prune_every_epochs,  # ... every P = round(this · steps/epoch)
        normalize="mean",            # per-group saliency normalisation: mean | l2 | none
        round_to=1,                  # kept widths rounded down to multiples (8/16 CPU, 128 TPU)
        teacher_stop_gradient=True,  # no gradient through t_k in KD(t_k → s_k)
        optim=optim_cfg,
        finetune=config_lib.optim(epochs=0, batch_size=optim_cfg.batch_size, lr=0.01,
                                  milestones=(), schedule="cosine",
                                  weight_decay=optim_cfg.weight_decay),
        taylor_batches=10,           # oneshot_taylor: training batches summed
    )
    section.update(overrides)
    return ml_collections.ConfigDict(section)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = config_lib.base("cascaded")
    config.distill = distill_section()
    if arg in PRESETS:
        name, teacher_recipe, recipe, target, events, every = PRESETS[arg]
        config.data = config_lib.imagenet_data() if arg == "resnet50_imagenet" else \
            config_lib.cifar_data("cifar10")
        config.teacher = config_lib.teacher(name, optim_cfg=config_lib.optim(**teacher_recipe))
        config.target_flops_ratio = target
        config.cascade = cascade_section(config_lib.optim(**recipe), events, every)
    elif arg == "demo":
        config.data = config_lib.demo_data()
        config.teacher = config_lib.teacher(DEMO_MODEL, optim_cfg=config_lib.demo_optim())
        config.target_flops_ratio = 0.5
        stage = config_lib.demo_optim()
        stage.epochs, stage.lr = 2, 0.02
        config.cascade = cascade_section(stage, num_events=5, prune_every_epochs=0.2)
    else:
        raise ValueError(f"unknown preset {arg!r} for configs/cascaded.py; valid: "
                         f"{sorted(PRESETS) + ['demo']}")
    config.lock()
    return config
