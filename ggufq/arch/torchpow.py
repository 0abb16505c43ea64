"""float32 ``base ** exponents`` exactly as torch computes it on x86 CPUs (for llama3 ``rope_freqs``).

llama.cpp's converter computes the llama3 rope factors from
``base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)``. torch's CPU pow kernel
(``cpu_kernel_vec``) runs whole blocks of ``2 * Vectorized<float>::size()`` elements through SLEEF's
``Sleef_powf{8,16}_u10`` (AVX2 / AVX-512, both with FMA) and the tail through ``std::pow(float, float)``
(libm's ``powf``). The two differ by an ulp now and then, so a bit-exact port has to do the same:

* :func:`sleef_powf` is SLEEF's ``xpowf`` (``src/libm/sleefsimdsp.c``: ``logkf``, ``expkf`` and the
  double-float helpers of ``src/common/df.h`` in their ``ENABLE_FMA_SP`` form) for a positive finite
  base, in the same operation order, float32 rounding at every step and single-rounded FMAs;
* :func:`torch_pow` splits the vector as torch does, for the vector width of this CPU (AVX-512: 16
  floats, AVX2: 8; what ``torch.backends.cpu.get_cpu_capability()`` picks), and uses libm's ``powf``
  through ctypes for the tail (correctly rounded float64 ``pow`` where libm is not found).
"""
from __future__ import annotations

import ctypes
import ctypes.util
from fractions import Fraction
from functools import lru_cache

import numpy as np

F = np.float32


def _r32(fr: Fraction) -> F:
    """An exact rational rounded once to float32 (to nearest, ties to even)."""
    d = float(fr)                                   # correctly rounded to double
    f = F(d)
    if float(f) != d:                               # d is not a float32: beware of double rounding
        a, b = (np.nextafter(f, F(-np.inf)), f) if float(f) > d else (f, np.nextafter(f, F(np.inf)))
        mid = (Fraction(float(a)) + Fraction(float(b))) / 2
        if Fraction(d) == mid and fr != mid:
            f = b if fr > mid else a
    return F(f)


def fma(x, y, z) -> F:
    return _r32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))


def _add(a, b):
    return F(F(a) + F(b))


def _sub(a, b):
    return F(F(a) - F(b))


def _mul(a, b):
    return F(F(a) * F(b))


# ---- df.h (ENABLE_FMA_SP): a float2 is a (hi, lo) pair
def dfadd2_f_f(x, y):
    s = _add(x, y)
    v = _sub(s, x)
    return s, _add(_sub(x, _sub(s, v)), _sub(y, v))


def dfadd2_f2_f(x, y):
    s = _add(x[0], y)
    v = _sub(s, x[0])
    t = _add(_sub(x[0], _sub(s, v)), _sub(y, v))
    return s, _add(t, x[1])


def dfadd2_f2_f2(x, y):
    s = _add(x[0], y[0])
    v = _sub(s, x[0])
    t = _add(_sub(x[0], _sub(s, v)), _sub(y[0], v))
    return s, _add(t, _add(x[1], y[1]))


def dfadd_f2_f2(x, y):
    s = _add(x[0], y[0])
    return s, _add(_add(_add(_sub(x[0], s), y[0]), x[1]), y[1])


def dfadd_f_f2(x, y):
    s = _add(x, y[0])
    return s, _add(_add(_sub(x, s), y[0]), y[1])


def dfnormalize(t):
    s = _add(t[0], t[1])
    return s, _add(_sub(t[0], s), t[1])


def dfscale(d, s):
    return _mul(d[0], s), _mul(d[1], s)


def dfdiv(n, d):
    t = F(F(1) / d[0])
    s = _mul(n[0], t)
    u = fma(t, n[0], -s)                            # vfmapn: t*n - s
    v = fma(-d[1], t, fma(-d[0], t, F(1)))          # vfmanp: -d*t + 1
    return s, fma(s, v, fma(n[1], t, u))


def dfsqu(x):
    s = _mul(x[0], x[0])
    return s, fma(_add(x[0], x[0]), x[1], fma(x[0], x[0], -s))


def dfmul_f2_f2(x, y):
    s = _mul(x[0], y[0])
    return s, fma(x[0], y[1], fma(x[1], y[0], fma(x[0], y[0], -s)))


def dfmul_f2_f(x, y):
    s = _mul(x[0], y)
    return s, fma(x[1], y, fma(x[0], y, -s))


# ---- sleefsimdsp.c
L2U, L2L, R_LN2 = F(0.693145751953125), F(1.428606765330187045e-06), F(1.442695040888963407359924681001892137426645954152985934135449406931)


def logkf(d: F):
    e = int(np.floor(np.log2(float(_mul(d, F(1.0 / 0.75))))))  # getexp / ilogb2k of d * (1/0.75)
    m = F(np.ldexp(d, -e))                                      # getmant / ldexp3: exact
    x = dfdiv(dfadd2_f_f(F(-1), m), dfadd2_f_f(F(1), m))
    x2 = dfsqu(x)
    t = F(0.240320354700088500976562)
    t = fma(t, x2[0], F(0.285112679004669189453125))
    t = fma(t, x2[0], F(0.400007992982864379882812))
    c = (F(0.66666662693023681640625), F(3.69183861259614332084311e-09))
    s = dfmul_f2_f((F(0.69314718246459960938), F(-1.904654323148236017e-09)), F(e))
    s = dfadd_f2_f2(s, dfscale(x, F(2)))
    return dfadd_f2_f2(s, dfmul_f2_f2(dfmul_f2_f2(x2, x), dfadd2_f2_f2(dfmul_f2_f(x2, t), c)))


def expkf(d) -> F:
    u = _mul(_add(d[0], d[1]), R_LN2)
    q = int(np.rint(u))
    s = dfadd2_f2_f(d, _mul(F(q), -L2U))
    s = dfadd2_f2_f(s, _mul(F(q), -L2L))
    s = dfnormalize(s)
    u = F(0.00136324646882712841033936)
    for c in (0.00836596917361021041870117, 0.0416710823774337768554688, 0.166665524244308471679688,
              0.499999850988388061523438):
        u = fma(u, s[0], F(c))
    t = dfadd_f2_f2(s, dfmul_f2_f(dfsqu(s), u))
    t = dfadd_f_f2(F(1), t)
    if d[0] < F(-104):
        return F(0)
    return F(np.ldexp(_add(t[0], t[1]), q))


def sleef_powf(x: F, y: F) -> F:
    """``Sleef_powf_u10`` for a positive finite ``x`` and finite ``y``."""
    x, y = F(x), F(y)
    if y == 0 or x == 1:
        return F(1)
    return expkf(dfmul_f2_f(logkf(x), y))


@lru_cache(maxsize=1)
def _libm_powf():
    name = ctypes.util.find_library("m")
    try:
        f = ctypes.CDLL(name).powf if name else None
    except (OSError, AttributeError):
        f = None
    if f is not None:
        f.restype, f.argtypes = ctypes.c_float, (ctypes.c_float, ctypes.c_float)
    return f


def libm_powf(x: F, y: F) -> F:
    f = _libm_powf()
    if f is None:
        return F(np.float64(x) ** np.float64(y))
    return F(f(float(x), float(y)))


@lru_cache(maxsize=1)
def vector_floats() -> int:
    """Floats per SIMD register torch's CPU kernels use here: 16 with AVX-512 (avx512f/bw/vl/dq), 8 with AVX2."""
    try:
        flags = set()
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return 8
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return 16
    return 8 if {"avx2", "fma"} <= flags else 0


def torch_pow(base: float, ex: np.ndarray) -> np.ndarray:
    """float32 ``base ** ex`` as torch's CPU kernel computes it (a Python float base, float32 exponents)."""
    b = F(base)
    n = len(ex)
    block = 2 * vector_floats()
    n_vec = (n // block) * block if block else 0
    out = [sleef_powf(b, e) for e in ex[:n_vec]] + [libm_powf(b, e) for e in ex[n_vec:]]
    return np.asarray(out, dtype=F)
