"""Tokenized examples as training reads them: tokens in Arrow, per-example figures in numpy.

The token rows stay in the `datasets` cache files, memory-mapped: every process of a run maps the
same files, and the OS keeps one copy of the pages that are read. What the loop needs for every
example at once (tokens, trained tokens, source row) is a few numpy integers per example, read
column by column from Arrow. A micro-batch reads only its own rows when it is collated.

Host memory: 8 bytes per example per figure, plus the pages of the rows being read; it does not
grow with the number of tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sftkit.data.packing import Packs, balanced
from sftkit.data.template import IGNORE_INDEX

Example = dict[str, Any]  # input_ids, labels, source (index), source_row (0-based), trained


def make_example(
    input_ids: list[int], labels: list[int], source: int, source_row: int, trained: int | None = None
) -> Example:
    """One example as the collator and the loop read it."""
    if trained is None:  # the first label is never a target (nothing predicts it), so it does not count
        trained = sum(label != IGNORE_INDEX for label in labels[1:])
    return {"input_ids": input_ids, "labels": labels, "source": source, "source_row": source_row, "trained": trained}


def column(dataset: datasets.Dataset, name: str) -> np.ndarray:
    """One scalar column as a numpy array, read straight from Arrow (the dataset's row selection applied)."""
    table = dataset.select_columns([name]).with_format("arrow")[:]
    return table[name].to_numpy()


@dataclass(frozen=True)
class TrainingExamples:
    """The examples of one split, with the figures the loop needs for every example as numpy arrays."""

    tokens: datasets.Dataset  # input_ids and labels only, memory-mapped Arrow
    lengths: np.ndarray  # (examples,) tokens per example
    trained: np.ndarray  # (examples,) trained targets per example (labels after the first)
    source_rows: np.ndarray  # (examples,) 0-based row in the source file
    sources: np.ndarray  # (examples,) index of the example's source

    @classmethod
    def from_dataset(cls, dataset: datasets.Dataset, source_paths: list[str] | None = None) -> TrainingExamples:
        """`source_paths`: the sources in order, as the `source` column names them; None: all one source."""
        if source_paths and "source" in dataset.column_names:
            paths = dataset.select_columns(["source"]).with_format("arrow")[:]["source"]
            sources = pc.index_in(paths, value_set=pa.array(source_paths)).to_numpy(zero_copy_only=False)
        else:
            sources = np.zeros(len(dataset), np.int64)
        return cls(
            tokens=dataset.select_columns(["input_ids", "labels"]),
            lengths=column(dataset, "length").astype(np.int64),
            trained=column(dataset, "trained_tokens").astype(np.int64),
            source_rows=column(dataset, "source_row").astype(np.int64),
            sources=np.asarray(sources, np.int64),
        )

    def __len__(self) -> int:
        return len(self.lengths)

    def sequences(self, max_seq_length: int, packing: bool, progress: bool = False) -> Packs:
        """The model's rows: balanced packs of whole examples, or one example each."""
        return balanced(self.lengths, max_seq_length, progress) if packing else Packs.one_per_example(len(self))

    def read(self, sequences: Packs, sequence_ids: Sequence[int]) -> list[list[Example]]:
        """The examples of some sequences, grouped per sequence, in one Arrow read of just those rows."""
        sizes = np.diff(sequences.offsets)[list(sequence_ids)]
        wanted = sequences.examples_of(sequence_ids)
        examples = self.take(wanted)
        starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        return [examples[start:end] for start, end in pairwise(starts)]

    def take(self, ids: np.ndarray) -> list[Example]:
        """Some examples by index, in one Arrow read of just those rows."""
        rows = self.tokens[ids.tolist()]  # {"input_ids": [...], "labels": [...]}, one entry per example
        return [
            make_example(tokens, labels, source, row, trained)
            for tokens, labels, source, row, trained in zip(
                rows["input_ids"],
                rows["labels"],
                self.sources[ids].tolist(),
                self.source_rows[ids].tolist(),
                self.trained[ids].tolist(),
                strict=True,
            )
        ]
