"""What a run's state carries across a resume, and what run.json says when a run ends badly.

Each end-to-end test stops a run with `max_steps` and continues it with a larger one
(`max_steps` is not part of the fingerprint), so that it needs nothing but `train()`.
"""

from __future__ import annotations

import json
import time
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

import sftkit.train.loop as loop
from tests.train_helpers import tiny_config, write_chat_data

pytestmark = pytest.mark.slow
QUIET = dict(console=Console(file=StringIO()))
DOWNTIME_S = 3600.0


def trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def metric_rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_tokens_per_s_after_a_resume_does_not_count_the_downtime(tmp_path, tiny_model_dir, monkeypatch):
    """The first throughput a resumed run logs is over the time it trained, not since the checkpoint
    was written: an hour between the two runs must not show up as an hour of training."""
    data = write_chat_data(tmp_path / "chat.jsonl", rows=16)
    output_dir = tmp_path / "out"
    loop.train(tiny_config(tiny_model_dir, data, output_dir, max_steps=2, save_steps=2), **QUIET)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + DOWNTIME_S)  # the run resumes an hour later
    loop.train(
        tiny_config(tiny_model_dir, data, output_dir, max_steps=3, save_steps=2, resume_from_checkpoint=True), **QUIET
    )
    first_after_resume = next(row for row in metric_rows(output_dir) if row["step"] == 3 and "loss" in row)
    window_seconds = first_after_resume["trained_tokens"] / first_after_resume["trained_tokens_per_s"]
    assert window_seconds < DOWNTIME_S, window_seconds


def test_a_checkpoint_holds_the_eval_figures_of_its_own_step_only(tmp_path, tiny_model_dir):
    """Eval figures written with checkpoint-3 are not carried into the checkpoints a resumed run writes."""
    data = write_chat_data(tmp_path / "chat.jsonl", rows=20)
    output_dir = tmp_path / "out"
    settings = dict(eval_split_ratio=0.2, eval_steps=3, save_steps=3)
    loop.train(tiny_config(tiny_model_dir, data, output_dir, max_steps=3, **settings), **QUIET)
    assert "eval_loss" in trainer_state(output_dir / "checkpoint-3")  # evaluated and saved at the same step
    loop.train(
        tiny_config(tiny_model_dir, data, output_dir, max_steps=8, resume_from_checkpoint=True, **settings), **QUIET
    )
    evals = {row["step"]: row for row in metric_rows(output_dir) if "eval_loss" in row}
    assert trainer_state(output_dir / "checkpoint-6")["eval_loss"] == evals[6]["eval_loss"]
    final = trainer_state(output_dir / "checkpoint-8")  # written after the loop, with no evaluation of its own
    assert not [key for key in final if key.startswith("eval_")], final


def test_run_json_says_crashed_when_the_final_save_fails(tmp_path, tiny_model_dir):
    """A run whose final weights cannot be written is not left "running" in run.json."""
    data = write_chat_data(tmp_path / "chat.jsonl", rows=8)
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "adapter").write_text("a file where the final adapter folder goes")
    with pytest.raises(OSError):
        loop.train(tiny_config(tiny_model_dir, data, output_dir, max_steps=1, save_steps=10), **QUIET)
    run = json.loads((output_dir / "run.json").read_text())
    assert run["status"] == "crashed" and run["last_step"] == 1
