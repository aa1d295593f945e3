"""Continual-learning metrics from the accuracy matrix R, and means with confidence intervals.

R[k][i] is the score on task i after stage k: k = 0 is the starting model, k = 1..N the model
after training on the k-th task of the stream. Tasks are numbered 1..N in the formulas
(below, code indexes them 0..N-1, so task i is column i - 1):

- ACC        = mean over i of R[N][i]                          (final score, all tasks)
- BWT        = mean over i < N of (R[N][i] - R[i][i])           (backward transfer; < 0 is forgetting)
- FWT        = mean over i >= 2 of (R[i-1][i] - R[0][i])        (forward transfer to not-yet-trained tasks)
- Forgetting = mean over i < N of (max over l < N of R[l][i] - R[N][i])

BWT and Forgetting need N >= 2, FWT needs N >= 2; with fewer stages they are None.

Across seeds, `mean_ci` gives the mean and a two-sided 95% interval from Student's t
distribution with n - 1 degrees of freedom (mean ± t * sd / sqrt(n)); with one seed the
interval is None, since one run says nothing about the spread.
"""

from __future__ import annotations

import math
from statistics import mean, stdev

# Two-sided 95% quantiles t_{0.975, df} for df = 1..30; beyond 30 the normal 1.96 is within 2%.
_T975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]
CI_METHOD = "95% interval from Student's t with n-1 degrees of freedom across seeds; null with one seed"


def _check(R: list[list[float]]) -> int:
    n = len(R[0]) if R else 0
    if n == 0 or len(R) != n + 1 or any(len(row) != n for row in R):
        raise ValueError(
            f"R must have N + 1 rows (stages 0..N) of N scores; got {len(R)} rows of {[len(r) for r in R]}"
        )
    return n


def acc(R: list[list[float]]) -> float:
    n = _check(R)
    return mean(R[n][i] for i in range(n))


def bwt(R: list[list[float]]) -> float | None:
    n = _check(R)
    if n < 2:
        return None
    # Task i (1-based) was trained at stage i: column i-1, row i.
    return mean(R[n][i - 1] - R[i][i - 1] for i in range(1, n))


def fwt(R: list[list[float]]) -> float | None:
    n = _check(R)
    if n < 2:
        return None
    return mean(R[i - 1][i - 1] - R[0][i - 1] for i in range(2, n + 1))


def forgetting(R: list[list[float]]) -> float | None:
    n = _check(R)
    if n < 2:
        return None
    return mean(max(R[l][i - 1] for l in range(n)) - R[n][i - 1] for i in range(1, n))


def stream_metrics(R: list[list[float]]) -> dict:
    return {"acc": acc(R), "bwt": bwt(R), "fwt": fwt(R), "forgetting": forgetting(R)}


def t_quantile(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_ci(values: list[float | None]) -> dict:
    """{'mean', 'ci95': [low, high] or None, 'n', 'values'}; None values (undefined metrics) are left out."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return {"mean": None, "ci95": None, "n": 0, "values": list(values)}
    m = mean(kept)
    ci = None
    if len(kept) > 1:
        half = t_quantile(len(kept) - 1) * stdev(kept) / math.sqrt(len(kept))
        ci = [m - half, m + half]
    return {"mean": m, "ci95": ci, "n": len(kept), "values": kept}
