"""EMO-PMS — EMO joint pruning with multiple sub-networks: the network is split at its
stage boundaries, each sub-network gets an NSGA-II channel search (retained MACs vs a
feature selector's loss), candidates are constraint-trained to reproduce the unpruned
features, combined by global performance impairment ranking under a MACs target, and
the compacted network is fine-tuned.

Paper setting (CIFAR-10 ResNet-56, ≈50 % of the FLOPs removed: target_flops_ratio 0.5,
the HRank / DepGraph operating point; needs a prepared TFDS dataset, see README),
on a TPU/GPU:
    python -m kdjax.main --config=configs/emo_pms.py --workdir=/tmp/emo
VGG-16 on CIFAR-10 (the CIFAR VGG-16 of the pruning literature, ``vgg16_cifar``; 5
sub-networks, one per pooling block):
    python -m kdjax.main --config=configs/emo_pms.py:vgg16 --workdir=/tmp/emo-vgg
With a network you already have: --config.teacher.checkpoint=DIR (a kdjax stage directory).
Baselines through the same compaction + fine-tuning path (results under workdir/<method>/):
    --config.emo.method=uniform | l1 | taylor | whole_nsga2
Another operating point: --config.target_flops_ratio=0.45

Data and selection in the paper presets: the network (when trained here) and the
fine-tuning use all 50,000 training images (``data.validation_size = 0``, as the pruning
papers), the fine-tuned network reported is the LAST epoch's (best-epoch test figure logged
beside it). The search needs held-out data: ``emo.holdout_size`` examples are carved from
the training split (seeded with the NETWORK's data seed, read from its checkpoint) for the
fitness and the GPIR impairments, and the selectors, constraint training and Taylor scores
use the rest — "held-out" from the search's own training, not from the network's (which saw
all 50k). With a validation split (``--config.data.validation_size=5000``, or the demo) the
search uses that split instead, carved with the network's seed so that it holds no example
the network trained on; a network whose recorded data settings differ is refused.

ImageNet ResNet-50 (``:imagenet``), torchvision's weights as the unpruned network, at 50 %
of the FLOPs retained (target_flops_ratio 0.5). The paper's own ImageNet FLOPs target is
not in the material available to us; 50 % is our choice (about 2× fewer FLOPs, the
operating point of its CIFAR experiments and near the ≈2× points of the ImageNet ResNet-50
tables it compares with). Fine-tuning: 60 epochs, lr 0.01 ×0.1 at 30/45, with KD from
the unpruned network (ours). Streamed from a prepared TFDS imagenet2012 (README
"ImageNet scale"):
    python -m kdjax.convert_torch --model=resnet50 --num_classes=1000 \
        --input_shape=224,224,3 --state_dict=resnet50-0676ba61.pth --out=/tmp/teachers/r50
    python -m kdjax.main --config=configs/emo_pms.py:imagenet --workdir=/tmp/emo-in \
        --config.teacher.checkpoint=/tmp/teachers/r50 --config.train.compute_dtype=bfloat16

Demo on the embedded Fashion-MNIST (ResNet-20 trained first; 6 min on a 2-core CPU):
    python -m kdjax.main --config=configs/emo_pms.py:demo --workdir=/tmp/emo-demo
"""

import ml_collections

from kdjax import config_lib

# The standard CIFAR-10 ResNet recipe of He et al., "Deep Residual Learning for Image
# Recognition", CVPR 2016, §4.2: SGD momentum 0.9, batch 128, lr 0.1, weight decay 1e-4,
# lr ÷10 at 32k and 48k iterations, 64k iterations (≈ 82 / 123 / 164 epochs of the 50k
# training images at 390 steps per epoch).
RESNET_CIFAR10 = dict(epochs=164, batch_size=128, lr=0.1, milestones=(82, 123),
                      weight_decay=1e-4)
# VGG-16-BN on CIFAR-10 as trained by the HRank / ABCPruner baselines: 160 epochs, lr 0.1
# ÷10 at 80 and 120, weight decay 5e-4.
VGG_CIFAR10 = dict(epochs=160, batch_size=128, lr=0.1, milestones=(80, 120),
                   weight_decay=5e-4)

PRESETS = {"": ("resnet56", RESNET_CIFAR10), "vgg16": ("vgg16_cifar", VGG_CIFAR10)}


def emo_section(**overrides) -> ml_collections.ConfigDict:
    """The ``emo`` section; defaults = the paper-scale search."""
    emo = dict(
        method="emo_pms",          # emo_pms | uniform | l1 | taylor | whole_nsga2
        boundaries=(),             # taps cutting the net; () = the stage taps
        population=40,
        generations=50,
        init_keep_range=(0.3, 1.0),  # initial genomes keep each bit with p ~ U[lo, hi)
        crossover="uniform",       # uniform | one_point
        crossover_prob=0.9,
        mutation_rate=0.0,         # per-bit flip probability; 0 = 1 / genes
        holdout_size=5000,         # search hold-out carved from train when validation_size = 0
        eval_batch=512,            # held-out examples of the fitness (fixed batch)
        impairment_examples=0,     # held-out examples for GPIR impairment; 0 = all
        candidates_per_subnet=6,   # K, spread over each final Pareto front
        batch_size=128,            # selector / constraint / Taylor training batches
        selector_steps=2000,
        selector_lr=0.01,          # Adam
        constraint_steps=2000,
        constraint_lr=0.01,        # SGD momentum 0.9, cosine decay, no weight decay
        taylor_batches=10,         # training batches summed for the taylor baseline
        finetune=config_lib.optim(epochs=100, batch_size=128, lr=0.01, milestones=(50, 75),
                                  weight_decay=1e-4),
        finetune_kd=False,         # fine-tune distilling from the unpruned network
                                   # (config.distill: KD 0.1·CE + 0.9·KD, T = 4)
        round_to=1,                # kept widths rounded down to multiples (8/16 CPU, 128 TPU)
        population_eval="backend",  # backend (CPU: loop, else vmap) | loop | vmap |
                                    # map (lax.map chunks) | auto (each timed, fastest used)
        population_chunk=0,        # map: candidates per chunk (0 = one at a time)
        population_devices=1,      # devices the candidates are split over (0 = all)
    )
    emo.update(overrides)
    return ml_collections.ConfigDict(emo)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = config_lib.base("emo_pms")
    config.target_flops_ratio = 0.5  # pruned MACs / unpruned MACs must be ≤ this
    if arg in PRESETS:
        name, recipe = PRESETS[arg]
        config.data = config_lib.cifar_data("cifar10")
        config.data.validation_size = 0  # network + fine-tuning on all 50k (see docstring)
        config.teacher = config_lib.teacher(name, optim_cfg=config_lib.optim(**recipe))
        config.emo = emo_section()
    elif arg == "imagenet":
        config.data = config_lib.imagenet_data()
        config.teacher = config_lib.teacher(
            "resnet50", optim_cfg=config_lib.imagenet_optim(epochs=90, milestones=(30, 60)))
        config.emo = emo_section(
            batch_size=256, finetune_kd=True,
            finetune=config_lib.optim(epochs=60, batch_size=256, lr=0.01, milestones=(30, 45),
                                      weight_decay=1e-4))
    elif arg == "demo":
        config.data = config_lib.demo_data()
        config.teacher = config_lib.teacher(config_lib.DEMO_TEACHER,
                                             optim_cfg=config_lib.demo_optim())
        finetune = config_lib.demo_optim()
        finetune.epochs, finetune.lr = 1, 0.02
        config.emo = emo_section(population=16, generations=8, candidates_per_subnet=4,
                                 eval_batch=256, impairment_examples=1000,
                                 batch_size=64, selector_steps=150, constraint_steps=50,
                                 taylor_batches=4, finetune=finetune)
    else:
        raise ValueError(f"unknown preset {arg!r} for configs/emo_pms.py; "
                         f"valid: {sorted(PRESETS) + ['imagenet', 'demo']}")
    config.distill = config_lib.distill("kd", init_epochs=1 if arg == "demo" else 30)
    config.lock()
    return config
