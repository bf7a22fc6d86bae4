"""The numpy packer makes exactly the packs of the plain one-example-at-a-time best-fit-decreasing
(kept here as the reference), and the training view reads exactly the rows of the packs it is asked for."""

from __future__ import annotations

import bisect
import random

import datasets
import numpy as np
import pytest

from sftkit.data.examples import TrainingExamples
from sftkit.data.packing import Packs, balanced, best_fit_decreasing, packing_efficiency


def reference_best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Longest first (ties by index), each into the bin with the least room that fits (ties by bin id)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, bin id)
    for index in order:
        slot = bisect.bisect_left(free, (lengths[index], -1))
        if slot == len(free):
            bins.append([index])
            bisect.insort(free, (capacity - lengths[index], len(bins) - 1))
        else:
            room, bin_id = free.pop(slot)
            bins[bin_id].append(index)
            bisect.insort(free, (room - lengths[index], bin_id))
    return bins


def reference_balanced(lengths: list[int], capacity: int) -> list[list[int]]:
    """The smallest capacity that needs no more bins than `capacity` does, by bisection."""
    bins = reference_best_fit_decreasing(lengths, capacity)
    if not bins:
        return bins
    low, high = max(max(lengths), -(-sum(lengths) // len(bins))), capacity
    while low < high:
        middle = (low + high) // 2
        if len(reference_best_fit_decreasing(lengths, middle)) <= len(bins):
            high = middle
        else:
            low = middle + 1
    return reference_best_fit_decreasing(lengths, high)


def random_lengths(seed: int) -> tuple[list[int], int]:
    """Uniform, short-heavy and long-tailed lengths, over capacities from tiny to real."""
    rng = random.Random(seed)
    capacity = rng.choice([4, 16, 100, 512, 2048])
    count = rng.randint(1, 400)
    shape = seed % 3
    if shape == 0:
        lengths = [rng.randint(1, capacity) for _ in range(count)]
    elif shape == 1:
        lengths = [rng.randint(1, max(1, capacity // 5)) for _ in range(count)]
    else:
        lengths = [min(capacity, max(1, int(rng.lognormvariate(np.log(capacity / 3), 0.7)))) for _ in range(count)]
    return lengths, capacity


@pytest.mark.parametrize("seed", range(60))
def test_numpy_packer_makes_the_reference_packs(seed):
    lengths, capacity = random_lengths(seed)
    assert best_fit_decreasing(lengths, capacity).tolist() == reference_best_fit_decreasing(lengths, capacity)
    assert balanced(np.asarray(lengths), capacity).tolist() == reference_balanced(lengths, capacity)


def test_pack_plan_layout_and_lengths():
    packs = Packs.from_lists([[4, 3], [0, 1], [2]])
    assert packs.example_ids.tolist() == [4, 3, 0, 1, 2] and packs.offsets.tolist() == [0, 2, 4, 5]
    assert (len(packs), packs[1], packs.examples_of([2, 0]).tolist()) == (3, [0, 1], [2, 4, 3])
    assert packs.sequence_lengths(np.array([5, 3, 4, 2, 6])).tolist() == [8, 8, 4]
    assert (
        packing_efficiency([5, 3, 4, 2, 6], packs, batch_size=3)
        == packing_efficiency([5, 3, 4, 2, 6], [[4, 3], [0, 1], [2]], batch_size=3)
        == 20 / 24
    )


def test_training_view_reads_the_rows_of_the_asked_sequences_only():
    rng = random.Random(0)
    ids = [[rng.randint(1, 99) for _ in range(rng.randint(2, 9))] for _ in range(30)]
    table = datasets.Dataset.from_dict(
        {
            "input_ids": ids,
            "labels": [[-100, *row[1:]] for row in ids],
            "length": [len(row) for row in ids],
            "trained_tokens": [len(row) - 1 for row in ids],
            "source_row": list(range(100, 130)),
            "source": ["x"] * 30,
        }
    ).select(range(29, -1, -1))  # a row selection on top of the table, as after dropping rows
    examples = TrainingExamples.from_dataset(table)
    assert examples.lengths.tolist() == [len(row) for row in reversed(ids)]
    assert examples.source_rows.tolist() == list(range(129, 99, -1))
    packs = examples.sequences(16, packing=True)
    assert sorted(packs.example_ids.tolist()) == list(range(30))
    for sequence_ids in ([0], [len(packs) - 1, 1]):
        read = examples.read(packs, sequence_ids)
        assert [[ex["input_ids"] for ex in row] for row in read] == [
            [table[e]["input_ids"] for e in packs[s]] for s in sequence_ids
        ]
        assert [[ex["labels"] for ex in row] for row in read] == [
            [table[e]["labels"] for e in packs[s]] for s in sequence_ids
        ]
