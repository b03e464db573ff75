"""Tests of kdjax.losses against independent float64 NumPy references."""

import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses as L

from helpers import np_log_softmax, np_softmax

RTOL, ATOL = 2e-5, 2e-6

# Jitted versions: op-by-op (eager) dispatch is slow on CPU; shape checks run at
# trace time, so the error tests work through jit too.
J = SimpleNamespace(**{
    n: jax.jit(getattr(L, n),
               static_argnames=("controller_kind",) if n == "dynamic_kd_loss"
               else ())
    for n in ["cross_entropy", "kd_loss", "dynamic_kd_loss", "dkd_loss",
              "hint_loss", "attention_map", "attention_transfer_loss",
              "gram_matrix", "cross_layer_gram_loss", "entropy"]
})


# ---------------------------------------------------------------------------
# float64 NumPy references (written independently of the implementation)
# ---------------------------------------------------------------------------


def np_wmean(v, w=None):
    v = np.asarray(v, np.float64)
    if w is None:
        return v.mean()
    w = np.asarray(w, np.float64)
    return (w * v).sum() / max(w.sum(), 1e-12)


def np_kl_rows(p_logits, q_logits):
    lp, lq = np_log_softmax(p_logits), np_log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def np_kd(zs, zt, T, w=None, c=1.0):
    zs, zt = np.asarray(zs, np.float64), np.asarray(zt, np.float64)
    return np_wmean(T * T * np_kl_rows(zt / T, np.asarray(c) * zs / T), w)


def np_ce(z, y, w=None):
    lp = np_log_softmax(z)
    return np_wmean(-lp[np.arange(len(y)), y], w)


def np_dkd_naive(zs, zt, y, alpha, beta, T, w=None):
    """Straight from the paper's definitions (moderate logits only)."""
    out = []
    for i in range(len(y)):
        ps, pt = np_softmax(zs[i] / T), np_softmax(zt[i] / T)
        bs = np.array([ps[y[i]], 1 - ps[y[i]]])
        bt = np.array([pt[y[i]], 1 - pt[y[i]]])
        tckd = np.sum(bt * np.log(bt / bs))
        keep = np.arange(len(ps)) != y[i]
        hs = ps[keep] / ps[keep].sum()
        ht = pt[keep] / pt[keep].sum()
        nckd = np.sum(ht * np.log(ht / hs))
        out.append(T * T * (alpha * tckd + beta * nckd))
    return np_wmean(out, w)


def np_lse(x):
    m = x.max()
    return m + np.log(np.exp(x - m).sum())


def np_dkd_logspace(zs, zt, y, alpha, beta, T):
    """Log-space reference valid for extreme logits."""
    out = []
    for i in range(len(y)):
        def parts(z):
            x = np.asarray(z, np.float64) / T
            keep = np.arange(len(x)) != y[i]
            lse, lse_nt = np_lse(x), np_lse(x[keep])
            lb = np.array([x[y[i]] - lse, lse_nt - lse])
            return lb, x[keep] - lse_nt
        lbs, lhs = parts(zs[i])
        lbt, lht = parts(zt[i])
        tckd = np.sum(np.exp(lbt) * (lbt - lbs))
        nckd = np.sum(np.exp(lht) * (lht - lhs))
        out.append(T * T * (alpha * tckd + beta * nckd))
    return np.mean(out)


def np_pool(f, h, w):
    b, H, W, c = f.shape
    out = np.zeros((b, h, w, c))
    fh, fw = H // h, W // w
    for i in range(h):
        for j in range(w):
            out[:, i, j] = f[:, i * fh:(i + 1) * fh, j * fw:(j + 1) * fw].mean(
                axis=(1, 2))
    return out


def np_at_map(f, p=2):
    f = np.asarray(f, np.float64)
    v = (np.abs(f) ** p).sum(-1).reshape(f.shape[0], -1)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def np_gram(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.einsum("bhwi,bhwj->bij", a, b) / (a.shape[1] * a.shape[2])


def rand(seed, shape, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(
        np.float32)


def labels(seed, b, k):
    return np.random.default_rng(seed).integers(0, k, size=b).astype(np.int32)


def close(a, b, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol,
                               atol=atol)


# ---------------------------------------------------------------------------
# Logit losses
# ---------------------------------------------------------------------------


def test_cross_entropy_matches_numpy():
    z, y, w = rand(0, (7, 5), 3), labels(1, 7, 5), np.abs(rand(2, (7,)))
    close(J.cross_entropy(z, y), np_ce(z, y))
    close(J.cross_entropy(z, y, w), np_ce(z, y, w))


@pytest.mark.parametrize("T", [0.5, 1.0, 4.0, 10.0])
def test_kd_loss_matches_numpy(T):
    zs, zt, w = rand(0, (6, 9), 3), rand(1, (6, 9), 5), np.abs(rand(2, (6,)))
    close(J.kd_loss(zs, zt, T), np_kd(zs, zt, T))
    close(J.kd_loss(zs, zt, T, w), np_kd(zs, zt, T, w))


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_loss_extreme_logits(T):
    zs, zt = rand(0, (5, 10), 300), rand(1, (5, 10), 300)
    val = J.kd_loss(zs, zt, T)
    assert np.isfinite(val)
    close(val, np_kd(zs, zt, T), rtol=1e-4, atol=1e-3)
    g = jax.grad(J.kd_loss)(jnp.asarray(zs), zt, T)
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_grad_closed_form(T):
    zs, zt = rand(0, (6, 5), 2), rand(1, (6, 5), 2)
    g = jax.grad(J.kd_loss)(jnp.asarray(zs), zt, T)
    expected = T * (np_softmax(zs / T) - np_softmax(zt / T)) / zs.shape[0]
    close(g, expected, rtol=1e-4, atol=1e-6)


def test_dynamic_kd_equals_kd_exactly_at_one():
    zs, zt = rand(0, (6, 4), 3), rand(1, (6, 4), 3)
    ref = np.asarray(L.kd_loss(zs, zt, 4.0))
    for c in (1.0, jnp.ones(()), jnp.ones(4), jnp.ones(6), jnp.ones((6, 1)),
              jnp.ones((1, 4))):
        out = np.asarray(L.dynamic_kd_loss(zs, zt, c, 4.0))
        assert out == ref, (jnp.shape(c), out, ref)
    jit_kd = jax.jit(L.kd_loss)(zs, zt, 4.0)
    jit_dyn = jax.jit(L.dynamic_kd_loss)(zs, zt, 1.0, 4.0)
    assert np.asarray(jit_kd) == np.asarray(jit_dyn)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dynamic_kd_matches_numpy(T):
    b, k = 6, 4
    zs, zt, w = rand(0, (b, k), 3), rand(1, (b, k), 3), np.abs(rand(2, (b,)))
    c_s = 1.7
    c_k = np.exp(rand(3, (k,), 0.5))
    c_b = np.exp(rand(4, (b,), 0.5))
    close(J.dynamic_kd_loss(zs, zt, c_s, T), np_kd(zs, zt, T, c=c_s))
    close(J.dynamic_kd_loss(zs, zt, c_k, T, w), np_kd(zs, zt, T, w, c=c_k))
    close(J.dynamic_kd_loss(zs, zt, c_b, T), np_kd(zs, zt, T, c=c_b[:, None]))
    close(J.dynamic_kd_loss(zs, zt, c_b[:, None], T),
          np_kd(zs, zt, T, c=c_b[:, None]))


def test_dynamic_kd_ambiguous_controller():
    zs, zt = rand(0, (4, 4), 1), rand(1, (4, 4), 1)
    c = np.array([0.5, 1.0, 2.0, 3.0], np.float32)
    with pytest.raises(ValueError, match="ambiguous"):
        J.dynamic_kd_loss(zs, zt, c, 2.0)
    close(J.dynamic_kd_loss(zs, zt, c, 2.0, controller_kind="per_class"),
          np_kd(zs, zt, 2.0, c=c[None, :]))
    close(J.dynamic_kd_loss(zs, zt, c, 2.0, controller_kind="per_sample"),
          np_kd(zs, zt, 2.0, c=c[:, None]))
    with pytest.raises(ValueError):
        J.dynamic_kd_loss(zs, zt, np.ones(3), 2.0)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_dkd_matches_numpy(T):
    b, k = 8, 6
    zs, zt, y = rand(0, (b, k), 2), rand(1, (b, k), 3), labels(2, b, k)
    w = np.abs(rand(3, (b,)))
    close(J.dkd_loss(zs, zt, y, 1.0, 8.0, T),
          np_dkd_naive(zs, zt, y, 1.0, 8.0, T), rtol=1e-4)
    close(J.dkd_loss(zs, zt, y, 0.7, 2.0, T, w),
          np_dkd_naive(zs, zt, y, 0.7, 2.0, T, w), rtol=1e-4)


def test_dkd_decomposes_kd():
    # For one sample: KL(p_t||p_s) = TCKD + (1 - p_t[y]) * NCKD.
    zs, zt, y = rand(0, (1, 7), 2), rand(1, (1, 7), 2), labels(2, 1, 7)
    T = 3.0
    kd = J.kd_loss(zs, zt, T)
    tckd = J.dkd_loss(zs, zt, y, 1.0, 0.0, T)
    nckd = J.dkd_loss(zs, zt, y, 0.0, 1.0, T)
    pt_y = np_softmax(zt / T)[0, y[0]]
    close(kd, float(tckd) + (1 - pt_y) * float(nckd), rtol=1e-4)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_extreme_logits_stable(T):
    b, k = 5, 10
    zs, zt, y = rand(0, (b, k), 200), rand(1, (b, k), 200), labels(2, b, k)
    zt[np.arange(b), y] = 5000.0  # teacher target prob == 1 in any precision
    val = J.dkd_loss(zs, zt, y, 1.0, 8.0, T)
    assert np.isfinite(val)
    close(val, np_dkd_logspace(zs, zt, y, 1.0, 8.0, T), rtol=1e-4, atol=1e-2)
    grad_fn = jax.jit(jax.grad(L.dkd_loss, argnums=(0, 1)))
    g = grad_fn(jnp.asarray(zs), jnp.asarray(zt), y, 1.0, 8.0, T)
    assert all(np.all(np.isfinite(x)) for x in g)
    # Shift invariance per row at a large offset.
    zs2, zt2 = rand(3, (b, k), 2), rand(4, (b, k), 2)
    base = J.dkd_loss(zs2, zt2, y, 1.0, 8.0, T)
    shifted = J.dkd_loss(zs2 + 1e4, zt2 - 1e4, y, 1.0, 8.0, T)
    close(shifted, float(base), rtol=5e-3, atol=1e-3)


def test_dkd_grad_vs_finite_differences():
    b, k, T = 3, 5, 2.0
    zs, zt, y = rand(0, (b, k), 2), rand(1, (b, k), 2), labels(2, b, k)
    g = np.asarray(jax.grad(J.dkd_loss)(jnp.asarray(zs), zt, y, 1.0, 8.0, T))
    zs64 = zs.astype(np.float64)
    fd = np.zeros_like(zs64)
    h = 1e-5
    for idx in np.ndindex(zs.shape):
        e = np.zeros_like(zs64)
        e[idx] = h
        fd[idx] = (np_dkd_naive(zs64 + e, zt, y, 1.0, 8.0, T)
                   - np_dkd_naive(zs64 - e, zt, y, 1.0, 8.0, T)) / (2 * h)
    close(g, fd, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_entropy_matches_numpy(T):
    z = rand(0, (6, 8), 3)
    p = np_softmax(z / T)
    close(J.entropy(z, T), -(p * np.log(p)).sum(-1))
    zx = rand(1, (3, 8), 1000)
    h = J.entropy(zx, T)
    assert np.all(np.isfinite(h)) and np.all(np.asarray(h) >= -1e-6)
    assert J.entropy(z).shape == (6,)


# ---------------------------------------------------------------------------
# Feature losses
# ---------------------------------------------------------------------------


def test_hint_loss_matches_numpy():
    s, t, w = rand(0, (4, 3, 5, 2)), rand(1, (4, 3, 5, 2)), np.abs(rand(2, (4,)))
    per = ((s.astype(np.float64) - t) ** 2).reshape(4, -1).mean(1)
    close(J.hint_loss(s, t), per.mean())
    close(J.hint_loss(s, t, w), np_wmean(per, w))
    close(J.hint_loss(s[:, 0, 0], t[:, 0, 0]),
          ((s[:, 0, 0].astype(np.float64) - t[:, 0, 0]) ** 2).mean())


@pytest.mark.parametrize("p", [1, 2, 4])
def test_attention_map_and_loss(p):
    s, t = rand(0, (3, 4, 4, 5)), rand(1, (3, 4, 4, 7))
    close(J.attention_map(s, p), np_at_map(s, p), rtol=1e-4)
    d = np_at_map(s, p) - np_at_map(t, p)
    close(J.attention_transfer_loss(s, t, p), (d ** 2).mean(1).mean(), rtol=1e-4)


def test_attention_transfer_pools_larger_map():
    s, t = rand(0, (2, 8, 4, 3)), rand(1, (2, 4, 2, 6))
    d = np_at_map(np_pool(s.astype(np.float64), 4, 2)) - np_at_map(t)
    expected = (d ** 2).mean(1).mean()
    close(J.attention_transfer_loss(s, t), expected, rtol=1e-4)
    close(J.attention_transfer_loss(t, s), expected, rtol=1e-4)
    with pytest.raises(ValueError):
        J.attention_transfer_loss(rand(0, (2, 6, 6, 3)), rand(1, (2, 4, 4, 3)))
    with pytest.raises(ValueError):
        J.attention_transfer_loss(rand(0, (2, 4, 4, 3)), rand(1, (3, 4, 4, 3)))


def test_attention_zero_map_grad_finite():
    s = jnp.zeros((2, 3, 3, 4))
    t = jnp.asarray(rand(1, (2, 3, 3, 4)))
    g = jax.grad(J.attention_transfer_loss)(s, t)
    assert np.all(np.isfinite(g))


def test_gram_matrix_matches_einsum():
    a, b = rand(0, (3, 5, 4, 6)), rand(1, (3, 5, 4, 2))
    g = J.gram_matrix(a, b)
    assert g.shape == (3, 6, 2)
    close(g, np_gram(a, b), rtol=1e-4)
    with pytest.raises(ValueError):
        J.gram_matrix(a, rand(1, (3, 4, 4, 2)))


def test_cross_layer_gram_loss_pools_and_matches_numpy():
    sa, sb = rand(0, (2, 8, 8, 3)), rand(1, (2, 4, 4, 5))
    ta, tb = rand(2, (2, 4, 4, 3)), rand(3, (2, 16, 16, 5))  # teacher b larger
    gs = np_gram(np_pool(sa.astype(np.float64), 4, 4), sb)
    gt = np_gram(ta, np_pool(tb.astype(np.float64), 4, 4))
    per = ((gs - gt) ** 2).reshape(2, -1).mean(1)
    close(J.cross_layer_gram_loss(sa, sb, ta, tb), per.mean(), rtol=1e-4)
    w = np.array([0.0, 2.0], np.float32)
    close(J.cross_layer_gram_loss(sa, sb, ta, tb, w), per[1], rtol=1e-4)
    # pooled explicitly == pooled internally
    pooled = L.avg_pool_to(jnp.asarray(sa), 4, 4)
    close(pooled, np_pool(sa.astype(np.float64), 4, 4), rtol=1e-5)
    # channel mismatch between student and teacher Gram -> clear error
    with pytest.raises(ValueError, match="Gram"):
        J.cross_layer_gram_loss(sa, sb, ta, rand(4, (2, 4, 4, 6)))
    with pytest.raises(ValueError):
        J.cross_layer_gram_loss(rand(0, (2, 6, 6, 3)), sb, ta, tb)


# ---------------------------------------------------------------------------
# Weights, shapes, transformations
# ---------------------------------------------------------------------------


def _all_weighted_losses(b=5, k=4):
    zs, zt, y = rand(0, (b, k), 2), rand(1, (b, k), 2), labels(2, b, k)
    fs, ft = rand(3, (b, 4, 4, 3)), rand(4, (b, 4, 4, 3))
    return {
        "ce": (lambda s, w: J.cross_entropy(s[0], s[2], w), (zs, zt, y)),
        "kd": (lambda s, w: J.kd_loss(s[0], s[1], 3.0, w), (zs, zt, y)),
        "dyn": (lambda s, w: J.dynamic_kd_loss(s[0], s[1], 1.5, 3.0, w),
                (zs, zt, y)),
        "dkd": (lambda s, w: J.dkd_loss(s[0], s[1], s[2], 1.0, 2.0, 3.0, w),
                (zs, zt, y)),
        "hint": (lambda s, w: J.hint_loss(s[0], s[1], w), (fs, ft)),
        "at": (lambda s, w: J.attention_transfer_loss(s[0], s[1], 2, w),
               (fs, ft)),
        "gram": (lambda s, w: J.cross_layer_gram_loss(s[0], s[1], s[1], s[0],
                                                      w), (fs, ft)),
    }


@pytest.mark.parametrize("name", ["ce", "kd", "dyn", "dkd", "hint", "at", "gram"])
def test_zero_weight_ignores_example(name):
    fn, arrays = _all_weighted_losses()[name]
    keep = np.array([1, 0, 1, 1, 0], bool)
    w = keep.astype(np.float32)
    sub = tuple(a[keep] for a in arrays)
    close(fn(arrays, w), float(fn(sub, None)), rtol=1e-5)
    # garbage in a padded example does not matter
    garbage = tuple(a.copy() for a in arrays)
    for a in garbage[:2]:
        a[~keep] = 1e30
    out = fn(garbage, w)
    close(out, float(fn(sub, None)), rtol=1e-5)
    # all-zero weights -> 0
    assert float(fn(arrays, np.zeros(5, np.float32))) == 0.0
    # unit weights == unweighted
    close(fn(arrays, np.ones(5, np.float32)), float(fn(arrays, None)), rtol=1e-6)


def test_shape_errors_are_clear():
    zs, zt, y = rand(0, (4, 5), 1), rand(1, (4, 6), 1), labels(2, 4, 5)
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 6\)"):
        J.kd_loss(zs, zt, 2.0)
    with pytest.raises(ValueError):
        J.dynamic_kd_loss(zs, zt, 1.0, 2.0)
    with pytest.raises(ValueError):
        J.dkd_loss(zs, zt, y, 1.0, 1.0, 2.0)
    with pytest.raises(ValueError, match=r"\(4, 1\)"):
        J.cross_entropy(zs, y[:, None])
    with pytest.raises(ValueError):
        J.cross_entropy(zs, y.astype(np.float32))
    with pytest.raises(ValueError):
        J.dkd_loss(zs, zs, y[:, None], 1.0, 1.0, 2.0)
    with pytest.raises(ValueError, match="weights"):
        J.kd_loss(zs, zs, 2.0, np.ones((4, 1), np.float32))
    with pytest.raises(ValueError):
        J.kd_loss(zs[None], zs[None], 2.0)
    with pytest.raises(ValueError):
        J.kd_loss(zs, zs, np.ones(4, np.float32))
    with pytest.raises(ValueError):
        J.hint_loss(rand(0, (4, 3)), rand(0, (4, 1)))
    with pytest.raises(ValueError):
        J.entropy(rand(0, (4,)))


def test_jit_vmap_grad():
    zs, zt, y = rand(0, (3, 6, 5), 2), rand(1, (3, 6, 5), 2), labels(2, 18, 5)
    y = y.reshape(3, 6)
    fns = {
        "ce": (lambda s, t, y: J.cross_entropy(s, y),
               lambda s, t, y: np_ce(s, y)),
        "kd": (lambda s, t, y: J.kd_loss(s, t, 4.0),
               lambda s, t, y: np_kd(s, t, 4.0)),
        "dyn": (lambda s, t, y: J.dynamic_kd_loss(s, t, 0.7, 4.0),
                lambda s, t, y: np_kd(s, t, 4.0, c=0.7)),
        "dkd": (lambda s, t, y: J.dkd_loss(s, t, y, 1.0, 8.0, 4.0),
                lambda s, t, y: np_dkd_naive(s, t, y, 1.0, 8.0, 4.0)),
    }
    for name, (fn, ref) in fns.items():
        expected = np.array([ref(zs[i], zt[i], y[i]) for i in range(3)])
        close(jax.jit(jax.vmap(fn))(zs, zt, y), expected, rtol=1e-4)
        g = jax.jit(jax.grad(fn))(jnp.asarray(zs[0]), zt[0], y[0])
        assert g.shape == zs[0].shape and np.all(np.isfinite(g)), name
    f = rand(3, (2, 3, 4, 4, 3))
    fn = lambda a, b: J.cross_layer_gram_loss(a, b, b, a) + J.hint_loss(a, b) \
        + J.attention_transfer_loss(a, b)  # noqa: E731
    jfn = jax.jit(fn)
    direct = np.array([float(jfn(f[i], f[i][..., ::-1] * 2)) for i in range(2)])
    close(jax.jit(jax.vmap(fn))(f, f[..., ::-1] * 2), direct, rtol=1e-5)
    g = jax.jit(jax.grad(fn))(jnp.asarray(f[0]), f[1])
    assert np.all(np.isfinite(g))
    # temperature may be a traced value
    close(jax.jit(J.kd_loss)(zs[0], zt[0], jnp.float32(4.0)),
          np_kd(zs[0], zt[0], 4.0))


def test_import_pulls_no_heavy_deps():
    # kdjax.losses (the zoo included) needs jax only: no Flax/optax/data stack,
    # and none of kdjax's own shell modules (distill adapters, train, data...).
    heavy = ("'flax','tensorflow_datasets','clu','grain','tensorflow','optax',"
             "'chex','orbax','torch','ml_collections','absl'")
    code = ("import kdjax.losses, sys; print(sorted(m for m in sys.modules if "
            f"m.split('.')[0] in {{{heavy}}} or (m.startswith('kdjax') and m "
            "not in ('kdjax', 'kdjax.losses'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
