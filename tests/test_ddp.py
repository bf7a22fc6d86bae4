"""Two processes (gloo, CPU) × GA 2 train exactly like one process × GA 4; a process that stops stops the launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.train_helpers import final_weights, logged_losses, max_weight_difference, tiny_config, write_chat_data

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "data_path, launcher",
    [("tokenized", "torchrun"), ("streamed mixture", "torchrun"), ("tokenized", "nproc_per_node")],
)
def test_two_processes_equal_one_process_with_double_accumulation(data_path, launcher, tmp_path, tiny_model_dir):
    """Under torchrun, and forked by `sftkit train --nproc_per_node 2` (one process: no launcher at all)."""
    data = write_chat_data(tmp_path / "chat.jsonl", rows=40)
    common = dict(max_steps=3, lora_dropout=0.0, per_device_train_batch_size=2, save_steps=100)
    if data_path == "streamed mixture":  # each process tokenizes half of the rows; both pack the same buffers
        other = write_chat_data(tmp_path / "other.jsonl", rows=20, seed=5)
        common.update(
            streaming=True,
            packing_buffer=16,
            datasets=[{"path": str(data), "weight": 2}, {"path": str(other), "weight": 1}],
        )
    single = tiny_config(tiny_model_dir, data, tmp_path / "one", gradient_accumulation_steps=4, **common)
    double = tiny_config(tiny_model_dir, data, tmp_path / "two", gradient_accumulation_steps=2, **common)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name, config, procs in (("one", single, 1), ("two", double, 2)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
        command = (
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={procs}",
                "-m",
                "sftkit.cli",
                "train",
                str(path),
            ]
            if launcher == "torchrun"
            else [sys.executable, "-m", "sftkit.cli", "train", str(path), "--nproc_per_node", str(procs)]
        )
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    difference = max_weight_difference(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))
    print(f"max |w_1proc - w_2proc| = {difference:.3e}")
    # Summing micro-batch gradients in one process vs all-reducing over two changes float rounding (~1e-7);
    # AdamW divides by sqrt(v), so a near-zero gradient element can move by far more than the rest: on the
    # varlen path one element of 8,192 differs by 2.4e-6 and every other by < 3e-7, losses to 1e-7.
    assert difference <= 5e-6
    one, two = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
    assert one.keys() == two.keys() == {1, 2, 3}
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-6)
    # argmax hits are summed over both processes: the same token accuracy as one process
    rows = {
        name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    }
    assert [r["token_accuracy"] for r in rows["two"]] == [r["token_accuracy"] for r in rows["one"]]
    for one_row, two_row in zip(rows["one"], rows["two"], strict=True):  # per-source sums all-reduced with the step's
        assert two_row["source_trained_tokens"] == one_row["source_trained_tokens"]
        assert two_row["source_loss"] == pytest.approx(one_row["source_loss"], rel=1e-6)
    assert all(r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 2) for r in rows["two"])


def test_a_failing_process_stops_the_launch_with_its_error(tmp_path, tiny_model_dir):
    """`--nproc_per_node 2` on data the run refuses: each process prints the error, the launch exits 2 and
    names the process, nothing hangs."""
    data = write_chat_data(tmp_path / "chat.jsonl", rows=8)
    config = tiny_config(tiny_model_dir, data, tmp_path / "run", max_steps=2, max_seq_length=8, truncation="error")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "sftkit.cli", "train", str(path), "--nproc_per_node", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "max_seq_length 8" in done.stdout and "truncation" in done.stdout
    assert "training process 0 stopped (exit code 2)" in done.stdout


def test_nproc_per_node_refuses_to_fork_after_cuda_was_initialised(monkeypatch, tmp_path, tiny_model_dir):
    """A forked process cannot use CUDA initialised before the fork: the launch says so instead of hanging."""
    import torch

    from sftkit.train.errors import TrainingError
    from sftkit.train.launch import launch

    config = tiny_config(
        tiny_model_dir, write_chat_data(tmp_path / "chat.jsonl", rows=4), tmp_path / "run", max_steps=1
    )
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(TrainingError, match="CUDA was initialised"):
        launch(config, 2, lambda _: pytest.fail("no process may start"))


@pytest.mark.parametrize("launcher", ["nproc_per_node", "torchrun"])
def test_ctrl_c_saves_stops_every_process_and_resumes(launcher, tmp_path, tiny_model_dir):
    """Ctrl-C (SIGINT to the terminal's process group) during a 2-process run: both processes stop after the
    same step and save one checkpoint, which resumes; nothing is left running. `--nproc_per_node` then exits 2
    saying how to resume, without a traceback (torchrun prints its own)."""
    import signal
    import time

    data = write_chat_data(tmp_path / "chat.jsonl", rows=40)
    config = tiny_config(tiny_model_dir, data, tmp_path / "run", max_steps=100_000, save_steps=100_000)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    def command(*extra: str) -> list[str]:
        if launcher == "torchrun":
            return [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                "-m",
                "sftkit.cli",
                "train",
                str(path),
                *extra,
            ]
        return [sys.executable, "-m", "sftkit.cli", "train", str(path), "--nproc_per_node", "2", *extra]

    run = subprocess.Popen(
        command(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGINT)
    output, _ = run.communicate(timeout=120)
    with pytest.raises(ProcessLookupError):
        os.killpg(run.pid, 0)
    if launcher == "nproc_per_node":
        assert run.returncode == 2, output[-3000:]
        assert "stopped by SIGINT" in output and "Traceback" not in output
    saved = list((tmp_path / "run").glob("checkpoint-*"))
    assert len(saved) == 1 and "Saved" in output, output[-3000:]
    step = int(saved[0].name.split("-")[1])
    resumed = subprocess.run(
        command("--resume_from_checkpoint", "true", "--max_steps", str(step + 2)),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] == step + 2
