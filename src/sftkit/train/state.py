"""Where a run stands: what a checkpoint saves as trainer_state.json and a resume reads back.

    trainer_state.json                  RunState
    ------------------                  --------
    step                                step
    best_metric    (a value)            best_value     (of the metric named by metric_for_best_model)
    best_checkpoint                     best_checkpoint
    evals_without_gain                  evals_without_gain
    window: sums + "seconds"            window: sums + "time" (the wall-clock start of the window)
    fingerprint                         fingerprint
    epoch, eval_* of that step          (written for readers, never read back)

The window's clock is saved as the seconds it had run, not as its wall-clock start: a resumed run
restarts the clock that many seconds back, so time the run was down is never counted as training.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from sftkit.train.metrics import empty_window


@dataclass
class RunState:
    fingerprint: dict[str, Any]  # the settings a resumed run must share (`checkpoint.run_fingerprint`)
    step: int = 0  # optimizer steps applied
    best_value: float | None = None
    best_checkpoint: str | None = None  # e.g. "checkpoint-40"
    evals_without_gain: int = 0
    window: dict[str, Any] = field(default_factory=empty_window)  # sums since the last logged row (metrics.py)
    # Kept by this process only, never saved:
    saved_step: int = 0  # of the newest checkpoint this process wrote or resumed from
    skipped_steps: int = 0  # non-finite steps not applied
    last_loss: float | None = None  # of the last applied step

    def to_json(self, epoch: float) -> dict[str, Any]:
        window = {key: value for key, value in self.window.items() if key != "time"}
        return {
            "step": self.step,
            "best_metric": self.best_value,
            "best_checkpoint": self.best_checkpoint,
            "evals_without_gain": self.evals_without_gain,
            "window": {**window, "seconds": time.time() - self.window["time"]},
            "fingerprint": self.fingerprint,
            "epoch": epoch,
        }

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> RunState:
        """Any trainer_state.json sftkit wrote; one written before the window saved its seconds restarts
        the window's clock at the resume (its wall-clock start would count the downtime)."""
        window = {key: value for key, value in saved["window"].items() if key not in ("time", "seconds")}
        return cls(
            fingerprint=saved["fingerprint"],
            step=saved["step"],
            best_value=saved["best_metric"],
            best_checkpoint=saved["best_checkpoint"],
            evals_without_gain=saved["evals_without_gain"],
            window={**window, "time": time.time() - saved["window"].get("seconds", 0.0)},
            saved_step=saved["step"],
        )
