"""ggufq.quant.qx against a literal scalar transcription of ggml-quants.c.

The oracle below follows the C loops statement by statement in float32
(np.float32 scalars), so the vectorised searches must agree bit for bit.
"""
import numpy as np
import pytest

from ggufq.quant import qx

F = np.float32
EPS = F(1e-15)


def c_nearest_int(v):
    s = np.array([F(v) + F(12582912.0)], dtype=F).view(np.int32)[0]
    return int((s & 0x007FFFFF) - 0x00400000)


def c_make_qx_quants(x, nmax, rmse_type, qw):
    n = len(x)
    L = [0] * n
    mx = F(0); amax = F(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax; mx = x[i]
    if amax < EPS:
        return F(0), L
    iscale = F(-nmax) / mx
    if rmse_type == 0:
        for i in range(n):
            L[i] = nmax + max(-nmax, min(nmax - 1, c_nearest_int(iscale * x[i])))
        return F(1) / iscale, L
    early = rmse_type < 0
    rt = abs(rmse_type)

    def wgt(i):
        if qw is not None:
            return qw[i]
        return {1: x[i] * x[i], 2: F(1), 3: abs(x[i])}.get(rt, np.sqrt(abs(x[i])))

    sumlx = F(0); suml2 = F(0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, c_nearest_int(iscale * x[i])))
        L[i] = l + nmax
        w = wgt(i)
        sumlx = F(sumlx + w * x[i] * F(l))
        suml2 = F(suml2 + w * F(l) * F(l))
    scale = sumlx / suml2 if suml2 != 0 else F(0)
    if early:
        return (F(0.5) * (scale + F(1) / iscale) if suml2 > 0 else F(1) / iscale), L
    best = scale * sumlx
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        iscale = -(F(nmax) + F(0.1) * F(is_)) / mx
        sumlx = F(0); suml2 = F(0)
        for i in range(n):
            l = max(-nmax, min(nmax - 1, c_nearest_int(iscale * x[i])))
            w = wgt(i)
            sumlx = F(sumlx + w * x[i] * F(l))
            suml2 = F(suml2 + w * F(l) * F(l))
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, c_nearest_int(iscale * x[i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale, L


def c_make_q3_quants(x, nmax, do_rmse):
    n = len(x)
    L = [0] * n
    mx = F(0); amax = F(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax; mx = x[i]
    if amax < EPS:
        return F(0), L
    iscale = F(-nmax) / mx
    if do_rmse:
        sumlx = F(0); suml2 = F(0)
        for i in range(n):
            l = max(-nmax, min(nmax - 1, c_nearest_int(iscale * x[i])))
            L[i] = l
            w = x[i] * x[i]
            sumlx = F(sumlx + w * x[i] * F(l))
            suml2 = F(suml2 + w * F(l) * F(l))
        for _ in range(5):
            n_changed = 0
            for i in range(n):
                w = x[i] * x[i]
                slx = sumlx - w * x[i] * F(L[i])
                if slx > 0:
                    sl2 = suml2 - w * F(L[i]) * F(L[i])
                    new_l = max(-nmax, min(nmax - 1, c_nearest_int(x[i] * sl2 / slx)))
                    if new_l != L[i]:
                        slx = slx + w * x[i] * F(new_l)
                        sl2 = sl2 + w * F(new_l) * F(new_l)
                        if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                            L[i] = new_l; sumlx = slx; suml2 = sl2
                            n_changed += 1
            if not n_changed:
                break
        L = [l + nmax for l in L]
        return (sumlx / suml2 if suml2 > 0 else F(0)), L
    for i in range(n):
        L[i] = nmax + max(-nmax, min(nmax - 1, c_nearest_int(iscale * x[i])))
    return F(1) / iscale, L


def c_make_qp_quants(x, nmax, qw):
    n = len(x)
    mx = F(0)
    for i in range(n):
        mx = mx if mx > x[i] else x[i]
    if mx < EPS:
        return F(0), [0] * n
    iscale = F(nmax) / mx
    L = [c_nearest_int(iscale * x[i]) & 0xFF for i in range(n)]
    scale = F(1) / iscale
    best_mse = F(0)
    for i in range(n):
        diff = x[i] - scale * F(L[i])
        best_mse = F(best_mse + qw[i] * diff * diff)
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        isc = (F(0.1) * F(is_) + F(nmax)) / mx
        sc = F(1) / isc
        mse = F(0)
        for i in range(n):
            l = min(nmax, c_nearest_int(isc * x[i]))
            diff = x[i] - sc * F(l)
            mse = F(mse + qw[i] * diff * diff)
        if mse < best_mse:
            best_mse = mse; iscale = isc
    sumlx = F(0); suml2 = F(0)
    for i in range(n):
        l = min(nmax, c_nearest_int(iscale * x[i]))
        L[i] = l & 0xFF
        sumlx = F(sumlx + qw[i] * x[i] * F(l))
        suml2 = F(suml2 + qw[i] * F(l) * F(l))
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            slx = sumlx - w * x[i] * F(L[i])
            sl2 = suml2 - w * F(L[i]) * F(L[i])
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, c_nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    slx = slx + w * x[i] * F(new_l)
                    sl2 = sl2 + w * F(new_l) * F(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF; sumlx = slx; suml2 = sl2
                        n_changed += 1
        if not n_changed:
            break
    return (sumlx / suml2 if suml2 > 0 else F(0)), L


def groups(n_groups, size, seed, positive=False):
    """Varied groups: gaussian, heavy-tailed, with exact zeros, ties and an all-zero group."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_groups, size)).astype(F)
    x *= rng.lognormal(0, 2, (n_groups, 1)).astype(F)
    x[1::7] = rng.standard_t(2, (len(x[1::7]), size)).astype(F)
    x[2::11, ::3] = 0
    x[3::13] = np.round(x[3::13] * 4) / 4          # many ties in |x|
    x[4] = 0
    x[5] = 1e-20
    if positive:
        x = np.abs(x)
    return x


def check(ours, ref_fn, x, *args):
    s, L = ours
    for g in range(len(x)):
        rs, rL = ref_fn(list(x[g]), *[(list(a[g]) if isinstance(a, np.ndarray) else a) for a in args])
        assert s[g].tobytes() == F(rs).tobytes(), (g, s[g], rs, x[g])
        assert list(L[g].astype(int)) == list(rL), (g, list(L[g]), rL)


@pytest.mark.parametrize("nmax,size,rmse_type", [(32, 16, 1), (4, 16, 1), (8, 32, 1), (16, 32, 1),
                                                 (32, 16, 0), (8, 32, -1), (4, 16, 2), (4, 16, 3), (4, 16, 4)])
def test_make_qx_quants_unweighted(nmax, size, rmse_type):
    x = groups(300, size, seed=nmax * 100 + rmse_type + 7)
    check(qx.make_qx_quants(x, nmax, rmse_type), c_make_qx_quants, x, nmax, rmse_type, None)


@pytest.mark.parametrize("nmax,size", [(32, 16), (4, 16), (8, 32), (16, 32)])
def test_make_qx_quants_weighted(nmax, size):
    x = groups(300, size, seed=nmax + 1)
    rng = np.random.default_rng(nmax)
    w = (rng.random(x.shape) * np.sqrt(1 + x * x)).astype(F)
    w[10::17, ::2] = 0                              # imatrix columns that never fired
    check(qx.make_qx_quants(x, nmax, 1, w), c_make_qx_quants, x, nmax, 1, w)


@pytest.mark.parametrize("do_rmse", [True, False])
def test_make_q3_quants(do_rmse):
    x = groups(400, 16, seed=3)
    check(qx.make_q3_quants(x, 4, do_rmse), c_make_q3_quants, x, 4, do_rmse)


@pytest.mark.parametrize("nmax,size", [(15, 16), (63, 8), (7, 32)])
def test_make_qp_quants(nmax, size):
    x = groups(300, size, seed=nmax, positive=True)
    x[6::9, 1] *= -0.01                             # stray negative values take C's uint8 wrap path
    rng = np.random.default_rng(nmax + 5)
    w = rng.random(x.shape).astype(F) + F(0.01)
    check(qx.make_qp_quants(x, nmax, w), c_make_qp_quants, x, nmax, w)


def test_chunking_is_invisible(monkeypatch):
    x = groups(1000, 16, seed=11)
    w = np.abs(groups(1000, 16, seed=12))
    full = qx.make_qx_quants(x, 4, 1, w), qx.make_q3_quants(x, 4), qx.make_qp_quants(np.abs(x), 15, w)
    monkeypatch.setattr(qx, "CHUNK_GROUPS", 97)
    small = qx.make_qx_quants(x, 4, 1, w), qx.make_q3_quants(x, 4), qx.make_qp_quants(np.abs(x), 15, w)
    for (s1, l1), (s2, l2) in zip(full, small):
        assert s1.tobytes() == s2.tobytes() and np.array_equal(l1, l2)


def test_nearest_int_exact():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 3.49999, -7.5, 4194303.0, 1e9, -1e9], dtype=F)
    ours = qx.nearest_int_exact(v)
    assert list(ours) == [c_nearest_int(a) for a in v]
    assert list(ours[:7]) == [0, 2, 2, 0, -2, 3, -8]
