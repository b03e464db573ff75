"""The distillation methods: one small frozen dataclass each, math from ``kdjax.losses``.

Defaults (weights, taps, hyperparameters) are RepDistiller's published CIFAR-100 settings
(``scripts/run_cifar_distill.sh`` and its ``train_student.py``), DKD's are mdistiller's.
RepDistiller's feature list of a CIFAR ResNet [stem, layer1, layer2, layer3, pooled] maps
to our taps ("stem", "stage1", "stage2", "stage3", "embedding"). Every ``loss`` returns
``weight × term``; its metric ``distill/<name>`` is the unweighted term.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from kdjax import controllers, losses
from kdjax.distill import adapters
from kdjax.distill.base import Aux, Method, Outputs

STAGE_TAPS = ("stage1", "stage2", "stage3")


def _same_size(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Average-pool the spatially larger of two NHWC maps to the other's size."""
    (ha, wa), (hb, wb) = a.shape[1:3], b.shape[1:3]
    if (ha, wa) == (hb, wb):
        return a, b
    if ha >= hb:
        return losses.avg_pool_to(a, hb, wb), b
    return a, losses.avg_pool_to(b, ha, wa)


# --------------------------------------------------------------------------------------
# Logit methods
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LogitMethod(Method):
    """A method on the logits; ``standardize_logits`` z-scores both rows first
    (``losses.logit_standardize``, Sun et al. 2024)."""

    temperature: float = 4.0
    standardize_logits: bool = False

    def logits(self, student: Outputs, teacher: Outputs) -> tuple[jax.Array, jax.Array]:
        """(student, teacher) logits [B, K] as the method's loss sees them."""
        z_s, z_t = student.logits, teacher.logits
        if self.standardize_logits:
            z_s, z_t = losses.logit_standardize(z_s), losses.logit_standardize(z_t)
        return z_s, z_t


@dataclasses.dataclass(frozen=True)
class KD(LogitMethod):
    """Hinton KD: β·T²·KL(p_t ‖ p_s), p = softmax(z/T); with γ = 0.1, β = 0.9, T = 4."""

    name: ClassVar[str] = "kd"
    default_weight: ClassVar[float] = 0.9
    default_ce_weight: ClassVar[float] = 0.1

    def loss(self, params, state, student, teacher, batch, *, train=True):
        kd = losses.kd_loss(*self.logits(student, teacher), self.temperature)
        return self.weight * kd, {self.metric(): kd}, state


@dataclasses.dataclass(frozen=True)
class DKD(LogitMethod):
    """Decoupled KD: β·w(e)·(α·TCKD + β_nt·NCKD) at temperature T (``losses.dkd_loss``),
    w(e) = min(e / warmup_epochs, 1) with e the 1-based epoch (mdistiller's linear
    warm-up; ``for_stage`` sets steps_per_epoch, which turns the step into the epoch). mdistiller CIFAR-100:
    α = 1, β_nt = 8, T = 4, 20 warm-up epochs, CE weight 1."""

    name: ClassVar[str] = "dkd"
    alpha: float = 1.0
    beta: float = 8.0
    warmup_epochs: float = 20.0
    steps_per_epoch: int = 1

    def loss(self, params, state, student, teacher, batch, *, train=True):
        z_s, z_t = self.logits(student, teacher)
        dkd = losses.dkd_loss(z_s, z_t, batch["label"], self.alpha, self.beta,
                              self.temperature)
        return self.weight * dkd, {self.metric(): dkd}, state

    def for_stage(self, steps_per_epoch: int) -> "DKD":
        return dataclasses.replace(self, steps_per_epoch=int(steps_per_epoch))

    def term(self, params, state, student, teacher, batch, aux: Aux):
        loss, metrics, state = self.loss(params, state, student, teacher, batch)
        if self.warmup_epochs > 0:
            epoch = (aux.step // self.steps_per_epoch + 1).astype(jnp.float32)
            factor = jnp.minimum(epoch / self.warmup_epochs, 1.0)
            loss = factor * loss
            metrics = {**metrics, self.metric("warmup"): factor}
        return loss, metrics, state, {}


@dataclasses.dataclass(frozen=True)
class DynamicKD(LogitMethod):
    """DynamicKD: β·T²·KL(p_t ‖ q_c), q_c = softmax(c·z_s/T), with the controller c read
    from the optimizer state (``transform`` provides it, chained after SGD).

    The optimizer state is not differentiated, so c is a constant for the model gradient;
    the controller's measurement leaves as the optimizer's extra arguments (on the
    stopped logits): mode "gradient": controller_grad = ∂L_KD/∂c; mode
    "entropy_feedback": student_entropy = H(q_c), teacher_entropy = H(p_t).
    Metrics keep the un-namespaced keys of ``controller.jsonl``: kd, controller
    (mean of c; per class also its min and max), controller_grad (mean), H_q, H_p.
    """

    name: ClassVar[str] = "dynamic_kd"
    default_weight: ClassVar[float] = 0.9
    default_ce_weight: ClassVar[float] = 0.1
    KINDS: ClassVar[tuple[str, ...]] = ("scalar", "per_class")
    MODES: ClassVar[tuple[str, ...]] = ("gradient", "entropy_feedback")

    kind: str = "scalar"
    mode: str = "gradient"
    controller_lr: float = 0.01
    controller_init: float = 1.0
    controller_clip: tuple[float, float] = (0.1, 10.0)
    feedback_rate: float = 0.01
    warmup_epochs: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.kind not in self.KINDS:
            raise ValueError(f"distill.dynamic_kd.kind={self.kind!r} is not implemented; "
                             f"valid: {', '.join(self.KINDS)} (no per-sample head: "
                             f"docs/dynamic_kd.md)")
        if self.mode not in self.MODES:
            raise ValueError(f"distill.dynamic_kd.mode={self.mode!r}; valid: "
                             f"{', '.join(repr(m) for m in self.MODES)}")
        if self.kind == "per_class" and self.mode == "entropy_feedback":
            # The feedback measures batch-mean entropies H(q_c), H(p_t), which would move
            # every class's c by the same factor: a scalar controller in disguise.
            raise ValueError(
                "distill.dynamic_kd.kind='per_class' with mode='entropy_feedback' is not "
                "supported (batch-mean entropies would move every class's c alike); valid: "
                "kind='scalar' with mode='entropy_feedback', or kind='per_class' with "
                "mode='gradient'")

    def loss(self, params, state, student, teacher, batch, *, train=True):
        raise NotImplementedError("dynamic_kd reads its controller from the optimizer "
                                  "state: use term(..., aux)")

    def term(self, params, state, student, teacher, batch, aux: Aux):
        z_s, z_t = self.logits(student, teacher)
        c = controllers.controller_value(aux.opt_state)
        kd = losses.dynamic_kd_loss(z_s, z_t, c, self.temperature, controller_kind=self.kind)
        z = jax.lax.stop_gradient(z_s)
        h_q, h_p = controllers.controller_entropies(z, z_t, c, self.temperature,
                                                    controller_kind=self.kind)
        grad_c = controllers.kd_controller_grad(z, z_t, c, self.temperature,
                                                controller_kind=self.kind)
        metrics = {"kd": kd, "controller": c.mean(), "controller_grad": grad_c.mean(),
                   "H_q": h_q, "H_p": h_p}
        if self.kind == "per_class":
            metrics.update(controller_min=c.min(), controller_max=c.max())
        if self.mode == "gradient":
            extra = {"controller_grad": grad_c}
        else:
            extra = {"student_entropy": h_q, "teacher_entropy": h_p}
        return self.weight * kd, metrics, state, extra

    def transform(self, num_classes: int, steps_per_epoch: int):
        """``controllers.entropy_controller``; warm-up epochs → round(epochs · S) steps."""
        return controllers.entropy_controller(
            learning_rate=self.controller_lr, init=self.controller_init,
            clip=tuple(self.controller_clip), kind=self.kind,
            num_classes=num_classes if self.kind == "per_class" else None, mode=self.mode,
            feedback_rate=self.feedback_rate,
            warmup_steps=int(round(self.warmup_epochs * steps_per_epoch)))


# --------------------------------------------------------------------------------------
# Feature methods without adapters
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PairwiseFeatureMethod(Method):
    """β·Σ_pairs term(student tap, teacher tap) for a ``pair_loss`` without parameters."""

    def pair_loss(self, s: jax.Array, t: jax.Array) -> jax.Array:
        raise NotImplementedError

    def loss(self, params, state, student, teacher, batch, *, train=True):
        term = sum([self.pair_loss(s, t) for s, t in self.pairs(student, teacher)])
        return self.weight * term, {self.metric(): term}, state


@dataclasses.dataclass(frozen=True)
class AT(PairwiseFeatureMethod):
    """Attention transfer on stages 1–3, p = 2, β = 1000 (``losses.attention_transfer_loss``)."""

    name: ClassVar[str] = "at"
    default_weight: ClassVar[float] = 1000.0
    default_taps: ClassVar[tuple[str, ...]] = STAGE_TAPS
    p: float = 2.0

    def pair_loss(self, s, t):
        return losses.attention_transfer_loss(s, t, p=self.p)


@dataclasses.dataclass(frozen=True)
class SP(PairwiseFeatureMethod):
    """Similarity preserving on the last stage, β = 3000."""

    name: ClassVar[str] = "sp"
    default_weight: ClassVar[float] = 3000.0
    default_taps: ClassVar[tuple[str, ...]] = ("stage3",)

    def pair_loss(self, s, t):
        return losses.similarity_preserving_loss(s, t)


@dataclasses.dataclass(frozen=True)
class NST(PairwiseFeatureMethod):
    """Neuron selectivity transfer (polynomial MMD) on stages 1–3, β = 50."""

    name: ClassVar[str] = "nst"
    default_weight: ClassVar[float] = 50.0
    default_taps: ClassVar[tuple[str, ...]] = STAGE_TAPS

    def pair_loss(self, s, t):
        return losses.nst_loss(s, t)


@dataclasses.dataclass(frozen=True)
class RKD(PairwiseFeatureMethod):
    """Relational KD on the pooled embedding: 25·distance + 50·angle, β = 1."""

    name: ClassVar[str] = "rkd"
    default_taps: ClassVar[tuple[str, ...]] = ("embedding",)
    distance_weight: float = 25.0
    angle_weight: float = 50.0

    def pair_loss(self, s, t):
        return losses.rkd_loss(s, t, self.distance_weight, self.angle_weight)


@dataclasses.dataclass(frozen=True)
class PKT(PairwiseFeatureMethod):
    """Probabilistic knowledge transfer on the pooled embedding, β = 30000.

    ``losses.pkt_loss`` averages the per-example KL over the batch; RepDistiller averages
    over all B² entries, i.e. divides by B once more, and its β assumes that: the term
    here is ``pkt_loss / B`` so that β keeps its published meaning.
    """

    name: ClassVar[str] = "pkt"
    default_weight: ClassVar[float] = 30000.0
    default_taps: ClassVar[tuple[str, ...]] = ("embedding",)

    def pair_loss(self, s, t):
        return losses.pkt_loss(s, t) / s.shape[0]


# --------------------------------------------------------------------------------------
# Methods with adapters
# --------------------------------------------------------------------------------------


def _init_adapters(rng, modules, inputs) -> tuple[dict, dict]:
    """Params and batch_stats of one adapter per input, keyed "0", "1", ..."""
    params, stats = {}, {}
    for i, (module, x) in enumerate(zip(modules, inputs)):
        params[str(i)], stats[str(i)] = adapters.init_module(
            module, jax.random.fold_in(rng, i), x)
    return params, stats


def _run_adapters(modules, params, stats, inputs, train: bool) -> tuple[list, dict]:
    """Outputs of the adapters on their inputs, and their new batch_stats."""
    outputs, new_stats = [], {}
    for i, (module, x) in enumerate(zip(modules, inputs)):
        out, new_stats[str(i)] = adapters.run_module(module, params[str(i)], stats[str(i)],
                                                     x, train)
        outputs.append(out)
    return outputs, new_stats


@dataclasses.dataclass(frozen=True)
class FitNet(Method):
    """FitNets hint: β·MSE(regressor(student stage2), teacher stage2), β = 100, after a
    hint stage that trains the student's feature layers and the regressor on the same
    MSE alone (RepDistiller's ``hint_layer = 2``)."""

    name: ClassVar[str] = "fitnet"
    init_stage: ClassVar[bool] = True
    default_weight: ClassVar[float] = 100.0
    default_taps: ClassVar[tuple[str, ...]] = ("stage2",)

    def modules(self, teacher: Outputs):
        return [adapters.HintRegressor(tuple(teacher.features[t].shape[1:]))
                for t in self.t_taps]

    def init(self, rng, student, teacher, num_examples):
        inputs = [student.features[s] for s in self.s_taps]
        params, stats = _init_adapters(rng, self.modules(teacher), inputs)
        return params, {"batch_stats": stats}

    def hint(self, params, state, student, teacher, train=True):
        pairs = self.pairs(student, teacher)
        outs, stats = _run_adapters(self.modules(teacher), params, state["batch_stats"],
                                    [s for s, _ in pairs], train)
        term = sum([losses.hint_loss(o, t) for o, (_, t) in zip(outs, pairs)])
        return term, {**state, "batch_stats": stats}

    def loss(self, params, state, student, teacher, batch, *, train=True):
        term, state = self.hint(params, state, student, teacher, train)
        return self.weight * term, {self.metric(): term}, state

    def init_stage_loss(self, params, state, student, teacher, batch):
        term, state = self.hint(params, state, student, teacher)
        return term, {self.metric("init"): term}, state


@dataclasses.dataclass(frozen=True)
class AB(Method):
    """Activation boundaries on stages 1–3 through conv1x1+BN connectors, margin 1.

    Init stage (RepDistiller): the student's feature layers and the connectors learn
    Σ_l w_l·(3/1000)·Σ_elements e_l / B with w_l = 2^(l−L+1) (``losses.ab_loss`` is the
    per-example mean of e, so it is scaled by the elements per example). The main stage
    adds no AB term in RepDistiller (``loss_kd = 0``; its β = 1 multiplies zero), so
    ``loss`` is 0 here too. Our taps are post-ReLU (RepDistiller: pre-ReLU); see
    BUILD_NOTES.
    """

    name: ClassVar[str] = "ab"
    init_stage: ClassVar[bool] = True
    default_taps: ClassVar[tuple[str, ...]] = STAGE_TAPS
    margin: float = 1.0

    def modules(self, teacher: Outputs):
        return [adapters.Connector(teacher.features[t].shape[-1]) for t in self.t_taps]

    def init(self, rng, student, teacher, num_examples):
        inputs = [student.features[s] for s in self.s_taps]
        params, stats = _init_adapters(rng, self.modules(teacher), inputs)
        return params, {"batch_stats": stats}

    def loss(self, params, state, student, teacher, batch, *, train=True):
        return jnp.zeros((), jnp.float32), {}, state

    def init_stage_loss(self, params, state, student, teacher, batch):
        pairs = self.pairs(student, teacher)
        outs, stats = _run_adapters(self.modules(teacher), params, state["batch_stats"],
                                    [s for s, _ in pairs], True)
        n = len(pairs)
        terms = [2.0 ** (i - n + 1) * 3e-3 * math.prod(t.shape[1:])
                 * losses.ab_loss(o, t, self.margin)
                 for i, (o, (_, t)) in enumerate(zip(outs, pairs))]
        term = sum(terms)
        return term, {self.metric("init"): term}, {**state, "batch_stats": stats}


@dataclasses.dataclass(frozen=True)
class FSP(Method):
    """FSP matrices of consecutive taps (stem→stage1→stage2→stage3), learnt in the init
    stage by the student's feature layers; like AB, RepDistiller's main stage adds no FSP
    term (its β = 50 multiplies zero), so ``loss`` is 0. RepDistiller sums the pairs'
    losses; ``losses.fsp_loss`` averages them, hence the factor n_pairs."""

    name: ClassVar[str] = "fsp"
    init_stage: ClassVar[bool] = True
    default_weight: ClassVar[float] = 50.0
    default_taps: ClassVar[tuple[str, ...]] = ("stem",) + STAGE_TAPS

    def validate(self, student_taps, teacher_taps):
        super().validate(student_taps, teacher_taps)
        if len(self.s_taps) < 2:
            raise ValueError(f"fsp needs at least two taps (consecutive pairs), got "
                             f"{list(self.s_taps)}")

    def init(self, rng, student, teacher, num_examples):
        for (s, t), s_tap, t_tap in zip(self.pairs(student, teacher), self.s_taps,
                                         self.t_taps):
            if s.shape[-1] != t.shape[-1]:
                raise ValueError(f"fsp compares FSP matrices, so tap channels must match: "
                                 f"student {s_tap} has {s.shape[-1]}, teacher {t_tap} has "
                                 f"{t.shape[-1]}; choose other distill.*_taps")
        return {}, {}

    def loss(self, params, state, student, teacher, batch, *, train=True):
        return jnp.zeros((), jnp.float32), {}, state

    def init_stage_loss(self, params, state, student, teacher, batch):
        s = [student.features[k] for k in self.s_taps]
        t = [teacher.features[k] for k in self.t_taps]
        n = len(s) - 1
        term = n * losses.fsp_loss(list(zip(s[:-1], s[1:])), list(zip(t[:-1], t[1:])))
        return term, {self.metric("init"): term}, state


@dataclasses.dataclass(frozen=True)
class FT(Method):
    """Factor transfer on the last stage, β = 200: L1 between the L2-normalised factors of
    the student's translator and the teacher's paraphraser (k = 0.5).

    Init stage: only the paraphraser learns, reconstructing the teacher's map (MSE). In
    the main stage it is frozen (eval mode): it moves from the params to the state, and
    the translator (fresh) is the only adapter trained.
    """

    name: ClassVar[str] = "ft"
    init_stage: ClassVar[bool] = True
    init_stage_trains_student: ClassVar[bool] = False
    default_weight: ClassVar[float] = 200.0
    default_taps: ClassVar[tuple[str, ...]] = ("stage3",)
    rate: float = 0.5

    def validate(self, student_taps, teacher_taps):
        super().validate(student_taps, teacher_taps)
        if len(self.s_taps) != 1:
            raise ValueError(f"ft reads one tap pair, got {list(self.s_taps)}")

    def _modules(self, teacher: Outputs):
        channels = teacher.features[self.t_taps[0]].shape[-1]
        return (adapters.Paraphraser(self.rate),
                adapters.Translator(int(round(channels * self.rate))))

    def init(self, rng, student, teacher, num_examples):
        paraphraser, translator = self._modules(teacher)
        k_p, k_t = jax.random.split(rng)
        p_params, p_stats = adapters.init_module(paraphraser, k_p,
                                                 teacher.features[self.t_taps[0]])
        t_params, t_stats = adapters.init_module(translator, k_t,
                                                 student.features[self.s_taps[0]])
        return ({"translator": t_params},
                {"translator": t_stats, "paraphraser": {"params": p_params,
                                                        "batch_stats": p_stats}})

    def init_stage_variables(self, params, state):
        para = state["paraphraser"]
        return {"paraphraser": para["params"]}, {"paraphraser": para["batch_stats"]}

    def after_init_stage(self, params, state, trained_params, trained_state):
        para = {"params": trained_params["paraphraser"],
                "batch_stats": trained_state["paraphraser"]}
        return params, {**state, "paraphraser": para}

    def loss(self, params, state, student, teacher, batch, *, train=True):
        paraphraser, translator = self._modules(teacher)
        (s, t), = self.pairs(student, teacher)
        para = state["paraphraser"]
        factor_t = paraphraser.apply(para, t, train=False, decode=False)
        factor_s, stats = adapters.run_module(translator, params["translator"],
                                              state["translator"], s, train)
        term = losses.factor_transfer_loss(factor_s, factor_t)
        return self.weight * term, {self.metric(): term}, {**state, "translator": stats}

    def init_stage_loss(self, params, state, student, teacher, batch):
        paraphraser, _ = self._modules(teacher)
        (_, t), = self.pairs(student, teacher)
        (_, rebuilt), stats = adapters.run_module(
            paraphraser, params["paraphraser"], state["paraphraser"], t, True)
        term = jnp.mean((rebuilt - t) ** 2)
        return term, {self.metric("init"): term}, {"paraphraser": stats}


@dataclasses.dataclass(frozen=True)
class CC(Method):
    """Correlation congruence on linear embeddings (dim 128, one head per side, both
    trained) of the pooled features, β = 0.02 (``losses.correlation_congruence_loss``:
    the paper's Gaussian-kernel correlation; RepDistiller's is a simplification)."""

    name: ClassVar[str] = "cc"
    default_weight: ClassVar[float] = 0.02
    default_taps: ClassVar[tuple[str, ...]] = ("embedding",)
    feat_dim: int = 128

    def init(self, rng, student, teacher, num_examples):
        (s, t), = self.pairs(student, teacher)
        head = adapters.Embed(self.feat_dim)
        k_s, k_t = jax.random.split(rng)
        return ({"student": adapters.init_module(head, k_s, s)[0],
                 "teacher": adapters.init_module(head, k_t, t)[0]}, {})

    def validate(self, student_taps, teacher_taps):
        super().validate(student_taps, teacher_taps)
        if len(self.s_taps) != 1:
            raise ValueError(f"cc reads one tap pair, got {list(self.s_taps)}")

    def loss(self, params, state, student, teacher, batch, *, train=True):
        (s, t), = self.pairs(student, teacher)
        head = adapters.Embed(self.feat_dim)
        e_s = head.apply({"params": params["student"]}, s)
        e_t = head.apply({"params": params["teacher"]}, t)
        term = losses.correlation_congruence_loss(e_s, e_t)
        return self.weight * term, {self.metric(): term}, state


@dataclasses.dataclass(frozen=True)
class VID(Method):
    """Variational information distillation on stages 1–3, β = 1: per pair a regressor
    (conv1x1-ReLU-conv1x1-ReLU-conv1x1) predicts the teacher map's mean, with a learnt
    per-channel variance softplus(α)+ε, α initialised for variance 5, ε = 1e-5."""

    name: ClassVar[str] = "vid"
    default_taps: ClassVar[tuple[str, ...]] = STAGE_TAPS
    init_variance: float = 5.0
    eps: float = 1e-5

    def modules(self, teacher: Outputs):
        return [adapters.VIDRegressor(teacher.features[t].shape[-1]) for t in self.t_taps]

    def init(self, rng, student, teacher, num_examples):
        inputs = [student.features[s] for s in self.s_taps]
        params, _ = _init_adapters(rng, self.modules(teacher), inputs)
        alpha0 = math.log(math.expm1(self.init_variance - self.eps))
        log_var = {str(i): jnp.full((teacher.features[t].shape[-1],), alpha0, jnp.float32)
                   for i, t in enumerate(self.t_taps)}
        return {"regressors": params, "log_variance": log_var}, {}

    def loss(self, params, state, student, teacher, batch, *, train=True):
        terms = []
        for i, (module, (s, t)) in enumerate(zip(self.modules(teacher),
                                                 self.pairs(student, teacher))):
            mean = module.apply({"params": params["regressors"][str(i)]}, s)
            mean, t = _same_size(mean, t)
            terms.append(losses.vid_loss(mean, t, params["log_variance"][str(i)],
                                         eps=self.eps))
        term = sum(terms)
        return self.weight * term, {self.metric(): term}, state


@dataclasses.dataclass(frozen=True)
class CRD(Method):
    """Contrastive representation distillation, β = 0.8: L2-normalised linear heads
    (dim 128) on both pooled features, two memory banks of the training set's embeddings
    (rows = dataset indices, momentum 0.5), ``num_negatives`` = 16384 rows drawn
    uniformly per example, τ = 0.07, and the NCE normaliser Z of each direction estimated
    on the first batch and then frozen (all RepDistiller's). The term is
    NCE(student anchor | teacher bank) + NCE(teacher anchor | student bank); the banks
    are then updated at the batch's indices.
    """

    name: ClassVar[str] = "crd"
    default_weight: ClassVar[float] = 0.8
    default_taps: ClassVar[tuple[str, ...]] = ("embedding",)
    feat_dim: int = 128
    num_negatives: int = 16384
    nce_temperature: float = 0.07
    momentum: float = 0.5

    def validate(self, student_taps, teacher_taps):
        super().validate(student_taps, teacher_taps)
        if len(self.s_taps) != 1:
            raise ValueError(f"crd reads one tap pair, got {list(self.s_taps)}")

    def init(self, rng, student, teacher, num_examples):
        (s, t), = self.pairs(student, teacher)
        head = adapters.Embed(self.feat_dim, normalize=True)
        k_s, k_t, k_bs, k_bt, k_neg = jax.random.split(rng, 5)
        bound = 1.0 / math.sqrt(self.feat_dim / 3.0)
        bank = lambda k: jax.random.uniform(  # noqa: E731
            k, (num_examples, self.feat_dim), jnp.float32, -bound, bound)
        params = {"student": adapters.init_module(head, k_s, s)[0],
                  "teacher": adapters.init_module(head, k_t, t)[0]}
        state = {"student_bank": bank(k_bs), "teacher_bank": bank(k_bt),
                 "z_student": -jnp.ones((), jnp.float32),
                 "z_teacher": -jnp.ones((), jnp.float32),
                 "rng": k_neg}
        return params, state

    def loss(self, params, state, student, teacher, batch, *, train=True):
        (s, t), = self.pairs(student, teacher)
        head = adapters.Embed(self.feat_dim, normalize=True)
        e_s = head.apply({"params": params["student"]}, s)
        e_t = head.apply({"params": params["teacher"]}, t)
        index = batch["index"]
        num_data = state["student_bank"].shape[0]
        rng, k_neg = jax.random.split(state["rng"])
        negatives = jax.random.randint(k_neg, (index.shape[0], self.num_negatives), 0,
                                       num_data)

        def direction(anchor, bank, z):
            positive, negs = bank[index], bank[negatives]
            z = jnp.where(z > 0, z, losses.crd_estimate_normalizer(
                anchor, positive, negs, num_data, self.nce_temperature))
            nce = losses.crd_nce_loss(anchor, positive, negs, z, num_data,
                                      self.nce_temperature)
            return nce, jax.lax.stop_gradient(z)

        loss_s, z_s = direction(e_s, state["teacher_bank"], state["z_student"])
        loss_t, z_t = direction(e_t, state["student_bank"], state["z_teacher"])
        term = loss_s + loss_t
        new_state = state
        if train:
            new_state = {
                "student_bank": losses.crd_memory_update(state["student_bank"], index, e_s,
                                                         self.momentum),
                "teacher_bank": losses.crd_memory_update(state["teacher_bank"], index, e_t,
                                                         self.momentum),
                "z_student": z_s, "z_teacher": z_t, "rng": rng}
        return self.weight * term, {self.metric(): term}, new_state


METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (
    KD, DKD, FitNet, AT, SP, CC, VID, RKD, PKT, AB, FT, FSP, NST, CRD, DynamicKD)}
