"""Mix training sources by trained tokens: which source the next example comes from.

A weight is a share of *trained tokens*, not of rows: a source of long conversations would otherwise
dominate a row-weighted mixture. The rule is the one of stride scheduling: the next example comes
from the source furthest behind its target, i.e. with the smallest `taken / weight`. Every prefix
of the run then stays within about one example's tokens of the target shares:

    weights 3:1, examples of 100 trained tokens each
    taken (a, b)   0,0 → a  100,0 → b  100,100 → a  200,100 → a  300,100 → a  400,100 → b ...

O(sources) per example; the state is one integer per source.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class TokenMixer:
    """Picks sources so that the trained tokens taken from each track `weights` (normalised)."""

    def __init__(self, weights: Sequence[float]) -> None:
        shares = np.asarray(weights, np.float64)
        if not len(shares) or (shares <= 0).any():
            raise ValueError(f"mixture weights must be positive, got {list(weights)}")
        self.shares = shares / shares.sum()
        self.taken = np.zeros(len(shares), np.int64)  # trained tokens taken per source

    def pick(self, available: Sequence[bool] | None = None) -> int:
        """The source of the next example; `available` excludes sources that have run out."""
        behind = self.taken / self.shares  # ties → the larger share, then the lower index
        order = np.lexsort((np.arange(len(behind)), -self.shares, behind))
        for source in order:
            if available is None or available[source]:
                return int(source)
        raise ValueError("no source is available")

    def record(self, source: int, trained_tokens: int) -> None:
        self.taken[source] += trained_tokens

    def realised(self) -> np.ndarray:
        """The share of trained tokens each source has had so far."""
        total = self.taken.sum()
        return self.taken / total if total else np.zeros_like(self.shares)

    def state_dict(self) -> dict:
        return {"taken": self.taken.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.taken = np.asarray(state["taken"], np.int64)
