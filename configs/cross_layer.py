"""Cross-layer Gram KD with 1×1 adapters and an offline teacher ensemble (Chou, Chiu & Liao,
2021; what follows the paper and what we reconstructed: BUILD_NOTES.md, "Cross-layer Gram
KD").

Stages, each resumable under ``workdir/<stage>/``:
  teacher_<i>  every entry of ``config.teachers``: ``"<zoo name>@<seed>"`` is trained with
               ``teacher_optim`` and that seed (init and data order) — reused when the
               stage has finished; any other entry is a checkpoint path (a stage directory
               such as ``/tmp/sup/model``), loaded and never re-saved;
  stage1       the student backbone + one 1×1 adapter per tap matches the Gram matrices of
               teacher ``cross_layer.target_teacher`` for ``cross_layer.gram_pairs`` (MSE);
  stage2       from the stage-1 student, adapters dropped: γ·CE + α·T²·KL(p̄ ‖ p_s) with
               p̄ the mean of all teachers' softened probabilities (one compiled ensemble
               forward; ``distill.*`` sets T, γ, α); the exported student is a plain zoo
               model.
``cross_layer.ablations=True`` adds, with the same budget: ``student`` (CE alone),
``kd_teacher`` (KD from the target teacher), ``kd_ensemble`` (KD from the ensemble, no
stage 1) and ``stage1_kd_teacher`` (stage 1, then KD from the target teacher).

Paper settings (each needs a prepared TFDS dataset, see README "Datasets"; on a GPU/TPU.
CIFAR: RepDistiller's recipe for teachers, stage 2 and baselines (240 epochs, batch 64,
lr 0.05 ×0.1 at 150/180/210), stage 1 30 epochs at lr 0.05 (our choice); ImageNet-64: our
budget, ``imagenet64_optim`` below):
    python -m kdjax.main --config=configs/cross_layer.py --workdir=/tmp/xl
        CIFAR-100 resnet32 ×2 → resnet8 (paper: +4.38 top-1 over the student alone)
    python -m kdjax.main --config=configs/cross_layer.py:vgg11_vgg6 --workdir=/tmp/xl-vgg
        CIFAR-100 vgg11 ×2 → vgg6 (paper: +3.57)
    python -m kdjax.main --config=configs/cross_layer.py:imagenet64_mobilenet --workdir=/tmp/xl-in64
        TFDS imagenet_resized/64x64, mobilenet16 ×2 → mobilenet9 (paper: +3.98)
Add ``--config.cross_layer.ablations=True`` for the comparison stages. Other teachers
(any number, any zoo architectures with the same classes and input shape; the first is
the Gram target unless ``cross_layer.target_teacher`` says otherwise):
    --config.teachers='("/tmp/sup/model", "resnet56@1", "resnet32@2")'

Demo on the embedded Fashion-MNIST (2 teachers of different architectures, stage 1,
stage 2; 12 min measured on an idle 2-core CPU, teachers included; about twice that with
``--config.cross_layer.ablations=True``, estimated; see BUILD_NOTES):
    python -m kdjax.main --config=configs/cross_layer.py:demo --workdir=/tmp/xl-demo
"""

import ml_collections

from kdjax import config_lib
from kdjax.distill.cross_layer import DEFAULT_PAIRS


# Preset -> (teacher names, student name, Gram pairs of teacher taps). VGG-6 and the
# MobileNets are our own definitions (kdjax.models; BUILD_NOTES).
PRESETS = {
    "": (("resnet32", "resnet32"), "resnet8", DEFAULT_PAIRS),
    "vgg11_vgg6": (("vgg11", "vgg11"), "vgg6",
                   (("stage2", "stage3"), ("stage3", "stage4"), ("stage2", "stage4"))),
    "imagenet64_mobilenet": (("mobilenet16", "mobilenet16"), "mobilenet9",
                             (("stage2", "stage3"), ("stage3", "stage4"), ("stage2", "stage4"))),
}


def imagenet64_data():
    """TFDS ``imagenet_resized/64x64`` (prepared by the user) streamed lazily (1.28M
    images are never copied into each host's memory), crop+flip at the stored 64×64,
    ImageNet normalisation, 10,000 training images carved out for validation, the
    official validation set as test."""
    data = config_lib.imagenet_data(image_size=64, name="imagenet_resized/64x64")
    data.augment = "crop_flip"
    return data


def imagenet64_optim(epochs=40, milestones=(20, 30, 35)):
    """Our ImageNet-64 budget (the paper's is not known): SGD batch 256, lr 0.1 ×0.1 at
    the milestones, weight decay 4e-5 (MobileNet practice)."""
    return config_lib.optim(epochs=epochs, batch_size=256, lr=0.1, milestones=milestones,
                            weight_decay=4e-5)


def cross_layer_section(gram_pairs, stage1_optim) -> ml_collections.ConfigDict:
    """Stage-1 Gram matching (stage 2 and the KD ablations read ``config.distill``).

    target_teacher: index into ``teachers`` of the teacher whose Gram matrices stage 1
      matches (default the first).
    gram_pairs: (tap_a, tap_b) pairs of the target teacher's taps, adjacent or not.
    teacher_taps / student_taps: aligned tap lists when the student names its taps
      differently (() = same names).
    gram_weight: β of the Gram MSE; stage1_ce_weight: CE beside it in stage 1 (0: pure
      Gram matching, as we read the paper).
    ablations: also train the comparison stages (module docstring).
    """
    return ml_collections.ConfigDict(dict(
        target_teacher=0,
        gram_pairs=tuple(gram_pairs),
        teacher_taps=(), student_taps=(),
        gram_weight=1.0, stage1_ce_weight=0.0,
        stage1_optim=stage1_optim,
        ablations=False,
    ))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = config_lib.base("cross_layer")
    if arg in PRESETS:
        teachers, student, pairs = PRESETS[arg]
        if arg == "imagenet64_mobilenet":
            config.data = imagenet64_data()
            make_optim = imagenet64_optim
            stage1_optim = imagenet64_optim(epochs=5, milestones=())
        else:
            config.data = config_lib.cifar_data("cifar100")
            make_optim = config_lib.optim
            stage1_optim = config_lib.optim(epochs=30, milestones=())
    elif arg == "demo":
        # Two teachers of different architectures; resnet8 student; 4 epochs everywhere
        # but stage 1 (1 epoch).
        teachers, student = ("resnet20", "resnet14"), config_lib.DEMO_STUDENT
        pairs = DEFAULT_PAIRS
        config.data = config_lib.demo_data()
        make_optim = config_lib.demo_optim
        stage1_optim = config_lib.optim(epochs=1, batch_size=128, lr=0.1, milestones=(),
                                        schedule="cosine")
    else:
        raise ValueError(f"unknown preset {arg!r} for configs/cross_layer.py; valid: "
                         f"{sorted(PRESETS) + ['demo']}")
    config.teachers = tuple(f"{name}@{seed}" for seed, name in enumerate(teachers))
    config.teacher_optim = make_optim()
    config.student = ml_collections.ConfigDict(dict(name=student))
    config.optim = make_optim()
    config.cross_layer = cross_layer_section(pairs, stage1_optim)
    # stage 2: γ·CE + α·T²·KL to the ensemble, γ = 0.1, α = 0.9, T = 4 (the KD recipe)
    config.distill = config_lib.distill("kd")
    config.lock()
    return config
