"""Tokenize normalised rows into `input_ids`/`labels`, apply the truncation policy, count what happened.

Runs through a batched `datasets.map`: the result is written to the `datasets` cache as Arrow and
read back memory-mapped, so host memory does not grow with the dataset; large datasets use several
processes, fresh ones per chunk of rows (chunked_map.py); a second run with the same data, tokenizer and
template reuses the cache. Cost: linear in tokens; the rows dropped are found with Arrow compute over one
string column, never as Python lists.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets.fingerprint import Hasher

from sftkit.data.chunked_map import map_in_chunks
from sftkit.data.formats import DataError
from sftkit.data.template import IGNORE_INDEX, TemplateError, assistant_spans, trained_tokens

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
    out = tokenize_batch({name: [value] for name, value in row.items()}, tokenizer, options)
    return {
        name: values[0].tolist() if isinstance(values[0], np.ndarray) else values[0] for name, values in out.items()
    }


def tokenize_batch(batch: dict[str, list], tokenizer: Any, options: TokenizeOptions) -> dict[str, list]:
    """`tokenize_row` over a batch of rows (column → values), for a batched `datasets.map`.

    Each conversation is rendered and its trained character spans found (template.py); then every text
    of the batch is tokenized in one call (the fast tokenizer's batch encode), and labels come from the
    token offsets against the spans, vectorised (`trained_tokens`).
    """
    texts, spans = [], []
    for index, messages in enumerate(batch["messages"]):
        if messages:
            text, trained = _conversation_spans(batch, index, tokenizer, options)
        else:
            text, trained = batch["text"][index], None
        texts.append(text)
        spans.append(trained)
    rows = [
        _row_figures(ids, offsets, trained, tokenizer, options)
        for (ids, offsets), trained in zip(_encode(texts, tokenizer), spans, strict=True)
    ]
    return {name: [row[name] for row in rows] for name in rows[0]} if rows else {}


def _encode(texts: list[str], tokenizer: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each text's token ids (tokens,) and character offsets (tokens, 2), int64, exactly as `tokenizer(texts,
    add_special_tokens=False, return_offsets_mapping=True)` gives them. A fast tokenizer set to neither truncate nor
    pad, with special tokens matched as transformers would, is asked directly: transformers' conversion of every
    encoding into lists (attention masks included) costs about a tenth of the encode. Each text's offsets become an
    array when it is reached: a batch's offsets held as Python tuples all at once cost twice as much to convert
    (their allocation, and the garbage collector's passes over them)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        backend is None
        or backend.truncation is not None
        or backend.padding is not None
        or backend.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False))
    ):
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        pairs: Iterable[tuple[Any, Any]] = zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
    else:
        pairs = ((encoding.ids, encoding.offsets) for encoding in backend.encode_batch(texts, add_special_tokens=False))
    for ids, offsets in pairs:
        flat = np.fromiter(itertools.chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets))
        yield np.fromiter(ids, dtype=np.int64, count=len(ids)), flat.reshape(-1, 2)


def _conversation_spans(
    batch: dict[str, list], index: int, tokenizer: Any, options: TokenizeOptions
) -> tuple[str, list[tuple[int, int]]]:
    """The rendering of row `index` and its trained spans; a template failure names the row."""
    try:
        return assistant_spans(
            batch["messages"][index],
            options.template,
            tokenizer,
            batch["tools"][index] if "tools" in batch else None,
            options.train_on_reasoning,
        )
    except TemplateError as err:
        source = batch["source"][index] if "source" in batch else "dataset"
        where = f"row {batch['source_row'][index] + 1}: " if "source_row" in batch else ""
        raise TemplateError(f"{source}: {where}{err}") from None


def _row_figures(
    tokens: np.ndarray,
    offsets: np.ndarray,
    spans: list[tuple[int, int]] | None,
    tokenizer: Any,
    options: TokenizeOptions,
) -> dict[str, Any]:
    """Labels, truncation and counts of one tokenized row (`_encode`'s tokens and offsets), tokens and labels as
    numpy arrays (Arrow takes them without a Python int per token). `spans` None: plain text, every token trained,
    BOS first when the tokenizer has one, EOS last."""
    if spans is None:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        tokens = np.concatenate([np.asarray(bos, dtype=np.int64), tokens, [tokenizer.eos_token_id]])
    if spans is not None and options.assistant_only_loss:
        trained = trained_tokens(offsets, spans)
        labels = np.where(trained, tokens, IGNORE_INDEX)
    else:
        trained, labels = np.ones(len(tokens), dtype=bool), tokens
    full_length = len(tokens)
    response_tokens = int(np.count_nonzero(trained))
    drop_reason = ""
    truncated = full_length > options.max_seq_length
    if truncated:
        if options.truncation == "error":
            drop_reason = f"error: {full_length} tokens > max_seq_length {options.max_seq_length}"
        elif options.truncation == "drop":
            drop_reason = "longer than max_seq_length"
        else:
            tokens, labels = tokens[: options.max_seq_length], labels[: options.max_seq_length]
            trained = trained[: options.max_seq_length]
    # The first label is never a target (nothing predicts it), so it does not count as trained.
    trained_count = int(np.count_nonzero(trained[1:]))
    if not drop_reason and not trained_count:
        drop_reason = "no trained tokens left after truncation" if truncated else "no trained tokens"
    return {
        "input_ids": tokens,
        "labels": labels,
        "length": len(tokens),
        "full_length": full_length,
        "prompt_tokens": full_length - response_tokens,
        "response_tokens": response_tokens,
        "trained_tokens": trained_count,
        "truncated": truncated,
        "drop_reason": drop_reason,
    }


@dataclass(frozen=True)
class RowTokenizer:
    """`tokenize_batch` for rows of one source (a list of normalised rows), as a picklable callable
    for tokenizing processes."""

    tokenizer: Any
    options: TokenizeOptions
    source: str  # named in errors

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, list]:
        columns = {name: [row[name] for row in rows] for name in rows[0]} if rows else {}
        return tokenize_batch({**columns, "source": [self.source] * len(rows)}, self.tokenizer, self.options)


def default_num_proc() -> int:
    """The CPU cores this process may use: tokenization is CPU-bound and runs one process per core."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class TokenizedData:
    dataset: (
        datasets.Dataset
    )  # input_ids, labels, length, full_length, prompt/response/trained_tokens, truncated, source
    dropped: dict[str, int]


# Rows per map batch: large enough to amortise the per-batch overhead, small enough that one batch of
# ~1,000-token conversations stays a few MB in each worker.
MAP_BATCH_SIZE = 256
# Rows per Arrow record batch written (~16 MB of tokens at ~1,000 tokens a row). Reading one scalar column
# (lengths, counts) maps at least a page, and the kernel's fault-around 64 KB, per record batch: larger
# record batches keep those reads to ~100 bytes a row.
WRITE_BATCH_SIZE = 1024


def tokenize_fingerprint(rows: datasets.Dataset, tokenizer: Any, options: TokenizeOptions) -> str:
    """The cache key of the tokenize map: the rows, the tokenizer, the options and the data code.

    `datasets` would pickle the whole tokenizer object to key the map (seconds per run and per
    process); a fast tokenizer is fully described by its JSON (vocabulary, merges, added and special
    tokens, normalizer, post-processor), which hashes in milliseconds.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    identity = (
        (backend.to_str(), type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id)
        if backend is not None
        else tokenizer
    )
    code = [path.read_text(encoding="utf-8") for path in sorted(Path(__file__).parent.glob("*.py"))]
    return Hasher.hash([rows._fingerprint, identity, asdict(options), code])


def tokenize_dataset(
    rows: datasets.Dataset, tokenizer: Any, options: TokenizeOptions, num_proc: int = 1, describe: str = "Tokenizing"
) -> TokenizedData:
    """Tokenize every row; drop (and count) rows that cannot be trained on; stop on `truncation: error`."""
    tokenized = map_in_chunks(
        rows,
        tokenize_batch,
        num_proc,
        describe,
        new_fingerprint=tokenize_fingerprint(rows, tokenizer, options),
        fn_kwargs={"tokenizer": tokenizer, "options": options},
        batched=True,
        batch_size=MAP_BATCH_SIZE,
        writer_batch_size=WRITE_BATCH_SIZE,
        remove_columns=[c for c in ("messages", "tools", "text") if c in rows.column_names],
    )
    # One Arrow column, counted with Arrow compute: no Python string per row.
    reasons = tokenized.select_columns(["drop_reason"]).with_format("arrow")[:]["drop_reason"]
    errors = np.flatnonzero(pc.starts_with(reasons, "error:").to_numpy(zero_copy_only=False))
    if len(errors):
        row = tokenized[int(errors[0])]
        raise DataError(
            f"{row.get('source', 'dataset')}: row {row['source_row'] + 1}: "
            f"{row['drop_reason'].removeprefix('error: ')}; "
            "raise max_seq_length, or set `truncation: truncate_right` or `truncation: drop`"
        )
    is_kept = pc.equal(reasons, "")
    kept = is_kept.to_numpy(zero_copy_only=False)
    dropped = {
        str(item["values"]): int(item["counts"])
        for item in pc.value_counts(pc.filter(reasons, pc.invert(is_kept))).to_pylist()
    }
    if not kept.all():
        tokenized = tokenized.select(np.flatnonzero(kept))
    return TokenizedData(dataset=tokenized.remove_columns("drop_reason"), dropped=dropped)
