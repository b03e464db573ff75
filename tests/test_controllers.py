"""Tests of kdjax.controllers (the DynamicKD entropy controller)."""

import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import controllers as C
from kdjax import losses as L

from helpers import np_log_softmax, np_softmax

T = 4.0


# ---------------------------------------------------------------------------
# float64 NumPy references
# ---------------------------------------------------------------------------


def np_norm_weights(b, w=None):
    if w is None:
        return np.full(b, 1.0 / b)
    w = np.asarray(w, np.float64)
    return w / w.sum()


def np_dyn_kd(zs, zt, c, T, w=None):
    """Batch (weighted) mean of T^2 KL(softmax(zt/T) || softmax(c zs/T))."""
    zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
    lp, lq = np_log_softmax(zt / T), np_log_softmax(np.asarray(c) * zs / T)
    per = T * T * (np.exp(lp) * (lp - lq)).sum(-1)
    return (np_norm_weights(len(per), w) * per).sum()


def np_moment_gap(zs, zt, c, T, w=None):
    """Batch mean of E_{q_c}[z_s] - E_{p_t}[z_s] (scalar c)."""
    zs = np.asarray(zs, np.float64)
    q, p = np_softmax(c * zs / T), np_softmax(np.asarray(zt, np.float64) / T)
    gap = (q * zs).sum(-1) - (p * zs).sum(-1)
    return (np_norm_weights(len(gap), w) * gap).sum()


def np_var_q(zs, c, T):
    zs = np.asarray(zs, np.float64)
    q = np_softmax(c * zs / T)
    m = (q * zs).sum(-1, keepdims=True)
    return ((q * (zs - m) ** 2).sum(-1)).mean()


def np_bisect_c_star(zs, zt, T, lo=1e-3, hi=1e3, iters=200):
    """Moment-matching c*: batch-mean gap(c*) = 0 (gap is increasing in c)."""
    assert np_moment_gap(zs, zt, lo, T) < 0 < np_moment_gap(zs, zt, hi, T)
    for _ in range(iters):
        mid = np.sqrt(lo * hi)
        if np_moment_gap(zs, zt, mid, T) < 0:
            lo = mid
        else:
            hi = mid
    return np.sqrt(lo * hi)


def rand(seed, shape, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(
        np.float32)


def close(a, b, rtol=2e-5, atol=2e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol,
                               atol=atol)


dyn_loss = jax.jit(L.dynamic_kd_loss, static_argnames=("controller_kind",))
ctrl_grad = jax.jit(C.kd_controller_grad, static_argnames=("controller_kind",))


# ---------------------------------------------------------------------------
# Closed-form controller gradient
# ---------------------------------------------------------------------------


def test_controller_grad_scalar_closed_form_autodiff_fd():
    b, k = 6, 5
    zs, zt, w = rand(0, (b, k), 2), rand(1, (b, k), 3), np.abs(rand(2, (b,)))
    for c in (0.4, 1.0, 2.3):
        for weights in (None, w):
            closed = ctrl_grad(zs, zt, jnp.float32(c), T, weights)
            auto = jax.jit(jax.grad(L.dynamic_kd_loss, argnums=2))(
                zs, zt, jnp.float32(c), T, weights)
            # derived formula written out in NumPy: T * (E_q[z_s] - E_p[z_s])
            formula = T * np_moment_gap(zs, zt, c, T, weights)
            h = 1e-5
            fd = (np_dyn_kd(zs, zt, c + h, T, weights)
                  - np_dyn_kd(zs, zt, c - h, T, weights)) / (2 * h)
            close(formula, fd, rtol=1e-6, atol=1e-8)
            close(closed, formula, rtol=1e-4, atol=1e-5)
            close(auto, formula, rtol=1e-4, atol=1e-5)
            assert closed.shape == ()


def test_controller_grad_per_class_and_per_sample():
    b, k = 6, 4
    zs, zt, w = rand(0, (b, k), 2), rand(1, (b, k), 3), np.abs(rand(2, (b,)))
    ck = np.exp(rand(3, (k,), 0.4))
    cb = np.exp(rand(4, (b,), 0.4))
    h = 1e-5
    for weights in (None, w):
        # per class: FD on each c_k of the NumPy loss
        fd = np.zeros(k)
        for j in range(k):
            e = np.zeros(k)
            e[j] = h
            fd[j] = (np_dyn_kd(zs, zt, ck + e, T, weights)
                     - np_dyn_kd(zs, zt, ck - e, T, weights)) / (2 * h)
        # formula: sum_i w_i T z_ik (q_ik - p_ik)
        q, p = np_softmax(ck * zs.astype(np.float64) / T), np_softmax(zt / T)
        formula = (np_norm_weights(b, weights)[:, None] * T * zs * (q - p)).sum(0)
        close(formula, fd, rtol=1e-6, atol=1e-8)
        closed = ctrl_grad(zs, zt, ck, T, weights)
        auto = jax.grad(L.dynamic_kd_loss, argnums=2)(zs, zt, jnp.asarray(ck),
                                                      T, weights)
        assert closed.shape == (k,)
        close(closed, formula, rtol=1e-4, atol=1e-5)
        close(auto, formula, rtol=1e-4, atol=1e-5)
        # per sample, both [B] and [B, 1]
        for cs in (cb, cb[:, None]):
            closed = ctrl_grad(zs, zt, cs, T, weights)
            auto = jax.grad(L.dynamic_kd_loss, argnums=2)(
                zs, zt, jnp.asarray(cs), T, weights)
            assert closed.shape == cs.shape
            close(closed, np.asarray(auto), rtol=1e-4, atol=1e-6)
    # B == K: explicit kind
    z4 = rand(5, (4, 4), 2)
    g = ctrl_grad(z4, z4 * 2, np.ones(4, np.float32), T,
                  controller_kind="per_class")
    auto = jax.grad(lambda c: L.dynamic_kd_loss(
        z4, z4 * 2, c, T, controller_kind="per_class"))(jnp.ones(4))
    close(g, np.asarray(auto), rtol=1e-4, atol=1e-6)


def test_second_derivative_is_variance():
    b, k = 5, 6
    zs, zt = rand(0, (b, k), 2), rand(1, (b, k), 3)
    d2 = jax.jit(jax.grad(jax.grad(
        lambda c: L.dynamic_kd_loss(zs, zt, c, T))))
    for c in (0.5, 1.0, 3.0):
        expected = np_var_q(zs, c, T)  # mean_i Var_{q_c,i}(z_s,i)
        h = 1e-4
        fd = (T * np_moment_gap(zs, zt, c + h, T)
              - T * np_moment_gap(zs, zt, c - h, T)) / (2 * h)
        close(fd, expected, rtol=1e-6)
        close(d2(jnp.float32(c)), expected, rtol=2e-4)
        assert expected >= 0


class PureFunctionsJitAndEagerTest(chex.TestCase):
    """The pure controller functions give the float64 NumPy values with and without jit."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_controller_grad_matches_numpy(self):
        b, k = 6, 5
        zs, zt, w = rand(0, (b, k), 2), rand(1, (b, k), 3), np.abs(rand(2, (b,)))
        grad = self.variant(C.kd_controller_grad)
        g = grad(zs, zt, jnp.float32(1.7), T, w)
        chex.assert_shape(g, ())
        close(g, T * np_moment_gap(zs, zt, 1.7, T, w), rtol=1e-4, atol=1e-5)
        ck = np.exp(rand(3, (k,), 0.4))
        q, p = np_softmax(ck * zs.astype(np.float64) / T), np_softmax(zt / T)
        expected = (T * zs * (q - p)).mean(0)  # sum_i (1/B) T z_ik (q_ik - p_ik)
        g = grad(zs, zt, ck, T)
        chex.assert_shape(g, (k,))
        close(g, expected, rtol=1e-4, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_entropies_match_numpy(self):
        zs, zt = rand(0, (8, 5), 0.5), rand(1, (8, 5), 4.0)
        hs, ht = self.variant(C.controller_entropies)(zs, zt, 1.3, T)
        q, p = np_softmax(1.3 * zs.astype(np.float64) / T), np_softmax(zt / T)
        chex.assert_trees_all_close((hs, ht), ((-(q * np.log(q)).sum(-1)).mean(),
                                               (-(p * np.log(p)).sum(-1)).mean()), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_update_step_formula(self):
        lr, init, g = 0.1, 1.5, 0.7
        opt = C.entropy_controller(learning_rate=lr, init=init)
        update = self.variant(lambda s, cg: opt.update({}, s, None, controller_grad=cg)[1])
        state = update(opt.init({}), jnp.float32(g))
        chex.assert_trees_all_close(  # theta <- theta - lr * c * dL/dc
            state, C.EntropyControllerState(np.float32(np.log(init) - lr * init * g), np.int32(1)),
            rtol=1e-6)


# ---------------------------------------------------------------------------
# The optax transformation
# ---------------------------------------------------------------------------


def _chain_step(opt, state, grads, **extra):
    return jax.jit(lambda s, g: opt.update(g, s, None, **extra))(state, grads)


def test_passes_updates_through_and_single_step_formula():
    params = {"w": jnp.ones((3,)), "b": jnp.zeros(())}
    grads = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array(0.5)}
    lr, init = 0.1, 1.5
    opt = optax.chain(optax.sgd(0.3, momentum=0.9),
                      C.entropy_controller(learning_rate=lr, init=init))
    ref = optax.sgd(0.3, momentum=0.9)
    st, rst = opt.init(params), ref.init(params)
    close(C.controller_value(st), init, rtol=1e-6)
    g = 0.7
    upd, st = opt.update(grads, st, params, controller_grad=jnp.float32(g))
    rupd, rst = ref.update(grads, rst, params)
    for a, b_ in zip(jax.tree.leaves(upd), jax.tree.leaves(rupd)):
        assert np.array_equal(a, b_)
    # theta <- theta - lr * c * dL/dc
    close(C.controller_value(st), np.exp(np.log(init) - lr * init * g),
          rtol=1e-6)
    assert int(C.controller_state(st).count) == 1


def test_frozen_controller_is_exactly_vanilla_kd():
    b, din, k = 8, 5, 4
    x, zt = rand(0, (b, din)), rand(1, (b, k), 3)
    y = np.random.default_rng(2).integers(0, k, b).astype(np.int32)
    params = {"w": jnp.asarray(rand(3, (din, k), 0.3)), "b": jnp.zeros(k)}

    def model(p, x):
        return x @ p["w"] + p["b"]

    opt_dyn = optax.chain(optax.sgd(0.1, momentum=0.9),
                          C.entropy_controller(learning_rate=0.0))
    opt_kd = optax.sgd(0.1, momentum=0.9)

    @jax.jit
    def step_dyn(p, s):
        c = C.controller_value(s)

        def loss(p):
            z = model(p, x)
            return 0.1 * L.cross_entropy(z, y) + 0.9 * L.dynamic_kd_loss(
                z, zt, c, T), z
        (_, z), g = jax.value_and_grad(loss, has_aux=True)(p)
        u, s = opt_dyn.update(g, s, p,
                              controller_grad=C.kd_controller_grad(z, zt, c, T))
        return optax.apply_updates(p, u), s

    @jax.jit
    def step_kd(p, s):
        def loss(p):
            z = model(p, x)
            return 0.1 * L.cross_entropy(z, y) + 0.9 * L.kd_loss(z, zt, T)
        g = jax.grad(loss)(p)
        u, s = opt_kd.update(g, s, p)
        return optax.apply_updates(p, u), s

    pd, sd = params, opt_dyn.init(params)
    pk, sk = params, opt_kd.init(params)
    for _ in range(4):
        pd, sd = step_dyn(pd, sd)
        pk, sk = step_kd(pk, sk)
    for a, b_ in zip(jax.tree.leaves(pd), jax.tree.leaves(pk)):
        assert np.array_equal(a, b_)
    assert float(C.controller_value(sd)) == 1.0


def test_gradient_mode_converges_to_moment_matching_c():
    b, k = 16, 6
    zs = rand(0, (b, k), 1.5)
    zt = 2.5 * zs + rand(1, (b, k), 0.3)
    c_star = np_bisect_c_star(zs, zt, T)
    assert 1.5 < c_star < 4.0
    opt = C.entropy_controller(learning_rate=0.05)

    def body(state, _):
        c = jnp.exp(state.log_c)
        g = C.kd_controller_grad(zs, zt, c, T)
        _, state = opt.update({}, state, None, controller_grad=g)
        return state, None

    state, _ = jax.jit(lambda s: jax.lax.scan(body, s, None, length=400))(
        opt.init({}))
    close(jnp.exp(state.log_c), c_star, rtol=1e-4)
    # the fixed point is a minimum of the KD term
    assert np_dyn_kd(zs, zt, c_star, T) < np_dyn_kd(zs, zt, c_star * 1.05, T)
    assert np_dyn_kd(zs, zt, c_star, T) < np_dyn_kd(zs, zt, c_star / 1.05, T)
    assert np_dyn_kd(zs, zt, c_star, T) < np_dyn_kd(zs, zt, 1.0, T)


def test_per_class_gradient_mode_reaches_stationary_point():
    b, k = 16, 4
    zs = rand(0, (b, k), 1.5)
    zt = zs * np.array([2.0, 1.0, 0.7, 3.0], np.float32) + rand(1, (b, k), 0.2)
    opt = C.entropy_controller(learning_rate=0.05, kind="per_class",
                               num_classes=k)

    def body(state, _):
        g = C.kd_controller_grad(zs, zt, jnp.exp(state.log_c), T)
        return opt.update({}, state, None, controller_grad=g)[1], None

    state, _ = jax.jit(lambda s: jax.lax.scan(body, s, None, length=1500))(
        opt.init({}))
    c = np.asarray(jnp.exp(state.log_c), np.float64)
    assert c.shape == (k,)
    g = ctrl_grad(zs, zt, c.astype(np.float32), T)
    assert np.max(np.abs(np.asarray(g))) < 1e-3
    assert np_dyn_kd(zs, zt, c, T) < np_dyn_kd(zs, zt, np.ones(k), T)


def test_clipping():
    opt = C.entropy_controller(learning_rate=1.0, clip=(0.5, 2.0))
    st = opt.init({})
    for _ in range(3):
        _, st = opt.update({}, st, None, controller_grad=jnp.float32(1e4))
    close(C.controller_value(st), 0.5, rtol=1e-6)
    for _ in range(3):
        _, st = opt.update({}, st, None, controller_grad=jnp.float32(-1e4))
    close(C.controller_value(st), 2.0, rtol=1e-6)
    # entropy-feedback mode clips too
    fb = C.entropy_controller(mode="entropy_feedback", feedback_rate=10.0,
                              clip=(0.5, 2.0), kind="per_class", num_classes=3)
    st = fb.init({})
    _, st = fb.update({}, st, None, student_entropy=5.0, teacher_entropy=0.0)
    close(C.controller_value(st), np.full(3, 2.0), rtol=1e-6)
    # a non-finite proposal leaves c unchanged
    _, st2 = opt.update({}, opt.init({}), None,
                        controller_grad=jnp.float32(np.nan))
    assert float(C.controller_value(st2)) == 1.0


def test_warmup_holds_c():
    lr, init, g = 0.1, 2.0, 0.5
    opt = C.entropy_controller(learning_rate=lr, init=init, warmup_steps=3)
    st = opt.init({})
    upd = jax.jit(lambda s: opt.update({}, s, None,
                                       controller_grad=jnp.float32(g))[1])
    for i in range(3):
        st = upd(st)
        assert float(C.controller_value(st)) == np.float32(init)
        assert int(st.count) == i + 1
    st = upd(st)
    assert int(st.count) == 4
    close(C.controller_value(st), np.exp(np.log(init) - lr * init * g),
          rtol=1e-6)


def test_entropy_feedback_direction_and_value():
    eta = 0.2
    opt = C.entropy_controller(mode="entropy_feedback", feedback_rate=eta)
    st = opt.init({})
    # student more uncertain than teacher -> c grows (sharper q_c)
    _, st1 = opt.update({}, st, None, student_entropy=1.5, teacher_entropy=1.0)
    close(C.controller_value(st1), np.exp(eta * 0.5), rtol=1e-6)
    assert float(C.controller_value(st1)) > 1.0
    _, st2 = opt.update({}, st, None, student_entropy=0.5, teacher_entropy=1.0)
    assert float(C.controller_value(st2)) < 1.0
    # the move lowers |H(q_c) - H(p_t)| on real logits
    zs, zt = rand(0, (8, 5), 0.5), rand(1, (8, 5), 4.0)  # student too flat
    hs, ht = C.controller_entropies(zs, zt, 1.0, T)
    p, q = np_softmax(zt / T), np_softmax(zs / T)
    close(hs, (-(q * np.log(q)).sum(-1)).mean(), rtol=1e-5)
    close(ht, (-(p * np.log(p)).sum(-1)).mean(), rtol=1e-5)
    assert hs > ht
    fb = C.entropy_controller(mode="entropy_feedback", feedback_rate=1.0)
    _, s = fb.update({}, fb.init({}), None, student_entropy=hs,
                     teacher_entropy=ht)
    c = C.controller_value(s)
    hs2, _ = C.controller_entropies(zs, zt, c, T)
    assert float(c) > 1.0 and abs(hs2 - ht) < abs(hs - ht)


def test_state_round_trips_through_numpy():
    k = 4
    params = {"w": jnp.asarray(rand(0, (3, k)))}
    opt = optax.chain(optax.sgd(0.1, momentum=0.9),
                      C.entropy_controller(learning_rate=0.1, kind="per_class",
                                           num_classes=k, warmup_steps=1))

    @jax.jit
    def step(p, s, i):
        g = {"w": jnp.sin(p["w"] + i)}
        cg = jnp.cos(jnp.arange(k) + i)
        u, s = opt.update(g, s, p, controller_grad=cg)
        return optax.apply_updates(p, u), s

    p, s = params, opt.init(params)
    for i in range(2):
        p, s = step(p, s, i)
    leaves, treedef = jax.tree.flatten((p, s))
    saved = [np.array(x) for x in leaves]  # e.g. written to disk
    assert all(isinstance(x, np.ndarray) for x in saved)
    ctrl = C.controller_state(s)
    assert ctrl.log_c.dtype == jnp.float32 and ctrl.count.dtype == jnp.int32
    p2, s2 = jax.tree.unflatten(treedef, [jnp.asarray(x) for x in saved])
    assert isinstance(C.controller_state(s2), C.EntropyControllerState)
    for i in range(2, 5):
        p, s = step(p, s, i)
        p2, s2 = step(p2, s2, i)
    chex.assert_trees_all_equal((p, s), (p2, s2))
    assert int(C.controller_state(s2).count) == 5


def test_controller_value_finds_state_in_nested_optimizers():
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.ones(3)}
    # plain chain
    opt = optax.chain(optax.sgd(0.1), C.entropy_controller(init=2.0))
    assert float(C.controller_value(opt.init(params))) == np.float32(2.0)
    # chain with an inject_hyperparams-wrapped model optimizer
    opt = optax.chain(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
                      C.entropy_controller(learning_rate=0.1))
    _, st = opt.update(grads, opt.init(params), params,
                       controller_grad=jnp.float32(1.0))
    close(C.controller_value(st), np.exp(-0.1), rtol=1e-6)

    # inject_hyperparams around a whole chain
    def make(learning_rate, controller_lr):
        return optax.chain(optax.sgd(learning_rate),
                           C.entropy_controller(learning_rate=controller_lr))
    opt = optax.inject_hyperparams(make)(learning_rate=0.1, controller_lr=0.2)
    st = opt.init(params)
    _, st = jax.jit(lambda s: opt.update(grads, s, params,
                                         controller_grad=jnp.float32(1.0)))(st)
    close(C.controller_value(st), np.exp(-0.2), rtol=1e-6)
    st.hyperparams["controller_lr"] = jnp.float32(0.0)  # schedule it off
    _, st = opt.update(grads, st, params, controller_grad=jnp.float32(1.0))
    close(C.controller_value(st), np.exp(-0.2), rtol=1e-6)
    # inject_hyperparams directly on the controller (per class)
    ctrl = optax.inject_hyperparams(C.entropy_controller)(
        learning_rate=0.1, kind="per_class", num_classes=3)
    st = ctrl.init(params)
    _, st = jax.jit(lambda s: ctrl.update(grads, s, params,
                                          controller_grad=jnp.ones(3)))(st)
    close(C.controller_value(st), np.full(3, np.exp(-0.1)), rtol=1e-6)
    # none / several
    with pytest.raises(ValueError, match="no EntropyControllerState"):
        C.controller_value(optax.sgd(0.1).init(params))
    two = optax.chain(C.entropy_controller(init=2.0),
                      C.entropy_controller(init=3.0)).init(params)
    with pytest.raises(ValueError, match="index"):
        C.controller_value(two)
    assert float(C.controller_value(two, index=1)) == np.float32(3.0)


def test_argument_errors():
    with pytest.raises(ValueError):
        C.entropy_controller(kind="per_class")
    with pytest.raises(ValueError):
        C.entropy_controller(kind="bogus")
    with pytest.raises(ValueError):
        C.entropy_controller(mode="bogus")
    with pytest.raises(ValueError):
        C.entropy_controller(clip=(2.0, 1.0))
    with pytest.raises(ValueError):
        C.entropy_controller(init=20.0)
    opt = C.entropy_controller()
    st = opt.init({})
    with pytest.raises(ValueError, match="controller_grad"):
        opt.update({}, st, None)
    with pytest.raises(ValueError, match="shape"):
        opt.update({}, st, None, controller_grad=jnp.ones(3))
    fb = C.entropy_controller(mode="entropy_feedback")
    with pytest.raises(ValueError):
        fb.update({}, fb.init({}), None, student_entropy=1.0)
    with pytest.raises(ValueError):
        C.kd_controller_grad(rand(0, (3, 4)), rand(0, (3, 5)), 1.0, T)


# ---------------------------------------------------------------------------
# The README example in the module docstring
# ---------------------------------------------------------------------------


def _docstring_example() -> str:
    marker = "tests/test_controllers.py``)::\n"
    assert marker in C.__doc__
    return textwrap.dedent(C.__doc__.split(marker, 1)[1])


def test_docstring_example_runs_and_moves_c_downhill():
    ns: dict = {}
    exec(compile(_docstring_example(), "controllers_example", "exec"), ns)
    c_final = float(C.controller_value(ns["opt_state"]))
    assert np.isfinite(c_final) and c_final != 1.0
    assert np.isfinite(float(ns["kd"]))
    # One step from the initial point: c moves against dL_KD/dc and the KD term
    # (at the same student logits) decreases.
    kw = jax.random.split(jax.random.PRNGKey(0), 3)[2]
    params0 = {"w": 0.1 * jax.random.normal(kw, (8, 10)), "b": jnp.zeros(10)}
    x, y, zt, T_ex = ns["x"], ns["y"], ns["teacher_logits"], ns["T"]
    st0 = ns["opt"].init(params0)
    z0 = ns["model"](params0, x)
    g0 = float(C.kd_controller_grad(z0, zt, 1.0, T_ex))
    _, st1, _ = ns["train_step"](params0, st0, x, y, zt)
    c1 = float(C.controller_value(st1))
    assert np.sign(c1 - 1.0) == -np.sign(g0) != 0
    assert float(L.dynamic_kd_loss(z0, zt, c1, T_ex)) < float(
        L.dynamic_kd_loss(z0, zt, 1.0, T_ex))
    # over the 20 steps c kept moving the same way (student starts too flat)
    assert np.sign(c_final - 1.0) == np.sign(c1 - 1.0)
