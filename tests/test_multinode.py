"""Several machines, stood in for by two torchrun agents on this host (`--nnodes 2`, c10d rendezvous on
127.0.0.1, one process each) running the command of examples/slurm/multinode.sbatch: Ctrl-C stops both
after the same step with one checkpoint, which resumes; the run then has trained exactly like one process
× GA 2; the data were tokenized once where the agents share the datasets cache, once per agent where not."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from tests.train_helpers import final_weights, logged_losses, max_weight_difference, tiny_config, write_chat_data

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "examples" / "slurm" / "multinode.sbatch"
TOKENIZING = re.compile(r"Tokenizing train:\s+0%")  # a process starts tokenizing (not where the cache has it)


def machine_command() -> str:
    """The command `srun` runs on every machine in the SLURM example (the README shows the same text)."""
    return re.search(r"srun bash -c '\n(.*?)\n'", SBATCH.read_text(), re.S).group(1)


def flat(output: str) -> str:
    """Console output with rich's line wrapping undone (it wraps long lines at spaces)."""
    return " ".join(output.split())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_machines(configs: tuple[Path, Path], caches: tuple[Path, Path], processes: int = 1) -> list[subprocess.Popen]:
    """Two agents of `processes` processes, each in a process group of its own (a terminal of its own), each
    with its config file and datasets cache."""
    env = {
        **{k: v for k, v in os.environ.items() if k != "HF_DATASETS_DISABLE_PROGRESS_BARS"},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # this Python's torchrun
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "NNODES": "2",
        "NPROC_PER_NODE": str(processes),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RUN_ID": f"test-{os.getpid()}-{time.time_ns()}",
    }
    return [
        subprocess.Popen(
            ["bash", "-c", machine_command()],
            env={**env, "CONFIG": str(config), "HF_DATASETS_CACHE": str(cache)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for config, cache in zip(configs, caches, strict=True)
    ]


def write(config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Two machines sharing one datasets cache, stopped by Ctrl-C once 2 steps are logged, then resumed for 2
    more steps with a cache each; and 1 process × GA 2 over the same steps, uninterrupted."""
    tmp_path = tmp_path_factory.mktemp("multinode")
    first = write_chat_data(tmp_path / "first.jsonl", rows=24)
    second = write_chat_data(tmp_path / "second.jsonl", rows=16, seed=5)
    common = dict(
        datasets=[{"path": str(first)}, {"path": str(second)}],  # two sources: per-source figures
        lora_dropout=0.0,
        per_device_train_batch_size=2,
        lr_scheduler_type="constant_with_warmup",  # the steps do not depend on max_steps, which resuming changes
        save_steps=100_000,
    )
    output_dir = tmp_path / "two"
    config = tiny_config(tiny_model_dir, first, output_dir, gradient_accumulation_steps=1, max_steps=100_000, **common)
    machines = start_machines((write(config, tmp_path / "two.yaml"),) * 2, (tmp_path / "shared",) * 2)
    metrics, deadline = output_dir / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    for machine in machines:  # Ctrl-C in both terminals
        os.killpg(machine.pid, signal.SIGINT)
    stopped = [machine.communicate(timeout=180)[0] for machine in machines]
    for machine in machines:
        with pytest.raises(ProcessLookupError):  # nothing left running
            os.killpg(machine.pid, 0)
    saved = sorted(output_dir.glob("checkpoint-*"))
    assert len(saved) == 1, "\n".join(output[-3000:] for output in stopped)
    step = int(saved[0].name.split("-")[1])
    checkpoint_files = sorted(path.name for path in saved[0].iterdir())

    resume = config.model_copy(update={"max_steps": step + 2, "resume_from_checkpoint": True})
    caches = (tmp_path / "cache-0", tmp_path / "cache-1")
    machines = start_machines((write(resume, tmp_path / "resume.yaml"),) * 2, caches)
    resumed = [machine.communicate(timeout=600)[0] for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], "\n".join(output[-3000:] for output in resumed)

    import sftkit.train.loop as loop

    reference = tiny_config(
        tiny_model_dir, first, tmp_path / "one", gradient_accumulation_steps=2, max_steps=step + 2, **common
    )
    loop.train(reference, console=Console(file=StringIO()))
    return tmp_path, step, checkpoint_files, stopped, resumed


@pytest.mark.slow
def test_ctrl_c_stops_both_machines_after_the_same_step(runs):
    tmp_path, step, checkpoint_files, stopped, _ = runs
    main = next(flat(output) for output in stopped if "Interrupted at step" in output)
    assert f"Interrupted at step {step}." in main and f"Saved {tmp_path / 'two'}/checkpoint-{step};" in main
    # both processes wrote their part of the one checkpoint, in the save they entered together
    assert {"rng_state_0.json", "rng_state_1.json", "adapter_model.safetensors"} <= set(checkpoint_files)
    print(f"two machines stopped by Ctrl-C after step {step}, one checkpoint: checkpoint-{step}")


@pytest.mark.slow
def test_two_machines_train_like_one_process_with_double_accumulation(runs):
    """Across the interruption: weights, every logged loss, token accuracy and per-source figures."""
    tmp_path, step, _, _, resumed = runs
    assert any(
        f"Resumed from {tmp_path / 'two'}/checkpoint-{step} at step {step}" in flat(output) for output in resumed
    )
    difference = max_weight_difference(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))
    print(f"max |w_1proc - w_2machines| after Ctrl-C at step {step} and resume = {difference:.3e}")
    assert difference <= 5e-6  # all-reduce vs in-process sum (tests/test_ddp.py); measured 0 here
    one, two = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
    assert one.keys() == two.keys() == set(range(1, step + 3))
    rows = {
        name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    }
    for one_row, two_row in zip(rows["one"], rows["two"], strict=True):
        assert two_row["loss"] == pytest.approx(one_row["loss"], rel=1e-6)
        assert two_row["token_accuracy"] == one_row["token_accuracy"]
        assert two_row["source_trained_tokens"] == one_row["source_trained_tokens"]
        assert two_row["source_loss"] == pytest.approx(one_row["source_loss"], rel=1e-6)
    assert len(rows["two"][0]["source_loss"]) == 2


@pytest.mark.slow
def test_data_are_tokenized_once_per_job_on_a_shared_cache_and_once_per_machine_otherwise(runs, tiny_model_dir):
    """The main process tokenizes first (which machine holds it is the rendezvous' choice), then the first
    process of each other machine finds its cache (shared) or tokenizes for its machine (not shared), then
    the other processes read their machine's copy."""
    tmp_path, _, _, stopped, resumed = runs
    main = ["Interrupted at step" in output for output in stopped]
    assert sorted(main) == [False, True]
    assert [len(TOKENIZING.findall(output)) for output in stopped] == [int(m) for m in main]  # shared: once
    assert [len(TOKENIZING.findall(output)) for output in resumed] == [1, 1]  # a cache each: once on each
    # 2 processes per machine, a cache each: still once on each machine, not once per process
    config = tiny_config(tiny_model_dir, tmp_path / "first.jsonl", tmp_path / "four", max_steps=1)
    machines = start_machines((write(config, tmp_path / "four.yaml"),) * 2, (tmp_path / "own-0", tmp_path / "own-1"), 2)
    outputs = [machine.communicate(timeout=600)[0] for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], "\n".join(output[-3000:] for output in outputs)
    assert [len(TOKENIZING.findall(output)) for output in outputs] == [1, 1]
    for cache in ("shared", "cache-0", "cache-1", "own-0", "own-1"):
        assert list((tmp_path / cache).rglob("cache-*.arrow")), cache


@pytest.mark.slow
def test_an_output_dir_one_machine_does_not_see_stops_the_run_at_the_start(tmp_path, tiny_model_dir):
    """Each machine's config names its own local output_dir: every process stops before data and model."""
    data = write_chat_data(tmp_path / "chat.jsonl", rows=8)
    configs = tuple(
        write(tiny_config(tiny_model_dir, data, tmp_path / f"disk-{n}" / "run", max_steps=1), tmp_path / f"{n}.yaml")
        for n in (0, 1)
    )
    machines = start_machines(configs, (tmp_path / "cache",) * 2)
    outputs = [machine.communicate(timeout=300)[0] for machine in machines]
    assert all(machine.returncode != 0 for machine in machines)
    for output in map(flat, outputs):
        assert "1 of 2 processes" in output and "put output_dir on a filesystem every machine sees" in output, output[
            -3000:
        ]
        assert "Effective batch" not in output and TOKENIZING.search(output) is None


def test_readme_shows_the_command_each_machine_runs():
    """The README's multi-node command is the SLURM example's, which the tests above run."""
    command = machine_command()
    assert command.startswith("torchrun --nnodes") and "--rdzv_backend c10d" in command
    assert f"```bash\n{command}\n```" in (ROOT / "README.md").read_text()
