"""The distillation zoo in kdjax.losses against independent float64 NumPy references.

Every reference below is written from the papers' definitions with explicit loops
(pairs, triplets, channels, elements), not from the jnp code. Gradients: jax.grad in
float64 against central finite differences of the NumPy reference.
"""

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses as L

from test_losses import close, np_pool, np_wmean, rand

ZOO = ["logit_standardize", "similarity_preserving_loss",
       "correlation_congruence_loss", "vid_loss", "rkd_loss", "pkt_loss",
       "ab_loss", "factor_transfer_loss", "fsp_matrix", "fsp_loss", "nst_loss",
       "crd_estimate_normalizer", "crd_nce_loss", "crd_memory_update",
       "cross_layer_gram_loss"]
STATIC = {"correlation_congruence_loss": ("order",), "factor_transfer_loss": ("p",)}
J = SimpleNamespace(**{n: jax.jit(getattr(L, n), static_argnames=STATIC.get(n, ()))
                       for n in ZOO})


# ---------------------------------------------------------------------------
# float64 NumPy references
# ---------------------------------------------------------------------------


def f64(x):
    return np.asarray(x, np.float64)


def unit(v):
    return v / math.sqrt(float(np.dot(v, v)))


def np_ls(z, eps=1e-7):
    out = np.zeros_like(f64(z))
    for i, row in enumerate(f64(z)):
        m = sum(row) / len(row)
        sd = math.sqrt(sum((x - m) ** 2 for x in row) / len(row))
        out[i] = [(x - m) / (sd + eps) for x in row]
    return out


def np_sp(fs, ft):
    b = len(fs)

    def sim(f):
        f = f64(f).reshape(b, -1)
        g = np.array([[np.dot(f[i], f[j]) for j in range(b)] for i in range(b)])
        return np.array([unit(row) for row in g])

    return ((sim(fs) - sim(ft)) ** 2).sum() / b ** 2


def np_cc(es, et, gamma, order, exact=False):
    b = len(es)

    def corr(e):
        u = [unit(row) for row in f64(e)]
        c = np.zeros((b, b))
        for i in range(b):
            for j in range(b):
                if exact:  # the Gaussian RBF kernel itself
                    c[i, j] = math.exp(-gamma * np.sum((u[i] - u[j]) ** 2))
                else:
                    x = np.dot(u[i], u[j])
                    c[i, j] = sum(math.exp(-2 * gamma) * (2 * gamma) ** p
                                  / math.factorial(p) * x ** p
                                  for p in range(order + 1))
        return c

    return ((corr(es) - corr(et)) ** 2).sum() / b ** 2


def np_vid(mu, t, alpha, eps=1e-6, w=None):
    mu, t, alpha = f64(mu), f64(t), f64(alpha)
    per = []
    for i in range(len(t)):
        vals = []
        for idx in np.ndindex(t.shape[1:]):
            var = math.log(1 + math.exp(alpha[idx[-1]])) + eps
            vals.append(0.5 * ((t[i][idx] - mu[i][idx]) ** 2 / var + math.log(var)))
        per.append(np.mean(vals))
    return np_wmean(per, w)


def huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def np_rkd(es, et, wd=25.0, wa=50.0):
    es, et = f64(es), f64(et)
    b = len(es)
    pairs = [(i, j) for i in range(b) for j in range(b) if i != j]
    trips = [(i, j, k) for i in range(b) for j in range(b) for k in range(b)
             if len({i, j, k}) == 3]

    def dist(e):
        d = {(i, j): np.linalg.norm(e[i] - e[j]) for i, j in pairs}
        mu = sum(d.values()) / len(d)
        return {key: v / mu for key, v in d.items()}

    def angle(e):  # cosine of the angle at e_j
        return {(i, j, k): np.dot(unit(e[i] - e[j]), unit(e[k] - e[j]))
                for i, j, k in trips}

    ds, dt, as_, at = dist(es), dist(et), angle(es), angle(et)
    loss_d = sum(huber(ds[p] - dt[p]) for p in pairs) / len(pairs)
    loss_a = sum(huber(as_[t] - at[t]) for t in trips) / len(trips)
    return wd * loss_d + wa * loss_a


def np_pkt(es, et, eps=1e-7):
    b = len(es)

    def cond(e):
        u = [unit(row) for row in f64(e)]
        k = np.array([[(np.dot(u[i], u[j]) + 1) / 2 for j in range(b)]
                      for i in range(b)])
        return np.array([row / row.sum() for row in k])

    pt, ps = cond(et), cond(es)
    return np.mean([sum(pt[i, j] * math.log((pt[i, j] + eps) / (ps[i, j] + eps))
                        for j in range(b)) for i in range(b)])


def np_ab(s, t, m=1.0, w=None):
    s, t = f64(s), f64(t)
    m = np.broadcast_to(f64(m), s.shape[-1:])
    per = []
    for i in range(len(s)):
        vals = []
        for idx in np.ndindex(s.shape[1:]):
            x, y, mc = s[i][idx], t[i][idx], m[idx[-1]]
            e = 0.0
            if y <= 0 and x > -mc:
                e += (x + mc) ** 2
            if y > 0 and x <= mc:
                e += (x - mc) ** 2
            vals.append(e)
        per.append(np.mean(vals))
    return np_wmean(per, w)


def np_ft(fs, ft, p=1, w=None):
    per = [np.mean(np.abs(unit(f64(a).ravel()) - unit(f64(b).ravel())) ** p)
           for a, b in zip(fs, ft)]
    return np_wmean(per, w)


def np_fsp_matrix(a, b):
    a, b = f64(a), f64(b)
    if a.shape[1] > b.shape[1]:
        a = np_pool(a, *b.shape[1:3])
    elif b.shape[1] > a.shape[1]:
        b = np_pool(b, *a.shape[1:3])
    n, h, w_, ca = a.shape
    g = np.zeros((n, ca, b.shape[3]))
    for i in range(n):
        for y in range(h):
            for x in range(w_):
                g[i] += np.outer(a[i, y, x], b[i, y, x])
    return g / (h * w_)


def np_fsp(student_pairs, teacher_pairs, w=None):
    per = np.zeros(len(student_pairs[0][0]))
    for sp, tp in zip(student_pairs, teacher_pairs):
        d = np_fsp_matrix(*sp) - np_fsp_matrix(*tp)
        per += (d ** 2).reshape(len(d), -1).mean(1)
    return np_wmean(per / len(student_pairs), w)


def np_nst(s, t, w=None):
    s, t = f64(s), f64(t)
    if s.shape[1] > t.shape[1]:
        s = np_pool(s, *t.shape[1:3])
    elif t.shape[1] > s.shape[1]:
        t = np_pool(t, *s.shape[1:3])
    per = []
    for i in range(len(s)):
        vs = [unit(s[i, :, :, c].ravel()) for c in range(s.shape[3])]
        vt = [unit(t[i, :, :, c].ravel()) for c in range(t.shape[3])]

        def mk(xs, ys):
            return np.mean([np.dot(x, y) ** 2 for x in xs for y in ys])

        per.append(mk(vs, vs) + mk(vt, vt) - 2 * mk(vs, vt))
    return np_wmean(per, w)


def np_crd(a, pos, neg, z, n_data, tau=0.07, w=None):
    a, pos, neg = f64(a), f64(pos), f64(neg)
    n = neg.shape[1]
    noise = n / n_data  # N * P_n
    per = []
    for i in range(len(a)):
        p_pos = math.exp(np.dot(a[i], pos[i]) / tau) / z
        l_i = -math.log(p_pos / (p_pos + noise))
        for k in range(n):
            p_neg = math.exp(np.dot(a[i], neg[i, k]) / tau) / z
            l_i -= math.log(noise / (p_neg + noise))
        per.append(l_i)
    return np_wmean(per, w)


def np_crd_z(a, pos, neg, n_data, tau=0.07):
    a, pos, neg = f64(a), f64(pos), f64(neg)
    scores = [math.exp(np.dot(a[i], pos[i]) / tau) for i in range(len(a))]
    scores += [math.exp(np.dot(a[i], neg[i, k]) / tau)
               for i in range(len(a)) for k in range(neg.shape[1])]
    return n_data * np.mean(scores)


def np_memory_update(bank, idx, new, m=0.5):
    out = f64(bank).copy()
    for i, row in zip(idx, f64(new)):
        out[i] = unit(m * out[i] + (1 - m) * row)
    return out


def unit_rows(x):
    x = f64(x)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------
# Gradient check: jax.grad (float64) vs finite differences of the reference
# ---------------------------------------------------------------------------


def check_grad(jax_fn, np_fn, x, h=1e-6, rtol=1e-5, atol=1e-8):
    """``jax_fn`` / ``np_fn``: functions of one array ``x`` returning a scalar."""
    x = f64(x)
    with jax.enable_x64(True):
        g = np.asarray(jax.jit(jax.grad(jax_fn))(jnp.asarray(x, jnp.float64)))
    fd = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        fd[idx] = (np_fn(x + e) - np_fn(x - e)) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# Logit standardisation
# ---------------------------------------------------------------------------


def test_logit_standardize_matches_numpy_and_invariances():
    z = rand(0, (5, 7), 3) + 2.0
    out = J.logit_standardize(z)
    close(out, np_ls(z), rtol=1e-5, atol=1e-5)
    o = f64(out)
    close(o.mean(1), np.zeros(5), atol=1e-6)
    close(o.std(1), np.ones(5), rtol=1e-5)  # population std
    # per-row shift and positive scale do not change the output
    shifted = z * np.float32(3.5) - rand(1, (5, 1), 10)
    close(J.logit_standardize(shifted), f64(out), rtol=1e-4, atol=1e-4)
    # a constant row: zeros, finite gradient
    const = np.full((2, 4), 3.0, np.float32)
    assert np.all(np.asarray(J.logit_standardize(const)) == 0.0)
    weighted = lambda x: jnp.sum(L.logit_standardize(x) * jnp.arange(4.0))  # noqa: E731
    g = jax.jit(jax.grad(weighted))(const)
    assert np.all(np.isfinite(g))


def test_logit_standardize_grad():
    c = f64(rand(1, (3, 4)))
    check_grad(lambda x: jnp.sum(L.logit_standardize(x) * c),
               lambda x: np.sum(np_ls(x) * c), rand(0, (3, 4), 2))


def test_logit_standardize_composes_with_kd():
    zs, zt = rand(0, (4, 6), 3), rand(1, (4, 6), 5)
    val = jax.jit(lambda a, b: L.kd_loss(L.logit_standardize(a),
                                         L.logit_standardize(b), 2.0))(zs, zt)
    ps, pt = np_ls(zs) / 2.0, np_ls(zt) / 2.0
    ls = ps - np.log(np.exp(ps).sum(1, keepdims=True))
    lt = pt - np.log(np.exp(pt).sum(1, keepdims=True))
    close(val, 4.0 * (np.exp(lt) * (lt - ls)).sum(1).mean(), rtol=1e-5)


# ---------------------------------------------------------------------------
# Batch-level relational losses: SP, CC, RKD, PKT
# ---------------------------------------------------------------------------


def test_sp_matches_numpy_and_zero_at_teacher():
    fs, ft = rand(0, (5, 3, 3, 4)), rand(1, (5, 2, 2, 7))
    close(J.similarity_preserving_loss(fs, ft), np_sp(fs, ft), rtol=1e-5)
    close(J.similarity_preserving_loss(fs[:, 0, 0], ft), np_sp(fs[:, 0, 0], ft),
          rtol=1e-5)
    assert float(J.similarity_preserving_loss(ft, ft)) < 1e-12
    # invariant to a global rescaling of either feature
    close(J.similarity_preserving_loss(fs * 7, ft), np_sp(fs, ft), rtol=1e-5)
    check_grad(lambda x: L.similarity_preserving_loss(x, ft),
               lambda x: np_sp(x, ft), rand(2, (5, 2, 3)))


@pytest.mark.parametrize("gamma,order", [(0.4, 2), (1.0, 3), (0.4, 0)])
def test_cc_matches_numpy(gamma, order):
    es, et = rand(0, (6, 5)), rand(1, (6, 8))
    close(J.correlation_congruence_loss(es, et, gamma, order),
          np_cc(es, et, gamma, order), rtol=1e-5, atol=1e-9)


def test_cc_taylor_converges_to_rbf_and_grad():
    es, et = rand(0, (6, 5)), rand(1, (6, 8))
    close(J.correlation_congruence_loss(es, et, 0.4, 20),
          np_cc(es, et, 0.4, 0, exact=True), rtol=1e-5)
    assert float(J.correlation_congruence_loss(et * 3, et)) < 1e-12
    check_grad(lambda x: L.correlation_congruence_loss(x, et),
               lambda x: np_cc(x, et, 0.4, 2), rand(2, (6, 3)))


def test_rkd_matches_numpy_and_invariances():
    es, et = rand(0, (5, 4)), rand(1, (5, 6), 2)
    ref = np_rkd(es, et)
    close(J.rkd_loss(es, et), ref, rtol=1e-5)
    close(J.rkd_loss(es, et, 1.0, 0.0), np_rkd(es, et, 1.0, 0.0), rtol=1e-5)
    # teacher rotated, scaled and translated: both potentials unchanged
    q, _ = np.linalg.qr(rand(2, (6, 6)))
    moved = (3.0 * f64(et) @ q + 5.0).astype(np.float32)
    close(J.rkd_loss(es, moved), ref, rtol=1e-4)
    assert float(J.rkd_loss(et, et)) < 1e-10
    # student far away: the Huber loss is in its linear range somewhere
    check_grad(lambda x: L.rkd_loss(x, et), lambda x: np_rkd(x, et),
               rand(3, (5, 3), 3))
    with pytest.raises(ValueError, match="at least 3"):
        J.rkd_loss(es[:2], et[:2])


def test_rkd_duplicate_embeddings_finite():
    es = np.repeat(rand(0, (2, 4)), 2, axis=0)  # rows 0=1 and 2=3
    g = jax.jit(jax.grad(L.rkd_loss))(es, rand(1, (4, 5)))
    assert np.all(np.isfinite(g))


def test_pkt_matches_numpy_and_invariances():
    es, et = rand(0, (6, 4)), rand(1, (6, 9))
    close(J.pkt_loss(es, et), np_pkt(es, et), rtol=1e-5)
    assert abs(float(J.pkt_loss(et, et))) < 1e-7
    # invariant to per-row positive scaling of the embeddings
    close(J.pkt_loss(es * np.abs(rand(2, (6, 1))) + 0.0, et), np_pkt(es, et),
          rtol=1e-4)
    assert float(J.pkt_loss(es, et)) > 0
    check_grad(lambda x: L.pkt_loss(x, et), lambda x: np_pkt(x, et),
               rand(3, (6, 3)))


# ---------------------------------------------------------------------------
# Per-example feature losses: VID, AB, FT, FSP, NST
# ---------------------------------------------------------------------------


def test_vid_matches_numpy_and_grads():
    mu, t, alpha = rand(0, (3, 2, 2, 4)), rand(1, (3, 2, 2, 4)), rand(2, (4,))
    w = np.abs(rand(3, (3,)))
    close(J.vid_loss(mu, t, alpha), np_vid(mu, t, alpha), rtol=1e-5)
    close(J.vid_loss(mu, t, alpha, 1e-6, w), np_vid(mu, t, alpha, w=w), rtol=1e-5)
    close(J.vid_loss(mu[:, 0, 0], t[:, 0, 0], alpha),
          np_vid(mu[:, 0, 0], t[:, 0, 0], alpha), rtol=1e-5)
    check_grad(lambda x: L.vid_loss(x, t[:2], alpha),
               lambda x: np_vid(x, t[:2], alpha), mu[:2])
    check_grad(lambda a: L.vid_loss(mu, t, a), lambda a: np_vid(mu, t, a), alpha)


def test_vid_variance_optimum_closed_form():
    # For fixed mu the NLL is minimised by sigma_c^2 = mean (t - mu)^2 per channel.
    mu, t = rand(0, (4, 3, 3, 5)), rand(1, (4, 3, 3, 5), 2)
    target = ((f64(t) - f64(mu)) ** 2).reshape(-1, 5).mean(0) - 1e-6
    alpha = np.log(np.expm1(target))
    with jax.enable_x64(True):
        g = jax.jit(jax.grad(L.vid_loss, argnums=2))(f64(mu), f64(t), alpha)
    close(g, np.zeros(5), atol=1e-10)


@pytest.mark.parametrize("margin", [1.0, 0.5, "per_channel"])
def test_ab_matches_numpy(margin):
    s, t = rand(0, (3, 2, 3, 4), 1.5), rand(1, (3, 2, 3, 4))
    m = np.abs(rand(2, (4,))) + 0.2 if margin == "per_channel" else margin
    w = np.abs(rand(3, (3,)))
    close(J.ab_loss(s, t, m), np_ab(s, t, m), rtol=1e-5)
    close(J.ab_loss(s, t, m, w), np_ab(s, t, m, w), rtol=1e-5)
    check_grad(lambda x: L.ab_loss(x, t[:2], m), lambda x: np_ab(x, t[:2], m),
               s[:2])


def test_ab_zero_when_student_clears_margin():
    t = rand(1, (2, 3, 3, 4))
    s = np.where(t > 0, 1.5, -1.5).astype(np.float32)  # beyond the margin 1
    assert float(J.ab_loss(s, t)) == 0.0
    close(J.ab_loss(np.zeros_like(t), t), 1.0)  # every element costs m^2 = 1


@pytest.mark.parametrize("p", [1, 2])
def test_ft_matches_numpy(p):
    fs, ft = rand(0, (3, 2, 2, 5)), rand(1, (3, 2, 2, 5), 4)
    w = np.abs(rand(2, (3,)))
    close(J.factor_transfer_loss(fs, ft, p), np_ft(fs, ft, p), rtol=1e-5)
    close(J.factor_transfer_loss(fs, ft, p, w), np_ft(fs, ft, p, w), rtol=1e-5)
    assert float(J.factor_transfer_loss(ft * 3, ft, p)) < 1e-7
    check_grad(lambda x: L.factor_transfer_loss(x, ft[:2], p),
               lambda x: np_ft(x, ft[:2], p), fs[:2])


def test_fsp_matrix_and_loss_match_numpy():
    a, b = rand(0, (2, 4, 4, 3)), rand(1, (2, 2, 2, 5))
    close(J.fsp_matrix(a, b), np_fsp_matrix(a, b), rtol=1e-5, atol=1e-6)
    close(J.fsp_matrix(b, a), np_fsp_matrix(b, a), rtol=1e-5, atol=1e-6)
    sp = [(a, b), (rand(2, (2, 2, 2, 5)), rand(3, (2, 2, 2, 2)))]
    tp = [(rand(4, (2, 8, 8, 3)), rand(5, (2, 4, 4, 5))),
          (rand(6, (2, 4, 4, 5)), rand(7, (2, 4, 4, 2)))]
    w = np.array([0.3, 1.2], np.float32)
    close(J.fsp_loss(sp, tp), np_fsp(sp, tp), rtol=1e-5)
    close(J.fsp_loss(sp, tp, w), np_fsp(sp, tp, w), rtol=1e-5)
    close(J.fsp_loss(sp[:1], tp[:1]),
          float(J.cross_layer_gram_loss(*sp[0], *tp[0])), rtol=1e-6)
    assert float(J.fsp_loss(tp, tp)) == 0.0
    check_grad(lambda x: L.fsp_loss([(x, sp[0][1])], [tp[0]]),
               lambda x: np_fsp([(x, sp[0][1])], [tp[0]]), a)
    with pytest.raises(ValueError, match="Gram"):
        J.fsp_loss(sp, [tp[1], tp[0]])
    with pytest.raises(ValueError, match="pairs"):
        J.fsp_loss(sp, tp[:1])


def test_nst_matches_numpy():
    s, t = rand(0, (3, 4, 4, 3)), rand(1, (3, 2, 2, 6))  # student map pooled
    w = np.abs(rand(2, (3,)))
    close(J.nst_loss(s, t), np_nst(s, t), rtol=1e-5, atol=1e-7)
    close(J.nst_loss(t, s, w), np_nst(t, s, w), rtol=1e-5, atol=1e-7)
    assert abs(float(J.nst_loss(t, t))) < 1e-6
    check_grad(lambda x: L.nst_loss(x, t[:2]), lambda x: np_nst(x, t[:2]),
               s[:2, :2, :2])


# ---------------------------------------------------------------------------
# CRD
# ---------------------------------------------------------------------------


def crd_inputs(b=4, n=6, d=5):
    return (unit_rows(rand(0, (b, d))).astype(np.float32),
            unit_rows(rand(1, (b, d))).astype(np.float32),
            unit_rows(rand(2, (b, n, d))).astype(np.float32))


def test_crd_nce_matches_numpy():
    a, pos, neg = crd_inputs()
    z = float(np_crd_z(a, pos, neg, 1000, 0.1))
    close(J.crd_estimate_normalizer(a, pos, neg, 1000, 0.1), z, rtol=1e-5)
    w = np.abs(rand(3, (4,)))
    close(J.crd_nce_loss(a, pos, neg, z, 1000, 0.1),
          np_crd(a, pos, neg, z, 1000, 0.1), rtol=1e-5)
    close(J.crd_nce_loss(a, pos, neg, 2.5 * z, 50, 0.1, w),
          np_crd(a, pos, neg, 2.5 * z, 50, 0.1, w), rtol=1e-5)
    # default temperature 0.07: exp(1/0.07) is large but the log-space form is exact
    z7 = float(np_crd_z(a, pos, neg, 50000))
    close(J.crd_nce_loss(a, pos, neg, z7, 50000), np_crd(a, pos, neg, z7, 50000),
          rtol=1e-5)


def test_crd_nce_grad():
    a, pos, neg = crd_inputs(3, 4, 3)
    z = float(np_crd_z(a, pos, neg, 200, 0.5))
    check_grad(lambda x: L.crd_nce_loss(x, pos, neg, z, 200, 0.5),
               lambda x: np_crd(x, pos, neg, z, 200, 0.5), a)
    check_grad(lambda x: L.crd_nce_loss(a, pos, x, z, 200, 0.5),
               lambda x: np_crd(a, pos, x, z, 200, 0.5), neg)
    # the normaliser carries no gradient
    g = jax.jit(jax.grad(lambda x: L.crd_estimate_normalizer(x, pos, neg, 200)))(a)
    assert np.all(np.asarray(g) == 0.0)


def test_crd_memory_update():
    bank = unit_rows(rand(0, (10, 4))).astype(np.float32)
    idx = np.array([7, 2, 5], np.int32)
    new = rand(1, (3, 4), 3)
    out = J.crd_memory_update(bank, idx, new, 0.5)
    close(out, np_memory_update(bank, idx, new, 0.5), rtol=1e-6, atol=1e-7)
    close(np.linalg.norm(f64(out), axis=1), np.ones(10), rtol=1e-6)
    close(J.crd_memory_update(bank, idx, new, 0.9),
          np_memory_update(bank, idx, new, 0.9), rtol=1e-6, atol=1e-7)
    g = jax.jit(jax.grad(lambda x: jnp.sum(L.crd_memory_update(bank, idx, x))))(new)
    assert np.all(np.asarray(g) == 0.0)
    with pytest.raises(ValueError, match="integers"):
        J.crd_memory_update(bank, idx.astype(np.float32), new)
    with pytest.raises(ValueError, match="indices"):
        J.crd_memory_update(bank, idx[:2], new)


# ---------------------------------------------------------------------------
# Weights, shapes, transformations
# ---------------------------------------------------------------------------


def _weighted_zoo(b=5):
    f4 = rand(0, (b, 4, 4, 3)), rand(1, (b, 2, 2, 3)), rand(2, (b, 4, 4, 3))
    a, pos, neg = crd_inputs(b, 3, 4)
    return {
        "vid": lambda w, k=slice(None): J.vid_loss(f4[0][k], f4[2][k],
                                                   np.ones(3, np.float32),
                                                   1e-6, w),
        "ab": lambda w, k=slice(None): J.ab_loss(f4[0][k], f4[2][k], 1.0, w),
        "ft": lambda w, k=slice(None): J.factor_transfer_loss(f4[0][k],
                                                              f4[2][k], 1, w),
        "fsp": lambda w, k=slice(None): J.fsp_loss([(f4[0][k], f4[1][k])],
                                                   [(f4[2][k], f4[1][k])], w),
        "nst": lambda w, k=slice(None): J.nst_loss(f4[0][k], f4[1][k], w),
        "crd": lambda w, k=slice(None): J.crd_nce_loss(a[k], pos[k], neg[k],
                                                       30.0, 100, 0.07, w),
    }


@pytest.mark.parametrize("name", ["vid", "ab", "ft", "fsp", "nst", "crd"])
def test_zoo_zero_weight_ignores_example(name):
    fn = _weighted_zoo()[name]
    keep = np.array([1, 0, 1, 1, 0], bool)
    close(fn(keep.astype(np.float32)), float(fn(None, keep)), rtol=1e-5)
    assert float(fn(np.zeros(5, np.float32))) == 0.0


def test_zoo_shape_errors_are_clear():
    e4, e3 = rand(0, (4, 5)), rand(1, (3, 5))
    f = rand(2, (4, 4, 4, 3))
    for fn in (J.similarity_preserving_loss, J.correlation_congruence_loss,
               J.rkd_loss, J.pkt_loss):
        with pytest.raises(ValueError, match="batch sizes differ"):
            fn(e4, e3)
    with pytest.raises(ValueError, match="order"):
        J.correlation_congruence_loss(e4, e4, 0.4, -1)
    with pytest.raises(ValueError, match="rank 2"):
        J.pkt_loss(f, f)
    with pytest.raises(ValueError, match="logits"):
        J.logit_standardize(e4[0])
    with pytest.raises(ValueError, match=r"log_variance_param.*\(3,\)"):
        J.vid_loss(f, f, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="same shape"):
        J.vid_loss(f, f[:, :2], np.ones(3, np.float32))
    with pytest.raises(ValueError, match="margin"):
        J.ab_loss(f, f, np.ones(2, np.float32))
    with pytest.raises(ValueError, match="same shape"):
        J.factor_transfer_loss(f, f[..., :2])
    with pytest.raises(ValueError, match="not ordered"):
        J.nst_loss(f, rand(3, (4, 8, 2, 3)))
    with pytest.raises(ValueError, match="rank 4"):
        J.fsp_matrix(e4, f)
    a, pos, neg = crd_inputs()
    with pytest.raises(ValueError, match=r"negatives must have shape"):
        J.crd_nce_loss(a, pos, neg[:, :, :3], 1.0, 10)
    with pytest.raises(ValueError, match="normalizer"):
        J.crd_nce_loss(a, pos, neg, np.ones(4, np.float32), 10)


def test_zoo_vmap_matches_loop():
    es, et = rand(0, (2, 5, 4)), rand(1, (2, 5, 6))
    for fn in (L.similarity_preserving_loss, L.correlation_congruence_loss,
               L.rkd_loss, L.pkt_loss):
        looped = np.array([float(jax.jit(fn)(es[i], et[i])) for i in range(2)])
        close(jax.jit(jax.vmap(fn))(es, et), looped, rtol=1e-5)
