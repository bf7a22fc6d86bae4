"""The examples a run trains on, step by step: which ones, packed how, on which process.

Two feeds behind one call, `draw(step) -> Draw`:

- `PlannedFeed`: the whole tokenized dataset is known. Packs are planned once and every epoch is a
  seeded permutation of them: a pure function of (seed, step), with nothing to save.
- `OnlineFeed`: examples arrive from sources, either streams tokenized on the fly or tokenized
  Arrow sources mixed by trained-token weights. They gather in a buffer of `packing_buffer`
  examples, which is packed (the same balanced best-fit-decreasing), shuffled and queued; a step
  takes the sequences it needs from the queue:

      sources ──(mixer: next source by trained tokens)──▶ buffer ──(pack, shuffle)──▶ queue ──▶ steps

  With weights, the shuffled packs of a buffer are queued in the order that keeps every prefix of
  steps near the target shares (`closest_to_shares`): a pack mixes sources unevenly, so a plain
  shuffle would let the first steps drift 10+ points from the target; this keeps them within ~1.

  Its state (each source's position and look-ahead, the mixer's counts, the queue) goes into every
  checkpoint, so a resumed run draws the very same batches. Host memory: the buffer and the queue,
  independent of the dataset's size.

With one source read in file order and a buffer of exactly one pass, `OnlineFeed` forms the packs
and the per-pass order of `PlannedFeed`: streaming a dataset trains like tokenizing it first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from sftkit.data.examples import Example, TrainingExamples, make_example
from sftkit.data.formats import DataError
from sftkit.data.mixture import TokenMixer
from sftkit.data.packing import Packs, balanced
from sftkit.train.batches import BatchPlan, rank_share
from sftkit.train.sources import ExampleSource


@dataclass
class Draw:
    """What one optimizer step trains on: this process's micro-batches, and figures over every process's share."""

    micro_batches: list[tuple[list[list[Example]], bool]]  # (per row its examples, counts); a short last step
    # gives a process a stand-in micro-batch that does not count (its targets are ignored)
    trained: int  # trained targets of the whole step (all processes)
    tokens: int
    source_trained: np.ndarray  # (sources,) trained targets per source
    rows: list[int]  # 1-based source rows of the step's examples, for spike reports


def _mine(group: list, rank: int, world: int, read: Callable[[Any], list[list[Example]]]) -> list:
    """This process's share of a step's micro-batches, read; an empty slot becomes the first
    micro-batch, not counted, so every process runs the same number of backward passes."""
    return [
        (read(micro), True) if micro is not None else (read(group[0]), False)
        for micro in rank_share(group, rank, world)
    ]


class Feed(Protocol):
    sources: list[str]

    def draw(self, step: int) -> Draw | None: ...
    def epoch_of(self, step: int) -> float: ...
    def state_for(self, step: int) -> tuple[dict, dict[str, torch.Tensor]] | None: ...
    def load_state(self, saved: tuple[dict, dict[str, torch.Tensor]] | None) -> None: ...
    def close(self) -> None: ...


# --------------------------------------------------------------------------- planned (offline, concatenated)


@dataclass
class PlannedFeed:
    """Every tokenized example known up front: packs planned once, epochs as seeded permutations."""

    examples: TrainingExamples
    sequences: Packs
    plan: BatchPlan
    rank: int
    sources: list[str]

    def draw(self, step: int) -> Draw:
        """Figures from the numpy columns; only this process's micro-batches are read from Arrow."""
        group = self.plan.step_micro_batches(step)
        ids = self.sequences.examples_of([s for micro in group for s in micro])
        examples = self.examples
        return Draw(
            micro_batches=_mine(
                group, self.rank, self.plan.world_size, lambda micro: examples.read(self.sequences, micro)
            ),
            trained=int(examples.trained[ids].sum()),
            tokens=int(examples.lengths[ids].sum()),
            source_trained=np.bincount(
                examples.sources[ids], weights=examples.trained[ids], minlength=len(self.sources)
            ).astype(np.int64),
            rows=sorted((examples.source_rows[ids] + 1).tolist()),
        )

    def epoch_of(self, step: int) -> float:
        return self.plan.epoch_of(step)

    def state_for(self, step: int) -> None:
        return None  # the order is a pure function of (seed, step)

    def load_state(self, saved: tuple[dict, dict[str, torch.Tensor]] | None) -> None:
        pass  # nothing was saved: the step is enough

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- the online feed


@dataclass(frozen=True)
class OnlineOptions:
    capacity: int  # max_seq_length
    packing: bool
    buffer: int  # examples per packing round
    micro_batch_size: int
    accumulation: int
    world_size: int
    rank: int
    seed: int
    on_exhausted: str  # repeat | stop
    weights: tuple[float, ...] | None  # trained-token shares; None: take turns by rows


@dataclass
class OnlineFeed:
    """Examples from sources, mixed, packed per buffer and queued; see the module docstring."""

    sources_in: list[ExampleSource]
    options: OnlineOptions
    tell: Callable[[str], None] = print
    queue: list[list[Example]] = field(default_factory=list)  # packed sequences not yet trained on
    emitted: list[int] = field(default_factory=list)  # trained tokens per source of the sequences queued so far
    refills: int = 0
    ended: bool = False
    next_step: int = 0
    _snapshot: dict | None = None

    def __post_init__(self) -> None:
        weights = self.options.weights or (1.0,) * len(self.sources_in)
        self.mixer = TokenMixer(weights)
        self.sources = [source.name for source in self.sources_in]
        self.emitted = self.emitted or [0] * len(self.sources_in)

    # ---- drawing steps

    def draw(self, step: int) -> Draw | None:
        """The micro-batches of `step`; None once the data has run out (`on_exhausted: stop`)."""
        if step != self.next_step:
            raise ValueError(f"an online feed is read step after step: asked for {step}, next is {self.next_step}")
        self._snapshot = self._capture()
        options = self.options
        needed = options.micro_batch_size * options.accumulation * options.world_size
        while len(self.queue) < needed and not self.ended:
            self._refill()
        if not self.queue:
            return None
        taken, self.queue = self.queue[:needed], self.queue[needed:]
        self.next_step += 1
        size = options.micro_batch_size
        group = [taken[i : i + size] for i in range(0, len(taken), size)]
        examples = [example for sequence in taken for example in sequence]
        trained = np.array([example["trained"] for example in examples], np.int64)
        sources = np.array([example["source"] for example in examples], np.int64)
        return Draw(
            micro_batches=_mine(group, options.rank, options.world_size, lambda micro: micro),
            trained=int(trained.sum()),
            tokens=sum(len(example["input_ids"]) for example in examples),
            source_trained=np.bincount(sources, weights=trained, minlength=len(self.sources)).astype(np.int64),
            rows=sorted(example["source_row"] + 1 for example in examples),
        )

    def prime(self) -> None:
        """Fill the queue now (the first buffer), e.g. to report on the examples before training."""
        if not self.queue and not self.ended:
            self._refill()

    def _refill(self) -> None:
        """Gather up to `buffer` examples through the mixer, pack them, queue the packs in a seeded order."""
        buffer: list[Example] = []
        while len(buffer) < self.options.buffer and not self.ended:
            index = self.mixer.pick()
            source = self.sources_in[index]
            example = source.next()
            if example is None:
                if self.options.on_exhausted == "stop":
                    self.tell(
                        f"{source.name} ran out after {source.passes + 1} pass(es); the run stops when the "
                        "examples already read are trained on (on_exhausted: stop)"
                    )
                    self.ended = True
                    break
                if not source.given:  # a whole pass without an example: repeating would loop forever
                    raise DataError(
                        f"{source.name}: no example to train on (every row was dropped); check the data "
                        "and max_seq_length"
                    )
                source.restart()
                self.tell(f"{source.name} ran out; reading it again, pass {source.passes + 1} (on_exhausted: repeat)")
                continue
            self.mixer.record(index, example["trained"] if self.options.weights else 1)
            buffer.append(example)
        if not buffer:
            self.ended = True
            return
        lengths = np.array([len(example["input_ids"]) for example in buffer], np.int64)
        packs = buffer_packs(lengths, self.options.capacity, self.options.packing, self.options.seed + self.refills)
        sequences = [[buffer[i] for i in pack] for pack in packs]
        if self.options.weights:  # the trained tokens of every prefix of steps, not just of the buffer, near the target
            trained = np.zeros((len(sequences), len(self.sources)), np.int64)  # (sequences, sources)
            for row, sequence in enumerate(sequences):
                for example in sequence:
                    trained[row, example["source"]] += example["trained"]
            order = closest_to_shares(trained, self.mixer.shares, np.asarray(self.emitted))
            sequences = [sequences[i] for i in order]
            self.emitted = (np.asarray(self.emitted) + trained.sum(0)).tolist()
        self.queue.extend(sequences)
        self.refills += 1

    def epoch_of(self, step: int) -> float:
        """Completed passes over the most-read source (a stream has no known length to divide by)."""
        return float(max(source.passes for source in self.sources_in))

    # ---- state

    def state_for(self, step: int) -> tuple[dict, dict[str, torch.Tensor]]:
        """The state at the start of `step`: now, or before the step being drawn (a save mid-step)."""
        if step == self.next_step:
            return self._serialise(self._capture())
        if step == self.next_step - 1 and self._snapshot is not None:
            return self._serialise(self._snapshot)
        raise ValueError(f"no feed state for step {step} (next step {self.next_step})")

    def _capture(self) -> dict:
        """The state by reference (examples are never changed once made): cheap enough for every step."""
        return {
            "sources": [source.state() for source in self.sources_in],
            "queue": list(self.queue),
            "mixer": self.mixer.state_dict(),
            "emitted": list(self.emitted),
            "refills": self.refills,
            "ended": self.ended,
            "next_step": self.next_step,
        }

    def _serialise(self, captured: dict) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able positions, tensors of every example held: the queue and the sources' read-ahead)."""
        held: list[Example] = []

        def keep(examples: Sequence[Example]) -> list[int]:
            held.extend(examples)
            return list(range(len(held) - len(examples), len(held)))

        sources = [{"position": position, "ahead": keep(ahead)} for position, ahead in captured["sources"]]
        queue = [keep(sequence) for sequence in captured["queue"]]
        plain = {**captured, "sources": sources, "queue": queue, "names": self.sources}
        return plain, examples_to_tensors(held)

    def load_state(self, saved: tuple[dict, dict[str, torch.Tensor]] | None) -> None:
        if saved is None:
            raise DataError(
                "the checkpoint holds no data position (it was written by a run that did not stream or "
                "mix its data); resume with the same data settings, or start a new output_dir"
            )
        state, tensors = saved
        if state["names"] != self.sources:
            raise DataError(f"the checkpoint's data sources {state['names']} are not this run's {self.sources}")
        held = examples_from_tensors(tensors)
        for source, position in zip(self.sources_in, state["sources"], strict=True):
            source.load(position["position"], [held[i] for i in position["ahead"]])
        self.queue = [[held[i] for i in sequence] for sequence in state["queue"]]
        self.mixer.load_state_dict(state["mixer"])
        self.emitted = list(state["emitted"])
        self.refills, self.ended, self.next_step = state["refills"], state["ended"], state["next_step"]

    def close(self) -> None:
        """Stop the sources' tokenizing processes."""
        for source in self.sources_in:
            source.close()


def buffer_packs(lengths: np.ndarray, capacity: int, packing: bool, seed: int) -> Packs:
    """One buffer's sequences in training order: balanced packs (or one example each), shuffled with
    `seed`, as an offline epoch shuffles its packs."""
    packs = balanced(lengths, capacity) if packing else Packs.one_per_example(len(lengths))
    order = np.random.default_rng(seed).permutation(len(packs))
    return Packs.from_lists([packs[int(p)] for p in order])


def closest_to_shares(trained: np.ndarray, shares: np.ndarray, emitted: np.ndarray, window: int = 64) -> np.ndarray:
    """An order of a buffer's shuffled sequences that keeps every prefix near the target mixture.

    trained: (sequences, sources) trained tokens, in shuffled order; emitted: (sources,) before them.
    The next sequence is, among the next `window` in shuffled order, the one after which the running
    shares are closest (L1) to `shares`; ties keep the shuffled order. O(sequences × window × sources).
    """
    taken = emitted.astype(np.float64)
    left = list(range(len(trained)))
    order = []
    while left:
        candidates = np.asarray(left[:window])
        totals = taken + trained[candidates]  # (candidates, sources)
        deviation = np.abs(totals / np.maximum(totals.sum(1, keepdims=True), 1) - shares).sum(1)
        best = int(np.argmin(deviation))
        order.append(int(candidates[best]))
        taken += trained[candidates[best]]
        del left[best]
    return np.asarray(order, np.int64)


def examples_to_tensors(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """Examples as flat int64 tensors plus lengths: safetensors holds them exactly, without pickle."""
    lengths = [len(example["input_ids"]) for example in examples]
    flat = lambda key: [value for example in examples for value in example[key]]  # noqa: E731
    return {
        "input_ids": torch.tensor(flat("input_ids"), dtype=torch.int64),
        "labels": torch.tensor(flat("labels"), dtype=torch.int64),
        "lengths": torch.tensor(lengths, dtype=torch.int64),
        "source": torch.tensor([example["source"] for example in examples], dtype=torch.int64),
        "source_row": torch.tensor([example["source_row"] for example in examples], dtype=torch.int64),
    }


def examples_from_tensors(tensors: dict[str, torch.Tensor]) -> list[Example]:
    if not tensors or not len(tensors["lengths"]):
        return []
    ends = tensors["lengths"].cumsum(0).tolist()
    starts = [0, *ends[:-1]]
    ids, labels = tensors["input_ids"].tolist(), tensors["labels"].tolist()
    return [
        make_example(ids[s:e], labels[s:e], int(source), int(row))
        for s, e, source, row in zip(
            starts, ends, tensors["source"].tolist(), tensors["source_row"].tolist(), strict=True
        )
    ]
