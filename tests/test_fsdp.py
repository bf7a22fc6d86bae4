"""FSDP2 on CPU (`accelerate launch`, use_cpu: true, 2 processes over gloo) really shards, trains like
one process, and resumes from its sharded checkpoint like the uninterrupted run."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.train_helpers import final_weights, logged_losses, max_weight_difference, tiny_config, write_chat_data

pytestmark = pytest.mark.slow

FSDP_CPU = {
    "compute_environment": "LOCAL_MACHINE",
    "distributed_type": "FSDP",
    "num_machines": 1,
    "num_processes": 2,
    "machine_rank": 0,
    "mixed_precision": "no",
    "use_cpu": True,
    "fsdp_config": {
        "fsdp_version": 2,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_cpu_ram_efficient_loading": False,
        "fsdp_offload_params": False,
        "fsdp_reshard_after_forward": True,
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
    },
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def train(tmp_path: Path, config, processes: int) -> None:
    path = tmp_path / f"{Path(config.output_dir).name}.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    if processes == 1:
        command = [sys.executable, "-m", "sftkit.cli", "train", str(path)]
    else:
        launch = tmp_path / "fsdp_cpu.yaml"
        launch.write_text(yaml.safe_dump(FSDP_CPU))
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(launch),
            "-m",
            "sftkit.cli",
            "train",
            str(path),
        ]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def elements_per_rank(shards: Path) -> Counter:
    """Parameter elements in each rank's file of a torch.distributed.checkpoint folder."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(shards)).read_metadata()
    per_file: Counter = Counter()
    for index, info in metadata.storage_data.items():
        entry = metadata.state_dict_metadata[index.fqn]
        if not hasattr(entry, "chunks"):  # optimizer step counts and param groups: bytes, not tensors
            continue
        chunk = next(c for c in entry.chunks if c.offsets == index.offset)
        per_file[info.relative_path] += math.prod(chunk.sizes)
    return per_file


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """1 process × GA 4 and 2 FSDP processes × GA 2 over the same 4 steps of full fine-tuning."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    data = write_chat_data(tmp_path / "chat.jsonl", rows=40)
    common = dict(finetuning="full", max_steps=4, save_steps=2, lora_dropout=0.0, per_device_train_batch_size=2)
    train(tmp_path, tiny_config(tiny_model_dir, data, tmp_path / "one", gradient_accumulation_steps=4, **common), 1)
    train(tmp_path, tiny_config(tiny_model_dir, data, tmp_path / "two", gradient_accumulation_steps=2, **common), 2)
    return tmp_path, data, common


def test_fsdp_on_cpu_shards_and_trains_like_one_process(runs):
    tmp_path, _, _ = runs
    checkpoint = tmp_path / "two" / "checkpoint-2"
    assert not (checkpoint / "model.safetensors").exists() and not (checkpoint / "optimizer.pt").exists()
    total = sum(t.numel() for t in final_weights(tmp_path / "one").values())
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        per_rank = elements_per_rank(checkpoint / "sharded_state" / part)
        print(f"{part}: elements per rank {dict(per_rank)} (model parameters: {total})")
        assert len(per_rank) == 2 and max(per_rank.values()) <= 0.51 * sum(per_rank.values())  # split, not replicated
    assert sum(elements_per_rank(checkpoint / "sharded_state" / "pytorch_model_fsdp_0").values()) == total
    difference = max_weight_difference(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))
    print(f"max |w_1proc - w_2proc FSDP| = {difference:.2e}")
    assert difference <= 1e-5
    one, two = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
    assert one.keys() == two.keys() == {1, 2, 3, 4}
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5)


def test_fsdp_sharded_checkpoint_resumes_to_the_uninterrupted_run(runs, tiny_model_dir):
    tmp_path, data, common = runs
    resumed = tmp_path / "resumed"  # the run as a crash after checkpoint-2 leaves it
    shutil.copytree(tmp_path / "two", resumed)
    for name in ("checkpoint-4", "model"):
        shutil.rmtree(resumed / name)
    train(
        tmp_path,
        tiny_config(
            tiny_model_dir, data, resumed, gradient_accumulation_steps=2, resume_from_checkpoint=True, **common
        ),
        2,
    )
    difference = max_weight_difference(final_weights(tmp_path / "two"), final_weights(resumed))
    print(f"max |w_uninterrupted - w_resumed| (FSDP, from checkpoint-2) = {difference:.2e}")
    assert difference <= 1e-6
    straight, again = logged_losses(tmp_path / "two"), logged_losses(resumed)
    for step in (3, 4):
        assert again[step] == pytest.approx(straight[step], rel=1e-6)
