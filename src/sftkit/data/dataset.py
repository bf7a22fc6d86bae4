"""From the config's data keys to tokenized train and eval sets (the whole data path before batching)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import datasets
import pyarrow as pa

from sftkit.config import DatasetSpec, SFTConfig
from sftkit.data.formats import DataError, LoadedSource, load_source
from sftkit.data.stream import sample_source
from sftkit.data.template import require_chat_template
from sftkit.data.tokenize import TokenizedData, TokenizeOptions, default_num_proc, tokenize_dataset

STREAMING_SAMPLE_ROWS = 1000  # rows of each source `data inspect` and `plan` read on a streaming config


@dataclass(frozen=True)
class DataOptions:
    train_sources: tuple[DatasetSpec, ...]
    eval_sources: tuple[tuple[str, DatasetSpec | None], ...]  # (label, source); None: held out of the train rows
    eval_split_ratio: float
    tokenize: TokenizeOptions
    system_prompt: str | None = None
    skip_bad_rows: bool = False
    num_proc: int = 1
    seed: int = 42
    sample_rows: int | None = None  # read only the first rows of each source (`data inspect` on streamed sources)
    sample_holdout: int = 0  # training rows held back for samples (when there is no eval data)

    @classmethod
    def from_config(
        cls, config: SFTConfig, template: str, sample_rows: int | None = None, training: bool = False
    ) -> DataOptions:
        """Streaming reads the training sources during the run: only the eval sets are prepared here
        (`data inspect` samples the first `sample_rows` of each). `training`: a run, which holds rows back
        for samples where it has no eval data (`data inspect` and `plan` show every row)."""
        return cls(
            train_sources=() if config.streaming and sample_rows is None else tuple(config.datasets),
            eval_sources=tuple(config.eval_sets),
            eval_split_ratio=config.eval_split_ratio,
            tokenize=TokenizeOptions(
                template=template,
                max_seq_length=config.max_seq_length,
                truncation=config.truncation,
                assistant_only_loss=config.assistant_only_loss,
                train_on_reasoning=config.train_on_reasoning,
            ),
            system_prompt=config.system_prompt,
            skip_bad_rows=config.skip_bad_rows,
            num_proc=config.dataset_num_proc or default_num_proc(),
            seed=config.seed,
            sample_rows=sample_rows,
            sample_holdout=config.sample_holdout
            if training and not config.has_eval and config.sample_prompts is None
            else 0,
        )


@dataclass
class PreparedData:
    train: TokenizedData | None  # None when the training sources are streamed
    eval_sets: dict[str, TokenizedData] = field(default_factory=dict)  # label ('' when unnamed) → eval set
    sources: list[LoadedSource] = field(default_factory=list)
    eval_rows: dict[str, datasets.Dataset] = field(default_factory=dict)  # label → its rows before tokenizing
    held_back: datasets.Dataset | None = None  # training rows kept out of training for samples (no eval data)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage: read, tokenize

    @property
    def sample_conversations(self) -> list[list[dict[str, str]]]:
        """Up to 16 conversations no step trains on, whose prompts samples complete: the first eval set's
        first rows, else the training rows held back for samples."""
        rows = next(iter(self.eval_rows.values()), self.held_back)
        return [m for m in rows.select(range(min(len(rows), 16)))["messages"] if m] if rows is not None else []

    @property
    def eval(self) -> TokenizedData | None:
        """The first eval set, where one is enough (its prompts seed the samples)."""
        return next(iter(self.eval_sets.values()), None)

    def tokenized_train(self) -> TokenizedData:
        """The training set, for readers of all of it (inspect, plan); streamed sources have none here."""
        if self.train is None:
            raise DataError(
                "the training sources are streamed, so no tokenized training set was prepared; "
                "prepare the first rows of each with sample_rows"
            )
        return self.train

    @property
    def skipped(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for source in self.sources:
            for reason, count in source.skipped.items():
                total[reason] = total.get(reason, 0) + count
        return total


def _load_all(specs: tuple[DatasetSpec, ...], options: DataOptions) -> tuple[datasets.Dataset, list[LoadedSource]]:
    if options.sample_rows is None:
        loaded = [load_source(spec, options.system_prompt, options.skip_bad_rows, options.num_proc) for spec in specs]
    else:
        loaded = [
            sample_source(spec, options.system_prompt, options.skip_bad_rows, options.sample_rows) for spec in specs
        ]
    # The source name of every row as one Arrow string array, not a Python list.
    parts = [s.dataset.add_column("source", pa.repeat(pa.scalar(s.name, pa.string()), len(s.dataset))) for s in loaded]
    return (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), loaded


def prepare_data(options: DataOptions, tokenizer: Any) -> PreparedData:
    """Load, normalise, split off eval, tokenize and mask. Raises DataError with file and row on bad input."""
    started = time.perf_counter()
    rows, sources = _load_all(options.train_sources, options) if options.train_sources else (None, [])
    eval_rows: dict[str, datasets.Dataset] = {}
    for label, spec in options.eval_sources:
        if spec is not None:
            eval_rows[label], eval_sources = _load_all((spec,), options)
            sources += eval_sources
    if options.eval_split_ratio > 0:
        if rows is None:
            raise DataError("eval_split_ratio cannot hold rows out of a stream; set eval_dataset instead")
        held_out = round(len(rows) * options.eval_split_ratio)
        if held_out == 0:
            raise DataError(
                f"eval_split_ratio = {options.eval_split_ratio} of {len(rows)} rows holds out no row; "
                f"raise eval_split_ratio to at least {1 / len(rows):.2g} or set eval_dataset"
            )
        split = rows.train_test_split(test_size=held_out, seed=options.seed, shuffle=True)
        rows, eval_rows[""] = split["train"], split["test"]
    held_back = None
    if options.sample_holdout and rows is not None and not eval_rows and len(rows) > 2 * options.sample_holdout:
        # the last rows, so the training rows keep their order and no index mapping is made
        kept = len(rows) - options.sample_holdout
        rows, held_back = rows.select(range(kept)), rows.select(range(kept, len(rows)))
    for source in sources:
        require_chat_template(options.tokenize.template, source.format, source.name, tokenizer)
    read_done = time.perf_counter()
    train = (
        tokenize_dataset(rows, tokenizer, options.tokenize, options.num_proc, "Tokenizing train")
        if rows is not None
        else None
    )
    if train is not None and len(train.dataset) == 0:
        files = ", ".join(spec.path for spec in options.train_sources)
        raise DataError(
            f"{files}: no training example left after filtering ({train.dropped}) with max_seq_length = "
            f"{options.tokenize.max_seq_length} and truncation = {options.tokenize.truncation!r}; raise "
            "max_seq_length, set `truncation: truncate_right`, or check the assistant turns of your data"
        )
    evaluations = {}
    for label, held_out_rows in eval_rows.items():
        name = f"eval set {label!r}" if label else "the eval set"
        evaluations[label] = tokenize_dataset(
            held_out_rows, tokenizer, options.tokenize, options.num_proc, f"Tokenizing {name}"
        )
        if len(evaluations[label].dataset) == 0:
            raise DataError(
                f"{name} is empty after filtering ({evaluations[label].dropped}); "
                "check eval_dataset / eval_split_ratio and max_seq_length"
            )
    seconds = {"read": read_done - started, "tokenize": time.perf_counter() - read_done}
    return PreparedData(train, evaluations, sources, eval_rows, held_back, seconds)
