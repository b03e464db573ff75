"""Optimizers and learning-rate schedules with PyTorch semantics, given in epochs.

SGD as in ``torch.optim.SGD(momentum=μ, weight_decay=λ)`` (dampening 0, no Nesterov):

    g ← g + λ·w ;  b ← μ·b + g ;  w ← w − η_t·b

which is ``optax.chain(add_decayed_weights(λ), sgd(η_t, momentum=μ))``: optax's
``trace`` keeps ``b ← g + μ·b`` and the first step uses ``b = g`` exactly as PyTorch.
Weight decay applies to every parameter (BN scale/bias and biases too), as in the
published CIFAR KD recipes.
"""

from __future__ import annotations

import optax


def learning_rate_schedule(optim_cfg, steps_per_epoch: int) -> optax.Schedule:
    """Per-step learning rate from an epoch-based config.

    ``schedule="multistep"``: η_t = lr · decay^(number of milestones m with t ≥ m·S)
    where S = steps_per_epoch (PyTorch MultiStepLR stepped once per epoch).
    ``schedule="cosine"``: η_t = lr · ½(1 + cos(π t / (epochs·S))).
    ``schedule="constant"``: η_t = lr.
    An optional linear warm-up over ``warmup_epochs`` precedes any of them.
    """
    total = optim_cfg.epochs * steps_per_epoch
    warmup = int(optim_cfg.get("warmup_epochs", 0) * steps_per_epoch)
    kind = optim_cfg.schedule
    if kind == "multistep":
        boundaries = {int(m * steps_per_epoch): optim_cfg.decay for m in optim_cfg.milestones}
        main = optax.piecewise_constant_schedule(optim_cfg.lr, boundaries)
    elif kind == "cosine":
        main = optax.cosine_decay_schedule(optim_cfg.lr, max(total - warmup, 1))
    elif kind == "constant":
        main = optax.constant_schedule(optim_cfg.lr)
    else:
        raise ValueError(
            f"unknown optim.schedule {kind!r}; valid: 'multistep', 'cosine', 'constant'"
        )
    if warmup <= 0:
        return main
    ramp = optax.linear_schedule(0.0, optim_cfg.lr, warmup)
    return optax.join_schedules([ramp, main], [warmup])


def sgd(optim_cfg, steps_per_epoch: int) -> optax.GradientTransformation:
    """PyTorch-style SGD with momentum and coupled weight decay (see module docstring)."""
    return optax.chain(
        optax.add_decayed_weights(optim_cfg.weight_decay),
        optax.sgd(learning_rate_schedule(optim_cfg, steps_per_epoch), momentum=optim_cfg.momentum),
    )
