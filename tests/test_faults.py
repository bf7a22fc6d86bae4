"""Faults a long run meets: kill -9, Ctrl-C, damaged checkpoints, a full disk, an unusable output_dir.

What a user relies on: whatever the moment of the crash, `resume_from_checkpoint: true` continues
from the newest complete checkpoint (never a half-written `.tmp-checkpoint-*`), loses at most
`save_steps` steps, and ends with exactly the weights of the run that was never interrupted.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file

import sftkit.train.loop as loop
from sftkit.model.load import ModelError
from sftkit.train import checkpoint as ckpt
from sftkit.train.checkpoint import CheckpointError
from tests.train_helpers import final_weights, max_weight_difference, tiny_config, write_chat_data

RUNNER = Path(__file__).with_name("run_train.py")
MAX_STEPS, SAVE_STEPS = 6, 2
# packing on, GA 2, dropout 0.1: resuming must restore the data position and the dropout RNG
SETTINGS = dict(
    max_steps=MAX_STEPS, save_steps=SAVE_STEPS, packing=True, gradient_accumulation_steps=2, lora_dropout=0.1
)


def write_yaml(config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path


def last_logged_step(output_dir: Path) -> int:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def run_and_signal(
    config_path: Path, output_dir: Path, moment, sig: int, env: dict[str, str], timeout: float = 240
) -> tuple[subprocess.CompletedProcess, dict]:
    """Start training in a child process and send `sig` once `moment(output_dir)` holds."""
    process = subprocess.Popen(
        [sys.executable, str(RUNNER), str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    deadline = time.monotonic() + timeout
    try:
        while not moment(output_dir):
            if process.poll() is not None:
                _, err = process.communicate()
                pytest.fail(f"training ended (rc {process.returncode}) before the kill point:\n{err[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("kill point not reached in time")
            time.sleep(0.02)
        seen = {
            "checkpoints": sorted(p.name for p in output_dir.glob("checkpoint-*")),
            "temp": sorted(p.name for p in output_dir.glob(".tmp-checkpoint-*")),
            "last_step": last_logged_step(output_dir),
        }
        process.send_signal(sig)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err), seen


def resume_in_process(config) -> tuple[loop.RunResult, str]:
    buffer = StringIO()
    result = loop.train(config, console=Console(file=buffer, width=400, force_terminal=False))
    return result, buffer.getvalue()


def resumed_step(console_text: str) -> int:
    line = next(line for line in console_text.splitlines() if line.startswith("Resumed from"))
    return int(line.rsplit(" ", 1)[1])


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return write_chat_data(tmp_path_factory.mktemp("faults_data") / "chat.jsonl")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, chat_data) -> dict:
    output_dir = tmp_path_factory.mktemp("faults") / "straight"
    loop.train(tiny_config(tiny_model_dir, chat_data, output_dir, **SETTINGS), console=Console(file=StringIO()))
    return final_weights(output_dir)


# --------------------------------------------------------------------------- kill -9


def checkpoint_appeared(step: int):
    return lambda output_dir: (output_dir / f"checkpoint-{step}").is_dir()


def inside_save_of(step: int):
    return lambda output_dir: (output_dir / f".tmp-checkpoint-{step}" / "adapter_model.safetensors").exists()


def logged(step: int):
    return lambda output_dir: last_logged_step(output_dir) >= step


KILL_POINTS = {
    # name: (moment, test-only env, the checkpoint resume must take)
    "right after checkpoint-2 appears": (checkpoint_appeared(2), {"SFTKIT_TEST_STEP_DELAY": "0.3"}, 2),
    "while writing checkpoint-4": (inside_save_of(4), {"SFTKIT_TEST_HANG_IN_SAVE": "4"}, 2),
    "between checkpoint-4 and checkpoint-6": (logged(5), {"SFTKIT_TEST_STEP_DELAY": "0.3"}, 4),
}


@pytest.mark.slow
@pytest.mark.parametrize("kill_point", list(KILL_POINTS))
def test_sigkill_then_resume_matches_uninterrupted_run(kill_point, tmp_path, tiny_model_dir, chat_data, uninterrupted):
    moment, env, expected_checkpoint = KILL_POINTS[kill_point]
    output_dir = tmp_path / "run"
    config_path = write_yaml(tiny_config(tiny_model_dir, chat_data, output_dir, **SETTINGS), tmp_path / "run.yaml")

    killed, seen = run_and_signal(config_path, output_dir, moment, signal.SIGKILL, env)
    assert killed.returncode == -signal.SIGKILL
    newest_complete = max(int(name.split("-")[1]) for name in seen["checkpoints"])
    assert newest_complete == expected_checkpoint, seen
    if kill_point.startswith("while writing"):
        assert seen["temp"] == [".tmp-checkpoint-4"], seen  # the half-written checkpoint is there, and ignored

    resumed, console_text = resume_in_process(
        tiny_config(tiny_model_dir, chat_data, output_dir, resume_from_checkpoint=True, **SETTINGS)
    )
    step = resumed_step(console_text)
    assert step == expected_checkpoint, console_text
    assert seen["last_step"] - step <= SAVE_STEPS, (seen, step)  # lost at most save_steps steps
    assert resumed.status == "finished" and resumed.last_step == MAX_STEPS
    assert not list(output_dir.glob(".tmp-checkpoint-*"))
    difference = max_weight_difference(uninterrupted, final_weights(output_dir))
    print(f"kill point {kill_point!r}: resumed from checkpoint-{step}, max weight difference {difference:.2e}")
    assert difference <= 1e-6, difference


@pytest.mark.slow
def test_crash_after_the_last_checkpoint_resumes_to_the_final_weights(
    tmp_path, tiny_model_dir, chat_data, uninterrupted, monkeypatch
):
    """Killed after checkpoint-6 (the last step) but before adapter/ is written: resuming runs no step."""
    output_dir = tmp_path / "run"

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setattr(loop, "save_final", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            loop.train(tiny_config(tiny_model_dir, chat_data, output_dir, **SETTINGS), console=Console(file=StringIO()))
    assert (output_dir / f"checkpoint-{MAX_STEPS}").is_dir() and not (output_dir / "adapter").exists()

    resumed, console_text = resume_in_process(
        tiny_config(tiny_model_dir, chat_data, output_dir, resume_from_checkpoint=True, **SETTINGS)
    )
    assert resumed_step(console_text) == MAX_STEPS and resumed.status == "finished"
    assert json.loads((output_dir / "run.json").read_text())["status"] == "finished"
    assert max_weight_difference(uninterrupted, final_weights(output_dir)) <= 1e-6


# --------------------------------------------------------------------------- Ctrl-C


@pytest.mark.slow
def test_ctrl_c_saves_stops_cleanly_and_resumes(tmp_path, tiny_model_dir, chat_data, uninterrupted):
    output_dir = tmp_path / "run"
    config_path = write_yaml(tiny_config(tiny_model_dir, chat_data, output_dir, **SETTINGS), tmp_path / "run.yaml")
    # The signal lands while step 4 is half done: dropout has drawn from the RNG, the optimizer has not stepped.
    marker = tmp_path / "step_in_progress"
    stopped, seen = run_and_signal(
        config_path,
        output_dir,
        lambda _: marker.exists() and marker.read_text() == "4",
        signal.SIGINT,
        {"SFTKIT_TEST_STEP_DELAY": "1", "SFTKIT_TEST_STEP_MARKER": str(marker)},
    )
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr and "Traceback" not in stopped.stdout
    run_info = json.loads((output_dir / "run.json").read_text())
    assert run_info["status"] == "stopped"
    stopped_at = run_info["last_step"]
    assert stopped_at == seen["last_step"] == 3
    ckpt.validate(
        output_dir / f"checkpoint-{stopped_at}",
        loop.run_fingerprint(tiny_config(tiny_model_dir, chat_data, output_dir, **SETTINGS), 1),
        1,
    )
    assert not list(output_dir.glob(".tmp-checkpoint-*"))

    _, console_text = resume_in_process(
        tiny_config(tiny_model_dir, chat_data, output_dir, resume_from_checkpoint=True, **SETTINGS)
    )
    assert resumed_step(console_text) == stopped_at  # nothing lost
    difference = max_weight_difference(uninterrupted, final_weights(output_dir))
    print(f"Ctrl-C at step {stopped_at}: max weight difference after resume {difference:.2e}")
    assert difference <= 1e-6, difference


# --------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, tiny_model_dir, chat_data) -> Path:
    """A finished 4-step run holding checkpoint-2 and checkpoint-4."""
    output_dir = tmp_path_factory.mktemp("damaged") / "run"
    loop.train(
        tiny_config(tiny_model_dir, chat_data, output_dir, max_steps=4, save_steps=2), console=Console(file=StringIO())
    )
    return output_dir


def truncate_adapter(checkpoint: Path) -> None:
    path = checkpoint / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def delete_optimizer(checkpoint: Path) -> None:
    (checkpoint / "optimizer.pt").unlink()


def state_of_another_run(checkpoint: Path) -> None:
    """trainer_state.json of a run with another seed, the manifest rewritten to match (a whole foreign file)."""
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    state["fingerprint"]["seed"] = 1234
    path.write_text(json.dumps(state))
    manifest = json.loads((checkpoint / ckpt.MANIFEST).read_text())
    manifest["files"]["trainer_state.json"] = {"size": path.stat().st_size, "sha256": ckpt._sha256(path)}
    (checkpoint / ckpt.MANIFEST).write_text(json.dumps(manifest))


DAMAGE = {
    # name: (damage to checkpoint-4, what the refusal must say)
    "truncated adapter": (
        truncate_adapter,
        r"checkpoint-4/adapter_model\.safetensors: 1000 bytes, expected \d+; the file is truncated",
    ),
    "missing optimizer": (delete_optimizer, r"checkpoint-4/optimizer\.pt: missing"),
    "state of another run": (
        state_of_another_run,
        r"checkpoint-4/trainer_state\.json: the checkpoint is from a different run "
        r"\(seed: checkpoint has 1234, this run has 7\)",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_refused_or_skipped(damage, tmp_path, tiny_model_dir, chat_data, two_checkpoints):
    spoil, message = DAMAGE[damage]
    output_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, output_dir)
    spoil(output_dir / "checkpoint-4")

    with pytest.raises(CheckpointError, match=message + r".*resume_from_checkpoint: latest"):
        loop.train(
            tiny_config(tiny_model_dir, chat_data, output_dir, max_steps=4, save_steps=2, resume_from_checkpoint=True),
            console=Console(file=StringIO()),
        )

    result, console_text = resume_in_process(
        tiny_config(tiny_model_dir, chat_data, output_dir, max_steps=4, save_steps=2, resume_from_checkpoint="latest")
    )
    assert "skipping damaged checkpoint" in console_text and "checkpoint-4" in console_text, console_text
    assert resumed_step(console_text) == 2 and result.last_step == 4
    # the step the damaged checkpoint stood for is saved again, intact
    fingerprint = loop.run_fingerprint(tiny_config(tiny_model_dir, chat_data, output_dir, max_steps=4, save_steps=2), 1)
    assert ckpt.validate(output_dir / "checkpoint-4", fingerprint, 1)["step"] == 4


@pytest.mark.slow
def test_resume_with_another_model_shape_is_refused(tmp_path, tiny_model_dir, chat_data, two_checkpoints):
    output_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, output_dir)
    changed = dict(max_steps=4, save_steps=2, lora_r=8)
    with pytest.raises(
        CheckpointError, match=r"checkpoint-4/trainer_state\.json: .*different run \(lora: checkpoint has \[4,"
    ):
        loop.train(
            tiny_config(tiny_model_dir, chat_data, output_dir, resume_from_checkpoint=True, **changed),
            console=Console(file=StringIO()),
        )
    with pytest.raises(CheckpointError, match="no intact checkpoint to resume from"):
        loop.train(
            tiny_config(tiny_model_dir, chat_data, output_dir, resume_from_checkpoint="latest", **changed),
            console=Console(file=StringIO()),
        )


# --------------------------------------------------------------------------- disk and output_dir


@pytest.mark.slow
def test_disk_full_while_saving_keeps_earlier_checkpoints(tmp_path, tiny_model_dir, chat_data, monkeypatch):
    output_dir = tmp_path / "run"
    real_save, calls = torch.save, {"n": 0}

    def save_until_disk_is_full(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the optimizer of the second checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_disk_is_full)
    config = tiny_config(tiny_model_dir, chat_data, output_dir, max_steps=4, save_steps=2)
    with pytest.raises(loop.TrainingError) as caught:
        loop.train(config, console=Console(file=StringIO()))
    message = str(caught.value)
    assert "could not write checkpoint-4" in message and "No space left on device" in message
    assert "Earlier checkpoints are intact (checkpoint-2)" in message
    assert ckpt.validate(output_dir / "checkpoint-2", loop.run_fingerprint(config, 1), 1)["step"] == 2
    assert not (output_dir / "checkpoint-4").exists()
    assert not list(output_dir.glob(".tmp-checkpoint-*"))
    assert json.loads((output_dir / "run.json").read_text())["status"] == "crashed"

    monkeypatch.setattr(torch, "save", real_save)  # space freed: the run resumes
    result = loop.train(
        tiny_config(tiny_model_dir, chat_data, output_dir, max_steps=4, save_steps=2, resume_from_checkpoint=True),
        console=Console(file=StringIO()),
    )
    assert result.last_step == 4


def test_output_dir_that_cannot_be_created(tmp_path, tiny_model_dir, chat_data):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ModelError, match=r"output_dir .*a_file/sub: cannot write there .*choose a writable directory"):
        loop.train(tiny_config(tiny_model_dir, chat_data, blocker / "sub"), console=Console(file=StringIO()))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_dir(tmp_path, tiny_model_dir, chat_data):
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(ModelError, match="cannot write there"):
            loop.train(tiny_config(tiny_model_dir, chat_data, parent / "run"), console=Console(file=StringIO()))
    finally:
        parent.chmod(0o700)


@pytest.mark.slow
def test_output_dir_with_another_run_needs_overwrite_or_resume(tmp_path, tiny_model_dir, chat_data, two_checkpoints):
    output_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, output_dir)
    fresh = dict(max_steps=2, save_steps=2, seed=8)  # another run: another seed
    with pytest.raises(ModelError, match="already holds a run; set `resume_from_checkpoint: true`"):
        loop.train(tiny_config(tiny_model_dir, chat_data, output_dir, **fresh), console=Console(file=StringIO()))
    assert (output_dir / "checkpoint-4").is_dir()  # refused before touching anything

    loop.train(
        tiny_config(tiny_model_dir, chat_data, output_dir, overwrite_output_dir=True, **fresh),
        console=Console(file=StringIO()),
    )
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    state = json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["fingerprint"]["seed"] == 8
    assert load_file(str(output_dir / "adapter" / "adapter_model.safetensors"))
