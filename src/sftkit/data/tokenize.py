"""Tokenize normalised rows into `input_ids`/`labels`, apply the truncation policy, count what happened.

Runs through `datasets.map`, so large datasets use several processes and a second run with the
same data, tokenizer and template reuses the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets

from sftkit.data.formats import DataError
from sftkit.data.template import IGNORE_INDEX, TemplateError, tokenize_conversation, tokenize_text

TRUNCATION_POLICIES = ("truncate_right", "drop", "error")


@dataclass(frozen=True)
class TokenizeOptions:
    template: str
    max_seq_length: int
    truncation: str = "truncate_right"
    assistant_only_loss: bool = True
    train_on_reasoning: bool = True


def tokenize_row(row: dict[str, Any], tokenizer: Any, options: TokenizeOptions) -> dict[str, Any]:
    """One normalised row → tokens, labels and the figures `data inspect` reports.

    `drop_reason` is empty for a row that is trained on; otherwise it says why not, and the row is
    removed and counted by the caller (never silently).
    """
    if row["messages"]:
        try:
            encoded = tokenize_conversation(row["messages"], options.template, tokenizer, options.assistant_only_loss,
                                            row.get("tools"), options.train_on_reasoning)
        except TemplateError as err:  # say which row the template failed on
            where = f"row {row['source_row'] + 1}: " if "source_row" in row else ""
            raise TemplateError(f"{row.get('source', 'dataset')}: {where}{err}") from None
    else:
        encoded = tokenize_text(row["text"], tokenizer)
    input_ids, labels = encoded["input_ids"], encoded["labels"]
    full_length = len(input_ids)
    response_tokens = sum(label != IGNORE_INDEX for label in labels)
    drop_reason = ""
    truncated = full_length > options.max_seq_length
    if truncated:
        if options.truncation == "error":
            drop_reason = f"error: {full_length} tokens > max_seq_length {options.max_seq_length}"
        elif options.truncation == "drop":
            drop_reason = "longer than max_seq_length"
        else:
            input_ids, labels = input_ids[: options.max_seq_length], labels[: options.max_seq_length]
    # The first label is never a target (nothing predicts it), so it does not count as trained.
    if not drop_reason and not any(label != IGNORE_INDEX for label in labels[1:]):
        drop_reason = "no trained tokens left after truncation" if truncated else "no trained tokens"
    return {
        "input_ids": input_ids,
        "labels": labels,
        "length": len(input_ids),
        "full_length": full_length,
        "prompt_tokens": full_length - response_tokens,
        "response_tokens": response_tokens,
        "truncated": truncated,
        "drop_reason": drop_reason,
    }


@dataclass
class TokenizedData:
    dataset: datasets.Dataset  # input_ids, labels, length, full_length, prompt/response_tokens, truncated, source
    dropped: dict[str, int]


def tokenize_dataset(rows: datasets.Dataset, tokenizer: Any, options: TokenizeOptions,
                     num_proc: int = 1, describe: str = "Tokenizing") -> TokenizedData:
    """Tokenize every row; drop (and count) rows that cannot be trained on; stop on `truncation: error`."""
    tokenized = rows.map(
        tokenize_row, fn_kwargs={"tokenizer": tokenizer, "options": options},
        remove_columns=[c for c in ("messages", "tools", "text") if c in rows.column_names],
        num_proc=num_proc if num_proc > 1 and len(rows) > 1000 else None, desc=describe)
    reasons = tokenized["drop_reason"]
    dropped: dict[str, int] = {}
    keep: list[int] = []
    for index, reason in enumerate(reasons):
        if not reason:
            keep.append(index)
            continue
        if reason.startswith("error:"):
            row = tokenized[index]
            raise DataError(
                f"{row.get('source', 'dataset')}: row {row['source_row'] + 1}: {reason.removeprefix('error: ')}; "
                "raise max_seq_length, or set `truncation: truncate_right` or `truncation: drop`")
        dropped[reason] = dropped.get(reason, 0) + 1
    if len(keep) < len(tokenized):
        tokenized = tokenized.select(keep)
    return TokenizedData(dataset=tokenized.remove_columns("drop_reason"), dropped=dropped)
