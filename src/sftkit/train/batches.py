"""Which sequences go into which micro-batch, on which process, at which optimizer step.

The order is a pure function of (seed, epoch, step): no data-loader state to save, so a resumed run
sees exactly the batches the uninterrupted run would have seen, and 2 processes × GA 2 see exactly
the micro-batches of 1 process × GA 4.

    epoch e: shuffle sequences with seed+e → micro-batches of `micro` sequences
             → optimizer steps of `ga × world` micro-batches → rank r takes every world-th one
"""

from __future__ import annotations

import math
from collections.abc import Sized
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def rank_share(group: list[T], rank: int, world: int) -> list[T | None]:
    """This process's micro-batches of a step: every world-th one from `rank`. Every process gets the
    same count (None = a zero-loss stand-in) so DDP's gradient all-reduce stays in step on a short last step."""
    mine: list[T | None] = list(group[rank::world])
    return mine + [None] * (math.ceil(len(group) / world) - len(mine))


@dataclass(frozen=True)
class BatchPlan:
    """sequences: the training sequences (packs, or one example each); only their count matters here.

    One epoch's order is one numpy permutation (8 bytes per sequence); a step's micro-batches are
    sliced out of it as small lists.
    """

    sequences: Sized
    micro_batch_size: int
    accumulation: int
    world_size: int
    seed: int
    shuffle: bool = True
    _epochs: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(len(self.sequences) / self.micro_batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_batches_per_epoch / (self.accumulation * self.world_size))

    def total_steps(self, num_train_epochs: float, max_steps: int) -> int:
        return max_steps if max_steps > 0 else max(1, math.ceil(num_train_epochs * self.steps_per_epoch))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The sequence indices of one epoch in training order (shuffled once per epoch, not per step)."""
        if epoch not in self._epochs:
            self._epochs.clear()  # one epoch at a time: steps walk forward
            count = len(self.sequences)
            self._epochs[epoch] = (
                np.random.default_rng(self.seed + epoch).permutation(count) if self.shuffle else np.arange(count)
            )
        return self._epochs[epoch]

    def step_micro_batches(self, step: int) -> list[list[int]]:
        """All micro-batches of optimizer step `step` (0-based), across every process, in order."""
        epoch, index = divmod(step, self.steps_per_epoch)
        size, per_step = self.micro_batch_size, self.accumulation * self.world_size
        order = self.epoch_order(epoch)[index * per_step * size : (index + 1) * per_step * size]
        return [order[i : i + size].tolist() for i in range(0, len(order), size)]

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch
