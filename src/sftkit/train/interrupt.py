"""Ctrl-C under several processes: every process stops after the same step, then the run saves.

One process stops where Ctrl-C finds it (KeyboardInterrupt) and saves. Under several processes that is
not safe: the signal reaches them at slightly different points, and one may already be saving (a
barrier) while another waits in the step's all-reduce, so the collectives no longer pair up and the
processes hang until the launcher kills them, unsaved. Here Ctrl-C only marks the request; each step's
all-reduce carries the marks, so every process learns of it after the same step and they stop and save
together (the loop raises KeyboardInterrupt there, in all of them at once).
"""

from __future__ import annotations

import signal
from types import FrameType, TracebackType
from typing import Any

_requested = False  # in this process, since it started


def was_requested() -> bool:
    """Whether Ctrl-C (SIGINT) was marked in this process by a `StopRequests`."""
    return _requested


class StopRequests:
    """While entered with `lockstep` (several processes), SIGINT marks a stop request instead of raising."""

    def __init__(self, lockstep: bool) -> None:
        self.lockstep = lockstep
        self.requested = False
        self._previous: Any = None  # the handler before, put back on exit

    def vote(self) -> float:
        """1.0 once this process was asked to stop: summed over the processes with the step's figures."""
        return 1.0 if self.requested else 0.0

    def _mark(self, signum: int, frame: FrameType | None) -> None:
        global _requested
        self.requested = _requested = True

    def __enter__(self) -> StopRequests:
        if self.lockstep:
            self._previous = signal.signal(signal.SIGINT, self._mark)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.lockstep:
            signal.signal(signal.SIGINT, self._previous)
