"""Packing keeps every example once and whole; the collator keeps every token and label and never
lets one example predict or attend to another."""

from __future__ import annotations

import random

import pytest
import torch

from sftkit.data.collate import block_causal_mask, collate
from sftkit.data.packing import pack_balanced, pack_best_fit_decreasing, packing_efficiency, padding_efficiency
from sftkit.data.template import IGNORE_INDEX

PACKERS = [pack_best_fit_decreasing, pack_balanced]


def random_lengths(seed: int, count: int, longest: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, longest) for _ in range(count)]


def test_best_fit_decreasing_exact_bins():
    # Longest first: 6 opens bin 0 (2 left), 5 bin 1 (3 left), 4 bin 2 (4 left);
    # 3 goes to the tightest fit, bin 1; 2 to bin 0.
    assert pack_best_fit_decreasing([5, 3, 4, 2, 6], capacity=8) == [[4, 3], [0, 1], [2]]


def test_best_fit_decreasing_breaks_ties_by_index():
    assert pack_best_fit_decreasing([2, 2, 2, 2], capacity=4) == [[0, 1], [2, 3]]


def test_balanced_keeps_the_number_of_packs_but_evens_them():
    lengths = [9, 5, 5, 3, 2]
    greedy = pack_best_fit_decreasing(lengths, capacity=16)
    assert greedy == [[0, 1, 4], [2, 3]]  # 16 + 8 tokens: a batch of both pads 8 positions
    assert pack_balanced(lengths, capacity=16) == [[0, 3], [1, 2, 4]]  # 12 + 12: no padding
    assert packing_efficiency(lengths, greedy, batch_size=2) == 24 / 32
    assert packing_efficiency(lengths, pack_balanced(lengths, 16), batch_size=2) == 1.0


@pytest.mark.parametrize("pack", PACKERS)
@pytest.mark.parametrize("seed", range(5))
def test_every_example_exactly_once_and_no_pack_over_capacity(pack, seed):
    lengths = random_lengths(seed, count=300, longest=512)
    bins = pack(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert max(sum(lengths[i] for i in b) for b in bins) <= 512
    assert pack(lengths, 512) == bins  # deterministic
    assert len(bins) >= -(-sum(lengths) // 512)


@pytest.mark.parametrize("seed", range(5))
def test_balanced_uses_no_more_packs_than_best_fit(seed):
    lengths = random_lengths(seed, count=300, longest=512)
    assert len(pack_balanced(lengths, 512)) == len(pack_best_fit_decreasing(lengths, 512))


@pytest.mark.parametrize("pack", PACKERS)
def test_edge_cases(pack):
    assert pack([], 8) == []
    assert pack([8], 8) == [[0]]
    with pytest.raises(ValueError, match="1 examples are longer than the pack capacity 8 \\(first: index 1\\)"):
        pack([3, 9, 2], 8)


def test_efficiency_counts_padding_to_the_longest_of_each_batch():
    assert padding_efficiency([4, 2, 3, 3], batch_size=2) == pytest.approx(12 / 14)
    assert packing_efficiency([4, 2, 3, 3], [[0, 1], [2, 3]], batch_size=2) == 1.0
    assert packing_efficiency([4, 2, 3], [[0, 1], [2]], batch_size=2) == pytest.approx(9 / 12)


def example(ids: list[int], labels: list[int]) -> dict[str, list[int]]:
    return {"input_ids": ids, "labels": labels}


A = example([11, 12, 13], [-100, 12, 13])
B = example([21, 22], [-100, 22])
C = example([31, 32, 33, 34], [-100, -100, 33, 34])
PAD = 0


def test_collate_packed_exact_tensors():
    batch = collate([[A, B], [C]], pad_token_id=PAD)
    assert torch.equal(batch["input_ids"], torch.tensor([[11, 12, 13, 21, 22], [31, 32, 33, 34, PAD]]))
    assert torch.equal(batch["targets"], torch.tensor([[12, 13, -100, 22, -100], [-100, 33, 34, -100, -100]]))
    assert torch.equal(batch["position_ids"], torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]))
    assert torch.equal(batch["segment_ids"], torch.tensor([[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]]))


def test_collate_padded_mode_pads_to_the_longest_row_not_max_seq_length():
    batch = collate([[A], [B], [C]], pad_token_id=PAD)
    assert batch["input_ids"].shape == (3, 4)
    assert torch.equal(batch["input_ids"], torch.tensor([[11, 12, 13, PAD], [21, 22, PAD, PAD], [31, 32, 33, 34]]))
    assert torch.equal(
        batch["targets"], torch.tensor([[12, 13, -100, -100], [22, -100, -100, -100], [-100, 33, 34, -100]])
    )
    assert torch.equal(batch["segment_ids"], torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]))


def test_collate_never_crosses_examples():
    """The last token of an example never predicts the first token of the next (which is unmasked here)."""
    first = example([1, 2], [1, 2])
    second = example([3, 4], [3, 4])
    batch = collate([[first, second]], pad_token_id=PAD)
    assert batch["targets"].tolist() == [[2, IGNORE_INDEX, 4, IGNORE_INDEX]]


@pytest.mark.parametrize("seed", range(3))
def test_collate_keeps_every_token_and_label(seed):
    rng = random.Random(seed)
    examples = []
    for _ in range(40):
        n = rng.randint(1, 30)
        ids = [rng.randint(1, 999) for _ in range(n)]
        examples.append(example(ids, [t if rng.random() < 0.5 else IGNORE_INDEX for t in ids]))
    bins = pack_balanced([len(e["input_ids"]) for e in examples], 64)
    rows = [[examples[i] for i in b] for b in bins]
    batch = collate(rows, pad_token_id=PAD)
    for r, row in enumerate(rows):
        offset = 0
        for s, ex in enumerate(row, start=1):
            n = len(ex["input_ids"])
            window = slice(offset, offset + n)
            assert batch["input_ids"][r, window].tolist() == ex["input_ids"]
            assert batch["targets"][r, window].tolist() == [*ex["labels"][1:], IGNORE_INDEX]
            assert batch["position_ids"][r, window].tolist() == list(range(n))
            assert batch["segment_ids"][r, window].tolist() == [s] * n
            offset += n
        assert (batch["segment_ids"][r, offset:] == 0).all()
        assert (batch["targets"][r, offset:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][r, offset:] == PAD).all()
    assert batch["input_ids"].shape[1] == max(sum(len(e["input_ids"]) for e in row) for row in rows)


def test_block_causal_mask_is_causal_and_block_diagonal():
    segment_ids = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    mask = block_causal_mask(segment_ids)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    T, F = True, False
    assert mask[0, 0].tolist() == [
        [T, F, F, F, F, F],
        [T, T, F, F, F, F],
        [T, T, T, F, F, F],
        [F, F, F, T, F, F],
        [F, F, F, T, T, F],
        [F, F, F, F, F, T],  # padding attends to itself only, so no row is empty
    ]
    assert torch.equal(mask[1, 0], torch.ones(6, 6, dtype=torch.bool).tril())


def test_block_causal_mask_matches_the_definition_on_a_packed_batch():
    batch = collate([[A, B, C], [C, A], [B]], pad_token_id=PAD)
    segments = batch["segment_ids"]
    mask = block_causal_mask(segments)[:, 0]
    seq = segments.shape[1]
    for b in range(segments.shape[0]):
        for query in range(seq):
            for key in range(seq):
                expected = key <= query and segments[b, query] == segments[b, key]
                assert bool(mask[b, query, key]) == bool(expected)
        assert mask[b].any(dim=-1).all()
