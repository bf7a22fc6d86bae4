"""Best-fit-decreasing packing of whole examples into sequences of `max_seq_length` tokens.

No example is ever split. Each packed sequence keeps its examples' boundaries, so the collator can
restart `position_ids` per example and the model can attend block-diagonally:

    example A = a0 a1 a2      example B = b0 b1       capacity 6
    packed    = a0 a1 a2 b0 b1 <pad>
    position  =  0  1  2  0  1  0
    segment   =  1  1  1  2  2  0      (attention only within a segment, causal)

A pack plan is two numpy arrays, not a list of lists, so a million examples cost 16 MB:

    example_ids  [4 3 | 0 1 | 2]         packs: [4, 3], [0, 1], [2]
    offsets      [0 2 4 5]               pack p = example_ids[offsets[p]:offsets[p + 1]]

Cost: a sort of the lengths (O(n log n)), then work per distinct (length, free space) pair rather
than per example: the bins are kept in buckets by free space (at most `capacity + 1` of them), and a
run of equal lengths fills whole groups of bins at once with numpy. One million examples of up to
2,048 tokens pack, balancing search included, in seconds.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Packs:
    """Training sequences as example ids: sequence `s` holds `example_ids[offsets[s]:offsets[s + 1]]`."""

    example_ids: np.ndarray  # (examples,) int64, grouped by sequence
    offsets: np.ndarray  # (sequences + 1,) int64, offsets[0] = 0

    @classmethod
    def one_per_example(cls, count: int) -> Packs:
        """No packing: sequence i is example i."""
        return cls(np.arange(count, dtype=np.int64), np.arange(count + 1, dtype=np.int64))

    @classmethod
    def from_lists(cls, sequences: Sequence[Sequence[int]]) -> Packs:
        sizes = np.fromiter((len(s) for s in sequences), np.int64, len(sequences))
        ids = np.fromiter((i for s in sequences for i in s), np.int64, int(sizes.sum()))
        return cls(ids, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, sequence: int) -> list[int]:
        return self.example_ids[self.offsets[sequence] : self.offsets[sequence + 1]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return (self[s] for s in range(len(self)))

    def examples_of(self, sequences: Sequence[int]) -> np.ndarray:
        """The example ids of several sequences, in order, as one array."""
        if len(sequences) == 0:
            return np.zeros(0, np.int64)
        return np.concatenate([self.example_ids[self.offsets[s] : self.offsets[s + 1]] for s in sequences])

    def sequence_lengths(self, lengths: np.ndarray) -> np.ndarray:
        """Tokens per sequence, given tokens per example."""
        totals = np.concatenate([[0], np.cumsum(np.asarray(lengths, np.int64)[self.example_ids])])
        return totals[self.offsets[1:]] - totals[self.offsets[:-1]]

    def tolist(self) -> list[list[int]]:
        return list(self)


class _Buckets:
    """Bin ids grouped by free space. Each bucket hands out its lowest ids first (BFD's tie-break)."""

    def __init__(self, capacity: int) -> None:
        self.sorted: list[np.ndarray] = [np.zeros(0, np.int64)] * (capacity + 1)  # ascending ids
        self.pending: list[list[np.ndarray]] = [[] for _ in range(capacity + 1)]  # ascending chunks to merge in
        self.sizes = np.zeros(capacity + 1, np.int64)

    def push(self, free: int, ids: np.ndarray) -> None:
        if len(ids):
            self.pending[free].append(ids)
            self.sizes[free] += len(ids)

    def smallest_fitting(self, length: int) -> int:
        """The least free space >= length that some bin has, or -1."""
        hits = np.flatnonzero(self.sizes[length:])
        return length + int(hits[0]) if len(hits) else -1

    def take(self, free: int, count: int) -> np.ndarray:
        """The `count` lowest bin ids with this free space, removed from the bucket."""
        current = self.sorted[free]
        if self.pending[free]:
            parts = ([current] if len(current) else []) + self.pending[free]
            current = np.sort(np.concatenate(parts)) if len(parts) > 1 else parts[0]
            self.pending[free] = []
        taken, self.sorted[free] = current[:count], current[count:]
        self.sizes[free] -= len(taken)
        return taken


def _bins_of(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Best-fit-decreasing: for each example in longest-first order, the bin it goes to.

    Returns (order, bin of order[i], number of bins). Same result as placing examples one by one,
    longest first (ties by index), each into the bin with the least free space that still fits it
    (ties by the lowest bin id), opening a new bin when none fits. A run of k equal lengths L is
    placed in groups: the best bin has free space r, takes q = r // L of them in a row (after each,
    its free space r - jL is the new best fit, as nothing fitted between L and r), and then the next
    bin of the same bucket is best.
    """
    order = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[order]
    bin_of = np.empty(len(lengths), np.int64)
    buckets = _Buckets(capacity)
    bins = 0
    starts = np.flatnonzero(np.diff(sorted_lengths, prepend=-1))  # where each run of equal lengths begins
    ends = np.append(starts[1:], len(lengths))
    # no examples: no run starts, and `ends` holds one stray 0
    for run_start, run_end in zip(starts.tolist(), ends.tolist(), strict=False):
        length = int(sorted_lengths[run_start])
        position = run_start
        while position < run_end:
            left = run_end - position
            free = buckets.smallest_fitting(length)
            if free < 0:  # nothing fits: open bins, each filled with as many as fit
                free, per_bin = capacity, capacity // length
                count = -(-left // per_bin)
                ids = np.arange(bins, bins + count, dtype=np.int64)
                bins += count
            else:
                per_bin = free // length
                ids = buckets.take(free, min(int(buckets.sizes[free]), -(-left // per_bin)))
            placed = min(left, len(ids) * per_bin)
            bin_of[position : position + placed] = np.repeat(ids, per_bin)[:placed]
            last = placed - (len(ids) - 1) * per_bin  # examples in the last bin of the group
            if last == per_bin:
                buckets.push(free - per_bin * length, ids)
            else:
                buckets.push(free - per_bin * length, ids[:-1])
                buckets.push(free - last * length, ids[-1:])
            position += placed
    return order, bin_of, bins


def _check_lengths(lengths: Sequence[int] | np.ndarray, capacity: int) -> np.ndarray:
    array = np.asarray(lengths, dtype=np.int64).reshape(-1)
    too_long = np.flatnonzero(array > capacity)
    if len(too_long):
        raise ValueError(
            f"{len(too_long)} examples are longer than the pack capacity {capacity} (first: index {too_long[0]})"
        )
    if len(array) and array.min() < 1:
        raise ValueError(f"example {int(np.argmin(array))} has no tokens; every example needs at least one")
    return array


def best_fit_decreasing(lengths: Sequence[int] | np.ndarray, capacity: int) -> Packs:
    """Group example indices into bins of at most `capacity` tokens, best fit, longest first.

    Deterministic: ties are broken by example index. Within a pack, examples keep the order they
    were placed in (longest first).
    """
    array = _check_lengths(lengths, capacity)
    return _packs(*_bins_of(array, capacity))


def balanced(lengths: Sequence[int] | np.ndarray, capacity: int, progress: bool = False) -> Packs:
    """Best-fit-decreasing into as few packs as at `capacity`, but with packs as even as possible.

    Plain BFD leaves the last packs part-empty; a batch that holds one of them is padded to the
    longest pack. Searching the smallest capacity that still needs no more packs spreads the slack
    evenly, so the packs of a batch are near-equal and almost no position is padding. The search
    runs BFD about log2(capacity) times; `progress` shows a bar over those passes.
    """
    from tqdm.auto import tqdm

    array = _check_lengths(lengths, capacity)
    if not len(array):
        return Packs(np.zeros(0, np.int64), np.zeros(1, np.int64))
    with tqdm(desc=f"Packing {len(array):,} examples", unit="pass", disable=not progress) as bar:
        bins = _bins_of(array, capacity)[2]
        low = max(int(array.max()), -(-int(array.sum()) // bins))
        high = capacity
        bar.total = 2 + max(0, high - low).bit_length()
        bar.update()
        while low < high:
            middle = (low + high) // 2
            if _bins_of(array, middle)[2] <= bins:
                high = middle
            else:
                low = middle + 1
            bar.update()
        packs = _packs(*_bins_of(array, high))
        bar.update(bar.total - bar.n)
    return packs


def _packs(order: np.ndarray, bin_of: np.ndarray, bins: int) -> Packs:
    by_bin = np.argsort(bin_of, kind="stable")  # placement order within a bin
    sizes = np.bincount(bin_of, minlength=bins)
    return Packs(order[by_bin].astype(np.int64), np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))


def pack_best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """`best_fit_decreasing` as lists, for small inputs and tests."""
    return best_fit_decreasing(lengths, capacity).tolist()


def pack_balanced(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """`balanced` as lists, for small inputs and tests."""
    return balanced(lengths, capacity).tolist()


def packing_efficiency(
    lengths: Sequence[int] | np.ndarray, packs: Packs | Sequence[Sequence[int]], batch_size: int
) -> float:
    """Fraction of real tokens in the batches the loop builds: `batch_size` packs per micro-batch,
    padded to the longest pack of the micro-batch."""
    if not isinstance(packs, Packs):
        packs = Packs.from_lists(packs)
    return padding_efficiency(packs.sequence_lengths(np.asarray(lengths, np.int64)), batch_size)


def padding_efficiency(lengths: Sequence[int] | np.ndarray, batch_size: int) -> float:
    """Fraction of real tokens when examples are batched in order and padded to each batch's longest."""
    array = np.asarray(lengths, np.int64)
    if not len(array):
        return 0.0
    starts = np.arange(0, len(array), batch_size)
    longest = np.maximum.reduceat(array, starts)
    sizes = np.diff(np.append(starts, len(array)))
    total = int((longest * sizes).sum())
    return int(array.sum()) / total if total else 0.0
