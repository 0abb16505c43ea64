"""HQQ (half-quadratic quantization) written into ggml's standard blocks.

The solver follows mobiusml/hqq's ``optimize_weights_proximal``: with codes
``Wq = clip(round(W * s + z))`` and decode ``Wr = (Wq - z) / s`` it alternates

* ``We = shrink_p(W - Wr, beta)`` -- the lp-norm (p < 1) proximal operator
  ``sign(e) * relu(|e| - |e|^(p-1) / beta)``,
* ``z = mean(Wq - (W - We) * s)`` -- closed-form zero given the sparse error,
* ``beta *= kappa``,

and stops early when the mean |W - Wr| stops decreasing; ``s`` stays at its
min-max value (HQQ optimises the zero only). Here it is vectorised over every
group (= every ggml sub-block) of a chunk, early stopping per group and keeping
each group's best zero. Differences from the original, all optional:

* ``weights``: the zero update becomes the importance-weighted mean;
* ``beta_scale=c``: beta = c * e0^(p-2) per group, e0 = the group's initial mean
  |error|. The shrink threshold of ``shrink_p`` is ``beta^(-1/(2-p))``; with
  HQQ's default beta=10 and p=0.7 that is ~0.17, far above real weight errors
  (~1e-2), so every error is zeroed and HQQ reduces to min-max scale + mean
  refit of the zero. Scaled, the threshold is ``c^(-1/(2-p)) * e0``.

Types without a zero (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K) use the symmetric variant:
the same proximal step with the scale as the free variable (its closed form is a
least-squares ratio). The per-group (scale, zero) then become ggml fields:
fp16 d (and m) for legacy types, 4/6/8-bit integer sub-scales and sub-mins under
fp16 super-scales for K-quants, codes re-chosen under the stored values.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType as T

from . import gptq as _gptq, kq_refit, layout, refine as _refine
from .layout import TRAITS, Fields


@dataclass(frozen=True)
class HqqParams:
    p: float = 0.7          # lp norm
    beta: float = 1e1       # initial beta (ignored when beta_scale is set)
    kappa: float = 1.01     # beta growth per iteration
    iters: int = 20
    early_stop: bool = True
    beta_scale: Optional[float] = None   # c in beta = c * e0^(p-2)


DEFAULT = HqqParams()


def shrink_lp(e: np.ndarray, beta, p: float) -> np.ndarray:
    """HQQ's generalised soft-thresholding for the lp (quasi-)norm."""
    a = np.abs(e)
    if p == 1:
        return np.sign(e) * np.maximum(a - 1 / beta, 0)
    t = np.power(np.maximum(a, np.float32(1e-30)), np.float32(p - 1)) / beta
    return np.sign(e) * np.maximum(a - t, 0)


def _wmean(v, w):
    if w is None:
        return v.mean(-1)
    sw = w.sum(-1)
    return np.where(sw > 0, (w * v).sum(-1) / np.maximum(sw, 1e-30), v.mean(-1))


def _beta0(e0: np.ndarray, prm: HqqParams) -> np.ndarray:
    if prm.beta_scale is None:
        return np.full(e0.shape, prm.beta, np.float32)
    return (prm.beta_scale * np.power(np.maximum(e0, 1e-12), prm.p - 2)).astype(np.float32)


def solve_affine(W: np.ndarray, nbits: int, weights: Optional[np.ndarray] = None,
                 prm: HqqParams = DEFAULT) -> tuple[np.ndarray, np.ndarray, dict]:
    """Groups W [G, L] -> (s, z) [G] with Wq = clip(round(W s + z), 0, 2^b - 1), Wr = (Wq - z)/s.

    Returns also a dict with the per-iteration mean objective (for tests/tools).
    """
    W = W.astype(np.float32)
    qmax = (1 << nbits) - 1
    lo, hi = W.min(-1), W.max(-1)
    rng = hi - lo
    s = np.where(rng > 0, qmax / np.where(rng > 0, rng, 1), 1).astype(np.float32)
    z = -lo * s
    best_err = np.full(W.shape[0], np.inf)
    best_z = z.copy()
    active = np.ones(W.shape[0], bool)
    beta = None
    hist = []
    for _ in range(prm.iters):
        Wq = np.clip(np.rint(W * s[:, None] + z[:, None]), 0, qmax)
        Wr = (Wq - z[:, None]) / s[:, None]
        err = np.abs(W - Wr).mean(-1)
        hist.append(float(err.mean()))
        if beta is None:
            beta = _beta0(err, prm)
        better = err < best_err
        best_z = np.where(better & active, z, best_z)
        best_err = np.where(better & active, err, best_err)
        if prm.early_stop:
            active &= better
            if not active.any():
                break
        We = shrink_lp(W - Wr, beta[:, None], prm.p)
        z_new = _wmean(Wq - (W - We) * s[:, None], weights)
        z = np.where(active, z_new, z)
        beta = beta * prm.kappa
    return s, best_z, {"mean_abs_err": hist}


def solve_symmetric(W: np.ndarray, lo_code: int, hi_code: int, weights: Optional[np.ndarray] = None,
                    prm: HqqParams = DEFAULT) -> tuple[np.ndarray, dict]:
    """Groups W [G, L] -> step a [G] with Wq = clip(round(W / a), lo, hi), Wr = a Wq (scale-only HQQ).

    With ``early_stop`` a group leaves the iteration at its first step that does not improve, and
    the arrays are cut down to the groups still iterating (row by row the same arithmetic: the
    same steps as iterating every group under a mask; most groups stop within a few steps)."""
    W = W.astype(np.float32)
    idx = np.abs(W).argmax(-1)
    amax = np.take_along_axis(W, idx[:, None], -1)[:, 0]
    # ggml's convention: the largest magnitude lands on the long end of the code range
    if lo_code < 0 and -lo_code > hi_code:
        a = amax / lo_code
    else:
        a = np.abs(amax) / hi_code
    a = np.where(a != 0, a, 1.0)
    best_err = np.full(W.shape[0], np.inf)
    best_a = a.copy()
    err_all = np.zeros(W.shape[0])          # each group's latest error (a stopped group's stays)
    rows = np.arange(W.shape[0])            # the groups still iterating
    w = np.ones_like(W) if weights is None else np.broadcast_to(weights, W.shape)
    beta = None
    hist = []
    for _ in range(prm.iters):
        Wq = W / a[:, None]                   # clip(rint(W / a)), in place
        np.rint(Wq, out=Wq)
        np.clip(Wq, lo_code, hi_code, out=Wq)
        D = W - a[:, None] * Wq               # W - Wr, once for the error and the shrink
        err = np.abs(D).mean(-1)
        err_all = err_all.astype(err.dtype)
        err_all[rows] = err
        hist.append(float(err_all.mean()))
        if beta is None:
            beta = _beta0(err, prm)
        better = err < best_err[rows]
        best_a[rows[better]] = a[better]
        best_err[rows[better]] = err[better]
        if prm.early_stop:
            if not better.all():
                if not better.any():
                    break
                rows, W, w, Wq, D, a, beta = (x[better] for x in (rows, W, w, Wq, D, a, beta))
        We = shrink_lp(D, beta[:, None], prm.p)
        wq = w * Wq                           # (w * Wq) * ..., the products' order as before
        num = (wq * (W - We)).sum(-1)
        den = (wq * Wq).sum(-1)
        a_new = np.where(den > 0, num / np.maximum(den, 1e-30), a)
        a = np.where(a_new != 0, a_new, a)
        beta = beta * prm.kappa
    return best_a, {"mean_abs_err": hist}


def _fp16(a):
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def _int_fit(vals: np.ndarray, nbits: int, signed: bool):
    """vals [n, S] -> (fp16 super-scale [n], ints [n, S]) with vals ~ d * ints."""
    if signed:
        lo, hi = -(1 << (nbits - 1)), (1 << (nbits - 1)) - 1
        idx = np.abs(vals).argmax(-1)
        vmax = np.take_along_axis(vals, idx[:, None], -1)[:, 0]
        d = _fp16(vmax / lo)
    else:
        lo, hi = 0, (1 << nbits) - 1
        d = _fp16(np.maximum(vals, 0).max(-1) / hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        ints = np.where(d[:, None] != 0, np.rint(vals / d[:, None]), 0)
    return d, np.clip(np.nan_to_num(ints), lo, hi).astype(np.int32)


def hqq_fields(qtype: T, x: np.ndarray, w: Optional[np.ndarray], prm: HqqParams = DEFAULT) -> Fields:
    """Solve HQQ per sub-block of x [n_blocks, QK] and encode the result as ``qtype`` fields."""
    tr = TRAITS[qtype]
    n = x.shape[0]
    G = x.reshape(-1, tr.sub_len)
    Gw = None if w is None else w.reshape(-1, tr.sub_len)
    if tr.has_min:
        s, z = solve_affine(G, tr.bits, Gw, prm)[:2]
        A = (1.0 / s).reshape(n, tr.n_sub)
        B = (-z / s).reshape(n, tr.n_sub)
        if tr.sc_bits:     # K-quants: x = d*sc*q - dmin*mn, sc, mn >= 0
            d, sc = _int_fit(A, tr.sc_bits, False)
            dmin, mn = _int_fit(-B, tr.mn_bits, False)
            f = Fields(qtype, d, np.zeros((n, tr.qk), np.int32), dmin, sc, mn)
        else:
            f = Fields(qtype, _fp16(A[:, 0]), np.zeros((n, tr.qk), np.int32), _fp16(B[:, 0]))
    else:
        lo_c, hi_c = (-128, 127) if qtype == T.Q8_0 else (-tr.zq, tr.qmax - tr.zq)
        a = solve_symmetric(G, lo_c, hi_c, Gw, prm)[0].reshape(n, tr.n_sub)
        if tr.sc_bits:
            d, sc = _int_fit(a, tr.sc_bits, True)
            f = Fields(qtype, d, np.zeros((n, tr.qk), np.int32), sc=sc)
        else:
            f = Fields(qtype, _fp16(a[:, 0]), np.zeros((n, tr.qk), np.int32))
    A, B = layout.affine(f)
    f.q = _refine.codes(qtype, x.reshape(n, tr.n_sub, tr.sub_len), A, B).reshape(n, tr.qk)
    return f


# --- encoders (module-level, picklable: write_gguf(encoder=...)) ----------------

def _hessian_aware(enc=None, *, refit: frozenset = kq_refit.CALIBRATED):
    """Let ``enc`` take a :class:`gptq.Hessian` as its ``imatrix``: error-feedback rounding
    (:func:`gptq.encode`) whose block scales ``enc`` picks, weighted by the Hessian's diagonal; the
    ``refit`` types then go through :func:`kq_refit.encode` (``@_hessian_aware(refit=...)``)."""
    if enc is None:
        return functools.partial(_hessian_aware, refit=refit)

    @functools.wraps(enc)
    def wrapped(qtype: T, rows: np.ndarray, imatrix=None) -> np.ndarray:
        if isinstance(imatrix, _gptq.Hessian):
            sweep = None
            if qtype in (T.IQ3_XXS, T.IQ3_S):      # codebook error feedback, quad by quad
                from . import iq3_gptq
                sweep = iq3_gptq.encode
            if qtype in (T.IQ2_XXS, T.IQ2_XS, T.IQ2_S):    # the same, 8 weights per grid point
                from . import iq2_gptq
                sweep = iq2_gptq.encode
            if qtype in (T.IQ1_S, T.IQ1_M):                # the same over the 2048-point ternary grid
                from . import iq1_gptq
                return iq1_gptq.encode(qtype, rows, imatrix, start=enc)
            if qtype in (T.IQ4_NL, T.IQ4_XS):      # one code per weight into the kvalues table
                from . import iq4_gptq
                sweep = iq4_gptq.encode
            if sweep is not None:
                from . import scale_refit     # the scales refit to the sweep's codes under the full moment
                if qtype in scale_refit.SCHEMES:
                    return scale_refit.encode(sweep, qtype, rows, imatrix, start=enc)
                return sweep(qtype, rows, imatrix, start=enc)
            if qtype not in TRAITS:
                return enc(qtype, rows, imatrix.diag)
            if qtype in refit:            # the scales and mins refit to the sweep's codes under the full moment
                return kq_refit.encode(_gptq.encode, qtype, rows, imatrix, start=_AS_FIELDS.get(enc, enc))
            return _gptq.encode(qtype, rows, imatrix, start=_AS_FIELDS.get(enc, enc))
        return enc(qtype, rows, imatrix)
    wrapped.refit_types = refit
    return wrapped


def _passthrough(qtype: T, rows: np.ndarray, imatrix: Optional[np.ndarray]):
    """Types HQQ does not handle (F32, F16, BF16, IQ*): the default path."""
    if qtype in TRAITS:
        return None
    from . import encode
    return encode(qtype, rows, imatrix)


def _blocks(qtype, rows, imatrix):
    tr = TRAITS[qtype]
    rows = np.ascontiguousarray(rows, np.float32)
    return rows, rows.reshape(-1, tr.qk), _refine.weights_for(rows, imatrix, tr.qk)


def encode_hqq_plain(qtype: T, rows: np.ndarray, imatrix: Optional[np.ndarray] = None,
                     prm: HqqParams = DEFAULT) -> np.ndarray:
    """Faithful HQQ (p=0.7, beta=10, kappa=1.01, 20 iterations, early stop), unweighted
    (the imatrix is ignored, as HQQ is calibration-free), written as ``qtype`` blocks."""
    if (done := _passthrough(qtype, rows, imatrix)) is not None:
        return done
    rows, x, _ = _blocks(qtype, rows, imatrix)
    f = hqq_fields(qtype, x, None, prm)
    return layout.pack(f).reshape(rows.shape[0], -1)


SCALED = HqqParams(beta_scale=1.0)


def encode_hqq_scaled(qtype: T, rows: np.ndarray, imatrix: Optional[np.ndarray] = None) -> np.ndarray:
    """HQQ with beta scaled to the group's error (beta = e0^(p-2)), importance-weighted zero."""
    if (done := _passthrough(qtype, rows, imatrix)) is not None:
        return done
    rows, x, w = _blocks(qtype, rows, imatrix)
    f = hqq_fields(qtype, x, w if imatrix is not None else None, SCALED)
    return layout.pack(f).reshape(rows.shape[0], -1)


def _start(qtype: T, rows: np.ndarray, imatrix: Optional[np.ndarray]) -> np.ndarray:
    """The k-quant path's own encoding (ggufq's NumPy encoder; every k-quant has one)."""
    from . import encode
    return encode(qtype, rows, imatrix)


@_hessian_aware(refit=kq_refit.FORMATS)
def encode_hqq_max(qtype: T, rows: np.ndarray, imatrix: Optional[np.ndarray] = None) -> np.ndarray:
    """The slowest, best-by-weight-error pipeline (``--method hqq-max``): two starts -- the k-quant
    encoder's bytes and the HQQ solution -- each refined against the importance
    (data-free gamma^2 proxies or an imatrix, passed in as ``imatrix``); per block the
    lower weighted error wins."""
    if (done := _passthrough(qtype, rows, imatrix)) is not None:
        return done
    return layout.pack(_max_fields(qtype, rows, imatrix)).reshape(rows.shape[0], -1)


def _max_fields(qtype: T, rows: np.ndarray, imatrix: Optional[np.ndarray]) -> Fields:
    rows, x, w = _blocks(qtype, rows, imatrix)
    f0 = _refine.refine_fields(layout.unpack(qtype, _start(qtype, rows, imatrix)), x, w)
    f1 = _refine.refine_fields(hqq_fields(qtype, x, w if imatrix is not None else None, SCALED), x, w)
    e0, e1 = _refine.block_err(f0, x, w), _refine.block_err(f1, x, w)
    return _stored(_select(e1 < e0, f1, f0))


@_hessian_aware
def encode_refined(qtype: T, rows: np.ndarray, imatrix: Optional[np.ndarray] = None) -> np.ndarray:
    """The k-quant encoder's bytes, refined (one start only)."""
    if (done := _passthrough(qtype, rows, imatrix)) is not None:
        return done
    return layout.pack(_refined_fields(qtype, rows, imatrix)).reshape(rows.shape[0], -1)


def _refined_fields(qtype: T, rows: np.ndarray, imatrix: Optional[np.ndarray]) -> Fields:
    rows, x, w = _blocks(qtype, rows, imatrix)
    return _stored(_refine.refine_fields(layout.unpack(qtype, _start(qtype, rows, imatrix)), x, w))


@_hessian_aware
def encode_hqq_fast(qtype: T, rows: np.ndarray, imatrix: Optional[np.ndarray] = None) -> np.ndarray:
    """Cheaper ``hqq``: the k-quant start only, 2 refinement passes, separable +-1 integer search."""
    if (done := _passthrough(qtype, rows, imatrix)) is not None:
        return done
    return layout.pack(_fast_fields(qtype, rows, imatrix)).reshape(rows.shape[0], -1)


def _fast_fields(qtype: T, rows: np.ndarray, imatrix: Optional[np.ndarray]) -> Fields:
    rows, x, w = _blocks(qtype, rows, imatrix)
    return _stored(_refine.refine_fields(layout.unpack(qtype, _start(qtype, rows, imatrix)), x, w,
                                         iters=2, radius=1, separable=True))


def _select(sel: np.ndarray, a: Fields, b: Fields) -> Fields:
    """Per block, ``a``'s fields where ``sel`` else ``b``'s (what np.where on their packed bytes gives)."""
    def pick(u, v):
        return None if u is None else np.where(sel.reshape(-1, *([1] * (u.ndim - 1))), u, v)
    return Fields(a.qtype, pick(a.d, b.d), pick(a.q, b.q), pick(a.dmin, b.dmin), pick(a.sc, b.sc), pick(a.mn, b.mn))


def _stored(f: Fields) -> Fields:
    """``f`` as unpacking its packed bytes gives it back (the fp16 fields rounded as stored)."""
    f.d = _fp16(f.d)
    if f.dmin is not None:
        f.dmin = _fp16(f.dmin)
    return f


@_hessian_aware
def encode_hqq(qtype: T, rows: np.ndarray, imatrix: Optional[np.ndarray] = None) -> np.ndarray:
    """``--method hqq``, the calibration-free default: K-quants as ``encode_hqq_fast``
    (a KLD tie with ``hqq-max`` on tinyllama's Q4_K_M/Q3_K_M/Q2_K mixtures at ~1/5 of
    the time), legacy types as ``encode_hqq_max`` (their HQQ start pays and is cheap)."""
    if TRAITS.get(qtype) is not None and TRAITS[qtype].n_sub > 1:
        return encode_hqq_fast(qtype, rows, imatrix)
    return encode_hqq_max(qtype, rows, imatrix)


def _hqq_fields(qtype: T, rows: np.ndarray, imatrix: Optional[np.ndarray]) -> Fields:
    if TRAITS[qtype].n_sub > 1:
        return _fast_fields(qtype, rows, imatrix)
    return _max_fields(qtype, rows, imatrix)


# an encoder -> the same encoder giving its Fields instead of bytes: the error-feedback sweep's start,
# called once per block-column, skips a pack and an unpack per call (SmolLM2 Q4_K_M: ~8 % of the encoding)
_AS_FIELDS = {encode_hqq_max.__wrapped__: _max_fields, encode_refined.__wrapped__: _refined_fields,
              encode_hqq_fast.__wrapped__: _fast_fields, encode_hqq.__wrapped__: _hqq_fields}
