"""Multiple-choice knapsack: one option per item (a type per tensor), total cost within a budget,
least total loss.

:func:`solve` runs the Lagrangian relaxation (each item takes ``argmin loss + lam * cost``; the
cost falls as ``lam`` grows, bisection finds the smallest ``lam`` that fits), then fills the slack
that the relaxation leaves exactly: a dynamic programme over the leftover bytes, on every item's
options, starting from the relaxed solution (upgrades and trades between items), and last a greedy
pass for whatever rounding left. The Lagrangian dual gives a lower bound on the optimum, reported
as ``gap`` so a caller can see how far from optimal the answer can be.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DP_CELLS = 4000          # resolution of the slack programme (cost units)


@dataclass
class Solution:
    choice: list[int]        # option index per item
    cost: int
    loss: float
    bound: float             # Lagrangian lower bound on the optimal loss
    lam: float

    @property
    def gap(self) -> float:
        return 0.0 if self.loss <= 0 else max(0.0, (self.loss - self.bound) / self.loss)


def _pick(costs, losses, lam):
    return [int(np.argmin(l + lam * c)) for c, l in zip(costs, losses)]


def _totals(costs, losses, ch):
    return int(sum(c[j] for c, j in zip(costs, ch))), float(sum(l[j] for l, j in zip(losses, ch)))


def solve(costs: list, losses: list, budget: int) -> Solution:
    """``costs[i][j]`` (int bytes) and ``losses[i][j]`` of option j of item i; ValueError when even
    the cheapest options exceed ``budget``."""
    costs = [np.asarray(c, np.int64) for c in costs]
    losses = [np.asarray(l, np.float64) for l in losses]
    if sum(int(c.min()) for c in costs) > budget:
        raise ValueError("budget below the cheapest choice")
    ch = _pick(costs, losses, 0.0)
    bound, lam = _totals(costs, losses, ch)[1], 0.0
    if _totals(costs, losses, ch)[0] > budget:
        lo, hi = 0.0, 1e-12
        while _totals(costs, losses, _pick(costs, losses, hi))[0] > budget:
            hi *= 4
            if hi > 1e300:       # only ties left: the cheapest option of every item
                break
        for _ in range(100):
            mid = (lo + hi) / 2 if hi < 1e3 * max(lo, 1e-300) else np.sqrt(max(lo, 1e-300) * hi)
            if _totals(costs, losses, _pick(costs, losses, mid))[0] > budget:
                lo = mid
            else:
                hi = mid
            if hi - lo <= 1e-9 * hi:
                break
        lam = hi
        ch = _pick(costs, losses, hi)
        if _totals(costs, losses, ch)[0] > budget:
            ch = [int(np.argmin(c)) for c in costs]
        bound = max(_dual(costs, losses, lo, budget), _dual(costs, losses, hi, budget))
    ch = _fill(costs, losses, ch, budget)
    cost, loss = _totals(costs, losses, ch)
    return Solution(ch, cost, loss, min(bound, loss), lam)


def _dual(costs, losses, lam, budget) -> float:
    return float(sum(float(np.min(l + lam * c)) for c, l in zip(costs, losses)) - lam * budget)


def _fill(costs, losses, ch, budget):
    """Spend the slack: an exact programme over changes from ``ch`` whose extra cost fits (costs in
    units of slack/DP_CELLS, rounded up, so the result always fits), then greedy upgrades."""
    cost, _ = _totals(costs, losses, ch)
    slack = budget - cost
    if slack > 0:
        ch = _dp(costs, losses, ch, slack)
    while True:
        cost, _ = _totals(costs, losses, ch)
        slack = budget - cost
        best, move = 0.0, None
        for i, (c, l) in enumerate(zip(costs, losses)):
            d = c - c[ch[i]]
            gain = l[ch[i]] - l
            ok = (d > 0) & (d <= slack) & (gain > 0)
            if ok.any():
                r = np.where(ok, gain / np.maximum(d, 1), -1.0)
                j = int(np.argmax(r))
                if r[j] > best:
                    best, move = r[j], (i, j)
        if move is None:
            return ch
        ch = list(ch)
        ch[move[0]] = move[1]


def _dp(costs, losses, ch, slack):
    """Least loss over choices whose extra cost over ``ch`` is at most ``slack``; an item may also
    move to a cheaper option to pay for another's upgrade (negative extra cost). Partial sums are
    held within ``slack`` plus two of the largest single-item steps either way."""
    step = max(int(c.max() - c.min()) for c in costs)
    window = slack + 2 * step              # partial sums may stray this far before later items even out
    unit = max(1, -(-window // DP_CELLS))
    n_cells = slack // unit
    off = window // unit                   # cells [0, 2*off]: extra cost -off*unit .. +off*unit
    size = 2 * off + 1
    inf = np.inf
    best = np.full(size, inf)
    best[off] = 0.0
    back = []
    for c, l, j0 in zip(costs, losses, ch):
        d = c - c[j0]
        du = np.where(d >= 0, -(-d // unit), -((-d) // unit))    # up: round up; down: round toward 0
        new = np.full(size, inf)
        arg = np.full(size, j0, np.int16)
        for j in range(len(c)):
            s = int(du[j])
            if abs(s) >= size:
                continue
            dl = l[j] - l[j0]
            if s >= 0:
                cand = np.concatenate([np.full(s, inf), best[:size - s] + dl])
            else:
                cand = np.concatenate([best[-s:] + dl, np.full(-s, inf)])
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        back.append(arg)
        best = new
    k = int(np.argmin(best[:off + n_cells + 1]))
    out = list(ch)
    for i in range(len(costs) - 1, -1, -1):
        j = int(back[i][k])
        out[i] = j
        d = costs[i][j] - costs[i][ch[i]]
        k -= int(-(-d // unit)) if d >= 0 else -int((-d) // unit)
    # the rounded-toward-zero downgrades may leave the true cost above budget: fall back if so
    if sum(int(costs[i][out[i]]) - int(costs[i][ch[i]]) for i in range(len(out))) > slack:
        return ch
    return out
