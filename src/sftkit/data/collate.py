"""Turn groups of tokenized examples into the tensors the model sees.

Every row of a batch is a list of examples (one example when padding, several when packing).
Targets are shifted *per example* before concatenation, so the last token of one example is never
asked to predict the first token of the next:

    tokens    a0 a1 a2 | b0 b1 | pad
    labels    -  a1 a2 | -  b1 |
    targets   a1 a2 -  | b1 -  | -      (targets[t] = label of t+1 within the same example)
    positions 0  1  2  | 0  1  | 0
    segments  1  1  1  | 2  2  | 0
    sources   0  0  -1 | 1  -1 | -1     (target_sources: each target's training source, here a from source 0
                                         and b from source 1, for the loss per source; -1 where no target)
    cu_seqlens 0, 3, 5, 6                (example boundaries over the flattened batch; padding is a span)

Rows are padded to the longest row of the batch, not to max_seq_length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sftkit.data.template import IGNORE_INDEX


def collate(rows: Sequence[Sequence[dict]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """rows: per batch row, the examples (dicts with input_ids, labels and optionally source, else 0)
    packed into it."""
    width = max(sum(len(ex["input_ids"]) for ex in row) for row in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    targets = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    segment_ids = torch.zeros((batch, width), dtype=torch.long)
    target_sources = torch.full((batch, width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for s, example in enumerate(row, start=1):
            ids, labels = example["input_ids"], example["labels"]
            n = len(ids)
            input_ids[r, offset : offset + n] = torch.as_tensor(ids)
            targets[r, offset : offset + n - 1] = torch.as_tensor(labels[1:])
            position_ids[r, offset : offset + n] = torch.arange(n)
            segment_ids[r, offset : offset + n] = s
            target_sources[r, offset : offset + n - 1] = example.get("source", 0)
            offset += n
        position_ids[r, offset:] = torch.arange(width - offset)  # padding: its own segment, 0..k
    target_sources.masked_fill_(targets == IGNORE_INDEX, -1)
    boundaries = cu_seqlens([[len(ex["input_ids"]) for ex in row] for row in rows], width)
    return {
        "input_ids": input_ids,
        "targets": targets,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "cu_seqlens": boundaries,
        "target_sources": target_sources,
    }


def cu_seqlens(lengths_per_row: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """(spans + 1,) int32: start offsets of every example over the flattened (batch × width) tokens, then the total.

    Each row's padding (width − Σ lengths) is one more span, so padding attends only to padding.
    Varlen kernels read these instead of a seq × seq mask. Linear in the number of examples.
    """
    spans: list[int] = []
    for lengths in lengths_per_row:
        spans.extend(n for n in lengths if n > 0)
        if width > sum(lengths):
            spans.append(width - sum(lengths))
    return torch.tensor([0, *spans], dtype=torch.int32).cumsum(0, dtype=torch.int32)


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(batch, 1, seq, seq) boolean mask: True where query t may attend key s (s <= t, same segment).

    Padding (segment 0) attends causally to padding only, so no row is empty and sdpa stays finite.
    """
    seq = segment_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (batch, seq, seq)
    return (same & causal)[:, None, :, :]
