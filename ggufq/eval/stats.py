"""Per-token scores and the summary statistics of ``llama-perplexity``, in NumPy.

Per chunk, :func:`token_scores` turns the logits of the scored positions into
per-token scalars (negative log-likelihood, KL divergence, probability
difference, top-token agreement); logits are never kept. :func:`ppl_summary`
and :func:`kld_summary` reduce those scalars with the formulas of
``tools/perplexity/perplexity.cpp`` in llama.cpp (``perplexity()`` and
``kl_divergence()``): the same error estimates, covariance, median and
percentile interpolation, so the figures compare one to one.

The softmax is float64 throughout; llama-perplexity's is float32 with a double
sum, and its base log-probabilities are stored as 16-bit fixed point, so its
figures differ from these in the last digits only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

# rows of logits turned into float64 at once (bounds temporaries to ~ROW_BLOCK*n_vocab*8 bytes)
ROW_BLOCK = 32

KLD_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 10.0, 5.0, 1.0, 0.1)
DP_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 25.0, 10.0, 5.0, 1.0, 0.1)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@dataclass
class ChunkScores:
    """Per-token scalars of one chunk (length = scored tokens of the chunk)."""
    nll: np.ndarray                          # -log q(target)
    nll_base: Optional[np.ndarray] = None    # -log p(target) under the reference
    kld: Optional[np.ndarray] = None         # sum_v p(v) (log p(v) - log q(v))
    p_diff: Optional[np.ndarray] = None      # q(target) - p(target)
    same_top: Optional[np.ndarray] = None    # argmax q == argmax p


def token_scores(logits: np.ndarray, targets: np.ndarray, ref_logits: Optional[np.ndarray] = None,
                 block: int = ROW_BLOCK) -> ChunkScores:
    """Scores of ``logits[i]`` predicting ``targets[i]`` (and against ``ref_logits[i]``).

    ``logits``/``ref_logits``: float32 ``[n, n_vocab]``; ``targets``: int ``[n]``.
    """
    n = logits.shape[0]
    targets = np.asarray(targets, dtype=np.int64)
    if targets.shape != (n,):
        raise ValueError(f"{n} rows of logits but {targets.shape} targets")
    nll = np.empty(n)
    has_ref = ref_logits is not None
    if has_ref:
        if ref_logits.shape != logits.shape:
            raise ValueError(f"logits {logits.shape} and reference logits {ref_logits.shape} differ in shape")
        nll_base, kld, same = np.empty(n), np.empty(n), np.empty(n, dtype=bool)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        rows = np.arange(hi - lo)
        lq = log_softmax(logits[lo:hi])
        nll[lo:hi] = -lq[rows, targets[lo:hi]]
        if has_ref:
            lp = log_softmax(ref_logits[lo:hi])
            nll_base[lo:hi] = -lp[rows, targets[lo:hi]]
            kld[lo:hi] = np.einsum("ij,ij->i", np.exp(lp), lp - lq)
            # first index of the maximum, as llama-perplexity's loops
            same[lo:hi] = np.argmax(logits[lo:hi], axis=-1) == np.argmax(ref_logits[lo:hi], axis=-1)
    if not has_ref:
        return ChunkScores(nll)
    p_diff = np.exp(-nll) - np.exp(-nll_base)
    return ChunkScores(nll, nll_base, kld, p_diff, same)


# ---------------------------------------------------------------- reductions

def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """llama-perplexity's ``mean_and_uncertainty``: mean and its standard error
    ``sqrt((E[x^2] - E[x]^2) / (n - 1))``, 0 when the variance is not positive or n <= 10."""
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    if n < 1:
        return 0.0, 0.0
    f = float(v.sum() / n)
    df = float((v * v).sum() / n - f * f)
    df = float(np.sqrt(df / (n - 1))) if df > 0 and n > 10 else 0.0
    return f, df


def covariance(a: np.ndarray, b: np.ndarray) -> float:
    """llama-perplexity's ``covariance`` of the two means: ``(E[ab] - E[a]E[b]) / (n - 1)``, 0 for n < 10."""
    n = a.size
    if n < 10:
        return 0.0
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(((a * b).sum() / n - (a.sum() / n) * (b.sum() / n)) / (n - 1))


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's percentile: linear interpolation at ``fraction*(n-1)``, in float32 as there."""
    v = sorted_values
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = np.float32(fraction) * np.float32(v.size - 1)
    ip = int(p)
    p = np.float32(p - np.float32(ip))
    lo = np.float32(v[ip])
    hi = np.float32(v[min(ip + 1, v.size - 1)])
    return float((np.float32(1) - p) * lo + p * hi)


def median(sorted_values: np.ndarray) -> float:
    """Middle value; mean of the two middle ones for an even count (float32, as llama-perplexity)."""
    v = sorted_values
    n = v.size
    if n % 2 == 0:
        return float(np.float32(0.5) * (np.float32(v[n // 2]) + np.float32(v[n // 2 - 1])))
    return float(v[n // 2])


def ppl_summary(nll: np.ndarray) -> dict:
    """Final estimate of ``perplexity()``: PPL = exp(mean nll) ± PPL * stderr(nll)."""
    nll = np.asarray(nll, dtype=np.float64)
    n = nll.size
    mean = float(nll.sum() / n)
    var = float((nll * nll).sum() / n - mean * mean)
    ppl = float(np.exp(mean))
    err = float(np.sqrt(var / (n - 1))) * ppl if var > 0 and n > 1 else 0.0
    return {"ppl": ppl, "ppl_err": err, "mean_nll": mean, "n_tokens": int(n)}


def kld_summary(nll: np.ndarray, nll_base: np.ndarray, kld: np.ndarray, p_diff: np.ndarray,
                same_top: np.ndarray) -> dict:
    """Every figure ``kl_divergence()`` prints, keyed by name (fractions, not %)."""
    n = int(nll.size)
    lq, lq_err = mean_and_uncertainty(nll)
    lb, lb_err = mean_and_uncertainty(nll_base)
    cov = covariance(nll, nll_base)
    ppl, ppl_base = float(np.exp(lq)), float(np.exp(lb))
    ppl_err, ppl_base_err = ppl * lq_err, ppl_base * lb_err
    ratio_log = lq - lb
    ratio_log_err = float(np.sqrt(max(0.0, lq_err ** 2 + lb_err ** 2 - 2.0 * cov)))
    ratio = float(np.exp(ratio_log))
    ppl_cov = ppl * ppl_base * cov
    diff_err = float(np.sqrt(max(0.0, ppl_err ** 2 + ppl_base_err ** 2 - 2.0 * ppl_cov)))
    cor = cov / (lq_err * lb_err) if lq_err > 0 and lb_err > 0 else 0.0

    kmean, kerr = mean_and_uncertainty(kld)
    ks = np.sort(np.asarray(kld, dtype=np.float32))
    dps = np.sort(np.asarray(p_diff, dtype=np.float32))
    dmean, derr = mean_and_uncertainty(p_diff)
    p_diff = np.asarray(p_diff, dtype=np.float64)
    mse, mse_err = mean_and_uncertainty(p_diff * p_diff)
    rms = float(np.sqrt(mse))
    rms_err = 0.5 / rms * mse_err if rms > 0 else 0.0
    top = float(np.count_nonzero(same_top)) / n
    top_err = float(np.sqrt(top * (1 - top) / (n - 1))) if n > 1 else 0.0

    out = {
        "n_tokens": n,
        "ppl": ppl, "ppl_err": ppl_err,
        "ppl_base": ppl_base, "ppl_base_err": ppl_base_err,
        "cor_ln_ppl": cor,
        "ln_ppl_ratio": ratio_log, "ln_ppl_ratio_err": ratio_log_err,
        "ppl_ratio": ratio, "ppl_ratio_err": ratio * ratio_log_err,
        "ppl_diff": ppl - ppl_base, "ppl_diff_err": diff_err,
        "ppl_diff_pct": (ppl / ppl_base - 1.0) * 100.0,
        "kld_mean": kmean, "kld_err": kerr,
        "kld_max": float(ks[-1]), "kld_median": median(ks), "kld_min": float(ks[0]),
        "dp_mean": dmean, "dp_err": derr,
        "dp_max": float(dps[-1]), "dp_median": median(dps), "dp_min": float(dps[0]),
        "rms_dp": rms, "rms_dp_err": rms_err,
        "same_top": top, "same_top_err": top_err,
    }
    for q in KLD_PERCENTILES:
        out[f"kld_p{q:g}"] = percentile(ks, q / 100.0)
    for q in DP_PERCENTILES:
        out[f"dp_p{q:g}"] = percentile(dps, q / 100.0)
    return out


@dataclass
class Accumulator:
    """Per-token scalars of all chunks so far (a few floats per scored token, never logits)."""
    with_ref: bool
    parts: dict = field(default_factory=lambda: {k: [] for k in ("nll", "nll_base", "kld", "p_diff", "same_top")})

    def add(self, s: ChunkScores) -> None:
        self.parts["nll"].append(s.nll)
        if self.with_ref:
            for k in ("nll_base", "kld", "p_diff", "same_top"):
                self.parts[k].append(getattr(s, k))

    def array(self, key: str) -> np.ndarray:
        p = self.parts[key]
        return np.concatenate(p) if p else np.empty(0)

    @property
    def n_tokens(self) -> int:
        return sum(a.size for a in self.parts["nll"])

    def running_ppl(self) -> float:
        n = self.n_tokens
        return float(np.exp(sum(a.sum() for a in self.parts["nll"]) / n)) if n else float("nan")

    def summary(self) -> dict:
        out = ppl_summary(self.array("nll"))
        if self.with_ref:
            out["kld"] = kld_summary(self.array("nll"), self.array("nll_base"), self.array("kld"),
                                     self.array("p_diff"), self.array("same_top"))
        return out
