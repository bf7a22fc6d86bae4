"""`datasets.map` over many rows in several processes, in chunks that each get fresh processes.

A map process reads its rows from the memory-mapped input: every page it reads stays mapped, and counted in
its RSS and PSS, until the process exits, and its Python heap only grows. One pool over the whole dataset
therefore holds memory in proportion to the rows (the input of `data inspect` at 200k conversations: about
0.7 GiB more than at 20k). A fresh pool per chunk of `ROWS_PER_PROCESS` rows per process bounds it, for the
cost of starting the processes once per chunk (about a second against a chunk's tens of seconds).

Cost: the work of one map; peak memory flat in rows. The output is the chunks' cache files, concatenated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets

ROWS_PER_PROCESS = 10_000
SERIAL_BELOW = 1000  # rows: fewer are mapped in this process (starting processes would cost more)


@dataclass(frozen=True)
class _Shifted:
    """`function(row, index)` with the index counted from the start of the whole dataset, not the chunk's."""

    function: Callable[..., Any]
    start: int

    def __call__(self, row: Any, index: Any, **kwargs: Any) -> Any:
        shifted = index + self.start if isinstance(index, int) else [i + self.start for i in index]
        return self.function(row, shifted, **kwargs)


def map_in_chunks(
    dataset: datasets.Dataset,
    function: Callable[..., Any],
    num_proc: int,
    desc: str,
    new_fingerprint: str | None = None,
    with_indices: bool = False,
    rows_per_process: int | None = None,
    **map_kwargs: Any,
) -> datasets.Dataset:
    """`dataset.map(function, num_proc=..., **map_kwargs)`, the same rows out, in chunks of
    `rows_per_process × num_proc` rows (default `ROWS_PER_PROCESS`) with fresh processes each (one map when it
    fits in one chunk)."""
    processes = num_proc if num_proc > 1 and len(dataset) > SERIAL_BELOW else None
    chunk = (rows_per_process or ROWS_PER_PROCESS) * (processes or 1)
    if processes is None or len(dataset) <= chunk:
        return dataset.map(
            function,
            num_proc=processes,
            desc=desc,
            new_fingerprint=new_fingerprint,
            with_indices=with_indices,
            **map_kwargs,
        )
    starts = range(0, len(dataset), chunk)
    parts = [
        dataset.select(range(start, min(start + chunk, len(dataset)))).map(
            _Shifted(function, start) if with_indices else function,
            num_proc=processes,
            desc=f"{desc} ({number}/{len(starts)})",
            with_indices=with_indices,
            new_fingerprint=f"{new_fingerprint}-{start}" if new_fingerprint else None,
            **map_kwargs,
        )
        for number, start in enumerate(starts, start=1)
    ]
    return datasets.concatenate_datasets(parts)
