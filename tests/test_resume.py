"""A crashed run resumed from its checkpoint ends exactly like the uninterrupted run."""

from __future__ import annotations

import pytest

import sftkit.train.loop as loop
from sftkit.train.checkpoint import CheckpointError
from tests.train_helpers import (
    crash_in_step,
    final_weights,
    logged_losses,
    max_weight_difference,
    tiny_config,
    write_chat_data,
)

pytestmark = pytest.mark.slow


def test_resume_continues_the_same_run(tmp_path, tiny_model_dir, monkeypatch):
    data = write_chat_data(tmp_path / "chat.jsonl")
    straight = tiny_config(tiny_model_dir, data, tmp_path / "straight")
    loop.train(straight)

    crashed = tiny_config(tiny_model_dir, data, tmp_path / "crashed")
    with crash_in_step(monkeypatch, 5), pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(crashed)
    assert (tmp_path / "crashed" / "checkpoint-3").is_dir()
    assert not (tmp_path / "crashed" / "checkpoint-6").exists()

    resumed = tiny_config(tiny_model_dir, data, tmp_path / "crashed", resume_from_checkpoint=True)
    result = loop.train(resumed)
    assert result.last_step == 8
    difference = max_weight_difference(final_weights(tmp_path / "straight"), final_weights(tmp_path / "crashed"))
    assert difference <= 1e-6, difference
    expected, got = logged_losses(tmp_path / "straight"), logged_losses(tmp_path / "crashed")
    assert sorted(got) == list(range(1, 9))  # rows past the checkpoint were rewritten, not duplicated
    for step in range(1, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=0), step


def test_output_dir_with_another_run_is_refused(tmp_path, tiny_model_dir):
    data = write_chat_data(tmp_path / "chat.jsonl", rows=12)
    loop.train(tiny_config(tiny_model_dir, data, tmp_path / "run", max_steps=2))
    with pytest.raises(loop.ModelError, match="already holds a run"):
        loop.train(tiny_config(tiny_model_dir, data, tmp_path / "run", max_steps=2))
    # a different run cannot resume from it either
    with pytest.raises(CheckpointError, match="different run"):
        loop.train(
            tiny_config(tiny_model_dir, data, tmp_path / "run", max_steps=2, lora_r=8, resume_from_checkpoint=True)
        )
