"""How sure a base-vs-tuned difference is: a paired bootstrap over the examples both models answered.

Each model's figure is a weighted mean over examples, `sum(weight * score) / sum(weight)` (weight 1 for
task metrics, the reference's token count for `loss`). A resample draws n example indices with
replacement and takes *the same* indices for both models, so what varies is which questions were asked,
not which model answered them; the 2.5th and 97.5th percentiles of the resampled differences are the
95% interval. An interval that excludes 0 is a difference that this many examples can tell from noise.

Cost: O(resamples × n) time in numpy, done in chunks so memory stays O(chunk × n).
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 10_000
CHUNK = 1_000


def weighted_mean(scores: list[float], weights: list[float]) -> float:
    total = float(np.sum(weights))
    return float(np.dot(scores, weights) / total) if total else float("nan")


def paired_bootstrap(
    base: list[float], tuned: list[float], weights: list[float], resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """95% interval of (tuned figure − base figure), resampling examples jointly for both models."""
    base_scores, tuned_scores = np.asarray(base, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    weight = np.asarray(weights, dtype=np.float64)
    if not (len(base_scores) == len(tuned_scores) == len(weight)) or len(weight) == 0:
        raise ValueError("paired_bootstrap needs the same, non-zero number of base scores, tuned scores and weights")
    rng = np.random.default_rng(seed)
    n = len(weight)
    differences = []
    for start in range(0, resamples, CHUNK):
        picks = rng.integers(0, n, size=(min(CHUNK, resamples - start), n))  # (chunk, n) example indices
        w = weight[picks]
        total = w.sum(axis=1)
        total[total == 0] = np.nan
        differences.append(((tuned_scores[picks] - base_scores[picks]) * w).sum(axis=1) / total)
    low, high = np.nanpercentile(np.concatenate(differences), [2.5, 97.5])
    return float(low), float(high)
