"""Where an online feed's examples come from: tokenized Arrow sources, or streams tokenized on the fly.

A source hands out one example at a time (`next`), says when its pass is over (None), starts the next
pass (`restart`), and has a position that a checkpoint saves (`state`, `load`): a resumed source hands
out exactly the examples the uninterrupted one would have.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import Any, Protocol

import numpy as np

from sftkit.data.examples import Example, TrainingExamples, make_example
from sftkit.data.formats import DataError

Exchange = Callable[[Any], list[Any]]  # a value from this process → the values of every process, by rank


class ExampleSource(Protocol):
    name: str
    passes: int  # completed passes over the source
    given: int  # examples handed out in this pass

    def next(self) -> Example | None: ...  # None: this pass is over
    def restart(self) -> None: ...
    def state(self) -> tuple[dict, list[Example]]: ...  # (position, examples read ahead but not yet taken)
    def load(self, state: dict, ahead: list[Example]) -> None: ...
    def close(self) -> None: ...


class ArrowSource:
    """One source's examples in the tokenized Arrow dataset, in a seeded order per pass.

    Reads `chunk` rows at a time; its position is a count, so resuming costs nothing.
    """

    def __init__(
        self, examples: TrainingExamples, ids: np.ndarray, index: int, name: str, seed: int, chunk: int = 256
    ) -> None:
        self.examples, self.ids, self.index, self.name, self.seed, self.chunk = examples, ids, index, name, seed, chunk
        self.passes, self.given = 0, 0
        self._order = self._pass_order()
        self._ahead: list[Example] = []

    def _pass_order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.index, self.passes]).permutation(self.ids)

    def next(self) -> Example | None:
        if not self._ahead:
            wanted = self._order[self.given : self.given + self.chunk]
            if not len(wanted):
                return None
            self._ahead = self.examples.take(wanted)
        self.given += 1
        return self._ahead.pop(0)

    def restart(self) -> None:
        self.passes, self.given, self._ahead = self.passes + 1, 0, []
        self._order = self._pass_order()

    def state(self) -> tuple[dict, list[Example]]:
        return {"passes": self.passes, "given": self.given}, []  # read-ahead is read again on resume

    def load(self, state: dict, ahead: list[Example]) -> None:
        self.passes, self.given, self._ahead = state["passes"], state["given"], []
        self._order = self._pass_order()

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- streams


def encode_rows(tokenize: Callable[[list[dict]], dict[str, list]], rows: list[dict], path: str) -> dict:
    """Rows tokenized in one batch: {"rows": [...]}, or {"error": ...} that every process raises together
    (never one process alone)."""
    if not rows:
        return {"rows": []}
    try:
        encoded = tokenize(rows)
    except (DataError, ValueError) as err:
        return {"error": str(err)}
    out = []
    for row, ids, labels, reason, trained in zip(
        rows, encoded["input_ids"], encoded["labels"], encoded["drop_reason"], encoded["trained_tokens"], strict=True
    ):
        if reason.startswith("error:"):
            return {
                "error": f"{path}: row {row['source_row'] + 1}: {reason.removeprefix('error: ')}; "
                "raise max_seq_length, or set `truncation: truncate_right` or `truncation: drop`"
            }
        out.append(
            {
                "input_ids": ids.tolist(),
                "labels": labels.tolist(),
                "drop_reason": reason,
                "source_row": row["source_row"],
                "trained": trained,
            }
        )
    return {"rows": out}


_worker_tokenize: Callable[[list[dict]], dict[str, list]] | None = None


def _start_worker(tokenize: Callable[[list[dict]], dict[str, list]]) -> None:
    global _worker_tokenize
    _worker_tokenize = tokenize


def _encode_in_worker(rows: list[dict], path: str) -> dict:
    assert _worker_tokenize is not None  # set by the pool's initializer
    return encode_rows(_worker_tokenize, rows, path)


class StreamSource:
    """A source read as a stream (`data.stream.SourceStream`), tokenized on the fly.

    Every process reads the same rows; each tokenizes a disjoint share (rows rank, rank + world, ...)
    and the shares are exchanged, so all processes hold the same examples in the same order at
    1/world of the tokenizing cost. With `workers` > 1 the share is tokenized by a pool of processes,
    `depth` chunks ahead of training, so tokenizing overlaps the steps instead of stalling them.
    Rows the tokenizer rejects are counted (`dropped`), never silently.

    Position: the stream's position before the oldest chunk not yet taken in, plus the examples of
    the chunk being handed out; chunks still in the pool are read again on resume.
    """

    def __init__(
        self,
        stream: Any,
        index: int,
        tokenize: Callable[[list[dict]], dict[str, list]],
        exchange: Exchange,
        rank: int = 0,
        world: int = 1,
        workers: int = 1,
        chunk: int = 64,
    ) -> None:
        self.stream, self.index, self.name = stream, index, stream.name
        self.tokenize, self.exchange, self.rank, self.world, self.chunk = tokenize, exchange, rank, world, chunk
        self.workers, self.depth = workers, max(2, 2 * workers)
        self.passes, self.given = 0, 0
        self.dropped: dict[str, int] = {}
        self._pool: Any = None
        self._rows = iter(stream)
        self._pending: deque[tuple[dict, int, Any]] = deque()  # (stream position before, rows, tokens of my share)
        self._pass_read = False  # every row of this pass has gone into a chunk
        self._ahead: list[Example] = []

    def next(self) -> Example | None:
        while not self._ahead:
            self._read_ahead()
            if not self._pending:
                return None
            _, count, result = self._pending.popleft()
            shares = self.exchange(result.get() if self._pool is not None else result)
            for share in shares:
                if "error" in share:
                    raise DataError(share["error"])
            for i in range(count):  # back into the stream's order
                encoded = shares[i % self.world]["rows"][i // self.world]
                if encoded["drop_reason"]:
                    self.dropped[encoded["drop_reason"]] = self.dropped.get(encoded["drop_reason"], 0) + 1
                else:
                    self._ahead.append(
                        make_example(
                            encoded["input_ids"],
                            encoded["labels"],
                            self.index,
                            encoded["source_row"],
                            encoded["trained"],
                        )
                    )
        self.given += 1
        return self._ahead.pop(0)

    def _read_ahead(self) -> None:
        """Read rows into chunks and hand this process's share to the tokenizer, up to `depth` chunks ahead."""
        while not self._pass_read and len(self._pending) < (self.depth if self.workers > 1 else 1):
            before = self.stream.state_dict()
            rows = list(islice(self._rows, self.chunk * self.world))
            if not rows:
                self._pass_read = True
                break
            mine = rows[self.rank :: self.world]
            if self.workers > 1:
                if self._pool is None:  # forked as `datasets.map` does: the tokenizer and libraries are shared
                    # pages, where a spawned process would import torch and the rest again (~0.4 GiB each)
                    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
                    self._pool = multiprocessing.get_context(method).Pool(
                        self.workers, initializer=_start_worker, initargs=(self.tokenize,)
                    )
                result: Any = self._pool.apply_async(_encode_in_worker, (mine, self.stream.path))
            else:
                result = encode_rows(self.tokenize, mine, self.stream.path)
            self._pending.append((before, len(rows), result))

    def restart(self) -> None:
        self.stream.restart()
        self.passes, self.given, self._ahead = self.passes + 1, 0, []
        self._rows, self._pending, self._pass_read = iter(self.stream), deque(), False

    def state(self) -> tuple[dict, list[Example]]:
        position = self._pending[0][0] if self._pending else self.stream.state_dict()
        return {"passes": self.passes, "given": self.given, "stream": position, "dropped": dict(self.dropped)}, list(
            self._ahead
        )

    def load(self, state: dict, ahead: list[Example]) -> None:
        self.stream.load_state_dict(state["stream"])
        self.passes, self.given, self.dropped = state["passes"], state["given"], dict(state["dropped"])
        self._rows, self._pending, self._pass_read, self._ahead = iter(self.stream), deque(), False, list(ahead)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None
