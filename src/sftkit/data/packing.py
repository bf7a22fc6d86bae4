"""Best-fit-decreasing packing of whole examples into sequences of `max_seq_length` tokens.

No example is ever split. Each packed sequence keeps its examples' boundaries, so the collator can
restart `position_ids` per example and the model can attend block-diagonally:

    example A = a0 a1 a2      example B = b0 b1       capacity 6
    packed    = a0 a1 a2 b0 b1 <pad>
    position  =  0  1  2  0  1  0
    segment   =  1  1  1  2  2  0      (attention only within a segment, causal)
"""

from __future__ import annotations

import bisect


def pack_best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins of at most `capacity` tokens, best fit, longest first.

    Deterministic: ties are broken by example index. O(n log n) plus list moves.
    """
    # A list, not a datasets Column (`dataset["length"]`), whose every index is an Arrow lookup.
    lengths = list(lengths)
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"{len(too_long)} examples are longer than the pack capacity {capacity} (first: index {too_long[0]})")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # Sorted (remaining capacity, bin id) so the tightest bin that still fits is one bisect away.
    free: list[tuple[int, int]] = []
    for index in order:
        length = lengths[index]
        slot = bisect.bisect_left(free, (length, -1))
        if slot == len(free):
            bins.append([index])
            bisect.insort(free, (capacity - length, len(bins) - 1))
        else:
            remaining, bin_id = free.pop(slot)
            bins[bin_id].append(index)
            bisect.insort(free, (remaining - length, bin_id))
    return bins


def pack_balanced(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing into as few packs as at `capacity`, but with packs as even as possible.

    Plain BFD leaves the last packs part-empty; a batch that holds one of them is padded to the
    longest pack. Searching the smallest capacity that still needs no more packs spreads the slack
    evenly, so the packs of a batch are near-equal and almost no position is padding.
    """
    lengths = list(lengths)
    bins = pack_best_fit_decreasing(lengths, capacity)
    if not bins:
        return bins
    low = max(max(lengths), -(-sum(lengths) // len(bins)))
    high = capacity
    while low < high:
        middle = (low + high) // 2
        if len(pack_best_fit_decreasing(lengths, middle)) <= len(bins):
            high = middle
        else:
            low = middle + 1
    return pack_best_fit_decreasing(lengths, high)


def packing_efficiency(lengths: list[int], bins: list[list[int]], batch_size: int) -> float:
    """Fraction of real tokens in the batches the loop builds: `batch_size` packs per micro-batch,
    padded to the longest pack of the micro-batch."""
    lengths = list(lengths)
    pack_lengths = [sum(lengths[i] for i in b) for b in bins]
    return padding_efficiency(pack_lengths, batch_size)


def padding_efficiency(lengths: list[int], batch_size: int) -> float:
    """Fraction of real tokens when examples are batched in order and padded to each batch's longest."""
    total = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start:start + batch_size]
        total += max(batch) * len(batch)
    return sum(lengths) / total if total else 0.0
