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
from sftkit.train.state import RunState
from tests.train_helpers import tiny_config, write_chat_data

QUIET = dict(console=Console(file=StringIO()))
DOWNTIME_S = 3600.0


def trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def metric_rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_a_trainer_state_written_before_the_typed_state_still_resumes():
    """tests/fixtures/trainer_state_0.json is checkpoint-3's trainer_state.json as sftkit wrote it before
    RunState (eval figures and epoch beside the state, the window's clock as a wall-clock start)."""
    saved = json.loads((Path(__file__).parent / "fixtures" / "trainer_state_0.json").read_text())
    state = RunState.from_json(saved)
    assert (state.step, state.best_value, state.best_checkpoint, state.evals_without_gain) == (
        3,
        saved["best_metric"],
        "checkpoint-3",
        0,
    )
    assert state.fingerprint == saved["fingerprint"] and state.saved_step == 3
    assert {k: v for k, v in state.window.items() if k != "time"} == {
        k: v for k, v in saved["window"].items() if k != "time"
    }
    assert time.time() - state.window["time"] < 60  # the window's clock restarts at the resume
    written = state.to_json(epoch=0.5)
    assert not [key for key in written if key.startswith("eval_")]  # figures of step 3 stay with checkpoint-3
    assert RunState.from_json(written).to_json(epoch=0.5)["window"].keys() == written["window"].keys()


def test_the_window_clock_is_saved_as_the_seconds_it_has_run(monkeypatch):
    state = RunState(fingerprint={}, step=5)
    started = state.window["time"]
    monkeypatch.setattr(time, "time", lambda: started + 42.0)
    written = state.to_json(epoch=1.0)
    assert written["window"]["seconds"] == 42.0 and "time" not in written["window"]
    monkeypatch.setattr(time, "time", lambda: started + 42.0 + DOWNTIME_S)  # resumed an hour later
    assert RunState.from_json(written).window["time"] == started + DOWNTIME_S
