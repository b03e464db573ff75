"""SGD and schedules against a hand-written PyTorch-semantics reference in NumPy."""

import chex
import jax
import numpy as np
import optax

from kdjax import config_lib
from kdjax.train import optim


def torch_sgd_reference(w0, grads, lrs, momentum, weight_decay):
    """torch.optim.SGD update rule (dampening 0, no Nesterov), written out in float64."""
    w, buf = np.array(w0, np.float64), None
    for g, lr in zip(grads, lrs):
        d = g + weight_decay * w
        buf = d if buf is None else momentum * buf + d
        w = w - lr * buf
    return w


def test_sgd_matches_torch_rule():
    rng = np.random.default_rng(0)
    cfg = config_lib.optim(epochs=3, lr=0.1, milestones=(1, 2), decay=0.1, weight_decay=5e-4)
    steps_per_epoch = 4
    tx = optim.sgd(cfg, steps_per_epoch)
    shapes = {"conv": (3, 3, 2, 4), "bias": (4,), "dense": {"kernel": (4, 5)}}
    w = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                     is_leaf=lambda s: isinstance(s, tuple))
    grads = [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), w)
             for _ in range(12)]
    params, state = w, tx.init(w)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    lrs = [0.1 * 0.1 ** ((t >= 4) + (t >= 8)) for t in range(12)]
    expected = jax.tree.map(lambda w0, *gs: torch_sgd_reference(w0, gs, lrs, 0.9, 5e-4), w, *grads)
    chex.assert_trees_all_close(params, expected, rtol=1e-5, atol=1e-6)


def test_multistep_boundaries_are_epochs():
    cfg = config_lib.optim(epochs=240, lr=0.05, milestones=(150, 180, 210))
    sched = optim.learning_rate_schedule(cfg, steps_per_epoch=10)
    assert np.isclose(sched(1499), 0.05)
    assert np.isclose(sched(1500), 0.005)
    assert np.isclose(sched(1800), 0.0005)
    assert np.isclose(sched(2100), 0.00005)


def test_cosine_and_unknown_schedule():
    cfg = config_lib.optim(epochs=2, lr=0.2, schedule="cosine")
    sched = optim.learning_rate_schedule(cfg, steps_per_epoch=50)
    assert np.isclose(sched(0), 0.2)
    assert np.isclose(sched(50), 0.1, atol=1e-6)
    cfg.schedule = "linear-ish"
    try:
        optim.learning_rate_schedule(cfg, 10)
    except ValueError as err:
        assert "multistep" in str(err)
    else:
        raise AssertionError("unknown schedule accepted")
