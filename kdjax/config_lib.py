"""Building blocks of the pipeline configs in ``configs/`` (shared so presets never drift).

Every config is an ``ml_collections.ConfigDict`` locked after construction, so a
``--config.key=value`` override of a key that does not exist fails at start-up.
"""

from __future__ import annotations

import ml_collections

from kdjax.data import default_data_config

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


def optim(epochs=240, batch_size=64, lr=0.05, milestones=(150, 180, 210), decay=0.1,
          momentum=0.9, weight_decay=5e-4, schedule="multistep", warmup_epochs=0.0):
    """SGD recipe in epochs; defaults: the CIFAR-100 KD recipe (docs/distillation_losses.md)."""
    return ml_collections.ConfigDict(dict(
        epochs=epochs, batch_size=batch_size, lr=lr, milestones=tuple(milestones),
        decay=decay, momentum=momentum, weight_decay=weight_decay, schedule=schedule,
        warmup_epochs=warmup_epochs,
    ))


def cifar_data(name="cifar100"):
    """TFDS CIFAR-10/100 with crop+flip augmentation and the usual normalisation."""
    data = default_data_config()
    data.name = name
    data.source = "tfds"
    data.augment = "crop_flip"
    data.mean, data.std = (CIFAR100_MEAN, CIFAR100_STD) if name == "cifar100" else (
        CIFAR10_MEAN, CIFAR10_STD)
    return data


def imagenet_data(image_size=224, name="imagenet2012", num_workers=16):
    """ImageNet-1k streamed from TFDS array_record (read lazily, never copied into memory):
    random-resized crop + flip for training, resize to image_size/0.875 + centre crop for
    evaluation, ImageNet mean/std. 10k training images are carved as the validation split
    (model selection); TFDS's official validation set is reported as the test split.
    num_workers: grain worker processes per host decoding JPEGs (tune to the host's CPUs)."""
    from kdjax.data.streaming import IMAGENET_MEAN, IMAGENET_STD

    data = default_data_config()
    data.name = name
    data.source = "tfds_stream"
    data.image_size = image_size
    data.augment = "inception_crop"
    data.mean, data.std = IMAGENET_MEAN, IMAGENET_STD
    data.test_split = "validation"
    data.validation_size = 10000
    data.num_workers = num_workers
    return data


def imagenet_optim(epochs=100, milestones=(30, 60, 90)):
    """The standard ImageNet ResNet recipe: SGD momentum 0.9, batch 256, lr 0.1 ×0.1 at
    the milestones, weight decay 1e-4 (100 epochs for KD students; 90 with milestones
    30/60 for teachers trained from scratch)."""
    return optim(epochs=epochs, batch_size=256, lr=0.1, milestones=milestones,
                 weight_decay=1e-4)


def fashion_mnist_data(train_size=0, validation_size=5000):
    """The embedded Fashion-MNIST (Debian package), no augmentation."""
    data = default_data_config()
    data.validation_size = validation_size
    data.name = "fashion_mnist"
    data.source = "idx"
    data.augment = "none"
    data.mean, data.std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    data.train_size = train_size
    return data


def train_settings():
    """Loop settings shared by all pipelines."""
    return ml_collections.ConfigDict(dict(
        num_devices=0,          # 0 = all local devices (on CPU: one per core, see BUILD_NOTES)
        distributed=False,      # True: jax.distributed.initialize() for multi-host runs
        coordinator_address="",  # "host:port" of process 0; "" = auto-detect (TPU VM, Slurm)
        num_processes=-1,       # -1 = auto-detect
        process_id=-1,          # -1 = auto-detect; else 0 .. num_processes-1
        log_every_steps=50,
        eval_every_steps=0,     # 0 = once per epoch
        eval_batch_size=500,
        max_steps=0,            # >0 caps every stage (smoke tests)
        compute_dtype="float32",  # "float32" | "bfloat16" (activations/convs; params,
                                  # optimizer state, BN statistics and losses stay float32)
        allow_config_change=False,  # True: resume although training keys changed (BUILD_NOTES)
    ))


def teacher(name, checkpoint="", optim_cfg=None, select="last"):
    """Teacher section: a checkpoint to load, or a model trained first under workdir/teacher.

    select: which checkpoint of a teacher stage is the teacher, on every path (loaded by
    ``checkpoint``, trained in this run, reused from workdir/teacher): "last" (default —
    the published teachers are last-epoch weights, and it exists without a validation
    split) or "best" (best validation top-1; the last epoch when there is no validation).
    """
    return ml_collections.ConfigDict(dict(
        name=name, checkpoint=checkpoint, select=select, optim=optim_cfg or optim()))


def distill(method: str = "kd", **overrides) -> ml_collections.ConfigDict:
    """The ``distill`` section every distilling pipeline shares (kdjax.distill).

    weight / ce_weight < 0 mean "the method's published default" (RepDistiller's β and γ;
    KD: 0.9 / 0.1), so changing only ``distill.method`` picks that method's values; the
    effective ones are logged. temperature: logit methods (kd, dkd, dynamic_kd).
    student_taps / teacher_taps: () = the method's default taps. init_epochs: the
    initialisation stage of fitnet/ab/ft/fsp (RepDistiller: 30). Each method's own
    hyperparameters sit in ``distill.<method>.*`` (defaults from its class).
    """
    from kdjax.distill import METHODS, method_options

    section = dict(method=method, weight=-1.0, ce_weight=-1.0, temperature=4.0,
                   standardize_logits=False, student_taps=(), teacher_taps=(),
                   init_epochs=30)
    for name in sorted(METHODS):
        options = method_options(name)
        if options:
            section[name] = ml_collections.ConfigDict(options)
    unknown = sorted(set(overrides) - set(section))
    if unknown:
        raise ValueError(f"unknown distill keys {unknown}; valid: {sorted(section)}")
    section.update(overrides)
    return ml_collections.ConfigDict(section)


def base(pipeline: str) -> ml_collections.ConfigDict:
    """Skeleton every pipeline config starts from."""
    config = ml_collections.ConfigDict()
    config.pipeline = pipeline
    config.seed = 0
    config.data = default_data_config()
    config.train = train_settings()
    return config


def synthetic(config: ml_collections.ConfigDict, steps: int = 2) -> ml_collections.ConfigDict:
    """Turn any config into a seconds-long smoke run on synthetic data (used by tests)."""
    config.data.name = "synthetic"
    config.data.source = "synthetic"
    config.data.augment = "none"
    config.data.mean, config.data.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    config.data.validation_size = 64
    config.train.max_steps = steps
    config.train.eval_batch_size = 64
    config.train.log_every_steps = 1
    return config


# The demo pair and budget on the embedded Fashion-MNIST, sized for a 2-core CPU
# (measured figures in BUILD_NOTES.md).
DEMO_TEACHER = "resnet20"
DEMO_STUDENT = "resnet8"


def demo_data():
    """Fashion-MNIST with a 20k training subset and a 2k validation split (the demos)."""
    return fashion_mnist_data(train_size=20000, validation_size=2000)


def protocol_data():
    """The evidence protocol's data (BUILD_NOTES "Evidence protocol"): Fashion-MNIST with
    2,000 training examples, a 2,000-example validation split, no augmentation — scarce
    labels, the regime where soft targets measurably help."""
    return fashion_mnist_data(train_size=2000, validation_size=2000)


def protocol_optim(epochs: int):
    """The evidence protocol's schedule: batch 64, SGD lr 0.1 cosine, weight decay 5e-4
    (student 20 epochs, teacher 30)."""
    return optim(epochs=epochs, batch_size=64, lr=0.1, milestones=(), schedule="cosine",
                 weight_decay=5e-4)


def demo_optim():
    """Short cosine schedule for the Fashion-MNIST demos."""
    return optim(epochs=4, batch_size=128, lr=0.1, milestones=(), schedule="cosine",
                 weight_decay=5e-4)
