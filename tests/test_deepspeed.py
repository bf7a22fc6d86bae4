"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU (`accelerate launch` with the shipped configs, use_cpu: true, 2 processes
over gloo with DeepSpeed's CPU accelerator) really shard, train like one process, and resume from their
sharded checkpoint like the uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.train_helpers import final_weights, logged_losses, max_weight_difference, tiny_config, write_chat_data

pytest.importorskip("deepspeed")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
# The first run on a machine compiles DeepSpeed's shared-memory collective op (~/.cache/torch_extensions).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}


def train(tmp_path: Path, config, stage: int | None) -> None:
    """One process without a launcher (stage None), or the example config of ZeRO `stage` on 2 CPU processes."""
    path = tmp_path / f"{Path(config.output_dir).name}.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    command = [sys.executable, "-m", "sftkit.cli", "train", str(path)]
    if stage is not None:
        launch = yaml.safe_load((EXAMPLES / f"deepspeed-zero{stage}.yaml").read_text())
        launch.update(num_processes=2, use_cpu=True, mixed_precision="no")
        launch_path = tmp_path / f"zero{stage}_cpu.yaml"
        launch_path.write_text(yaml.safe_dump(launch))
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_path), *command[1:]]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def elements(path: Path) -> int:
    """Tensor elements in one of DeepSpeed's checkpoint files (a pickle this test wrote itself)."""
    import torch

    def count(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel()
        if isinstance(value, dict):
            return sum(count(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(count(v) for v in value)
        return 0

    return count(torch.load(path, map_location="cpu", weights_only=False))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir):
    """1 process × GA 4 over 4 steps of full fine-tuning: what each ZeRO stage must reproduce."""
    tmp_path = tmp_path_factory.mktemp("deepspeed")
    data = write_chat_data(tmp_path / "chat.jsonl", rows=40)
    common = dict(finetuning="full", max_steps=4, save_steps=2, lora_dropout=0.0, per_device_train_batch_size=2)
    train(tmp_path, tiny_config(tiny_model_dir, data, tmp_path / "one", gradient_accumulation_steps=4, **common), None)
    return tmp_path, data, common


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_cpu_shards_trains_like_one_process_and_resumes(stage, one_process, tiny_model_dir):
    tmp_path, data, common = one_process
    two, resumed = tmp_path / f"zero{stage}", tmp_path / f"zero{stage}-resumed"
    train(tmp_path, tiny_config(tiny_model_dir, data, two, gradient_accumulation_steps=2, **common), stage)

    parameters = sum(t.numel() for t in final_weights(tmp_path / "one").values())
    run_info = json.loads((two / "run.json").read_text())
    assert run_info["trainable_params"] == run_info["total_params"] == parameters  # counted whole under ZeRO-3 init
    shards = two / "checkpoint-2" / "sharded_state" / "pytorch_model"
    assert not (two / "checkpoint-2" / "model.safetensors").exists()
    optimizer = [elements(shards / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt") for rank in (0, 1)]
    models = {path.name: elements(path) for path in shards.glob("*model_states.pt")}
    print(f"ZeRO-{stage}: optimizer elements per rank {optimizer}, model files {models} (parameters: {parameters})")
    # fp32 master weights and both Adam moments, split in two (+ a step count each)
    assert sum(optimizer) >= 3 * parameters and max(optimizer) <= 0.51 * sum(optimizer)
    if stage == 3:  # the weights live only in the shards
        assert models == {f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt": 0 for rank in (0, 1)}
    else:  # ZeRO-2 keeps whole weights in every process, saved once
        assert models == {"mp_rank_00_model_states.pt": parameters}

    difference = max_weight_difference(final_weights(tmp_path / "one"), final_weights(two))
    print(f"ZeRO-{stage}: max |w_1proc - w_2proc| = {difference:.2e}")
    assert difference <= 1e-5  # the all-reduce vs in-process sum, through AdamW (as FSDP: tests/test_fsdp.py)
    one, sharded = logged_losses(tmp_path / "one"), logged_losses(two)
    assert one.keys() == sharded.keys() == {1, 2, 3, 4}
    for step in one:
        assert sharded[step] == pytest.approx(one[step], rel=1e-5)

    shutil.copytree(two, resumed)  # the run as a crash after checkpoint-2 leaves it
    for name in ("checkpoint-4", "model"):
        shutil.rmtree(resumed / name)
    config = tiny_config(
        tiny_model_dir, data, resumed, gradient_accumulation_steps=2, resume_from_checkpoint=True, **common
    )
    train(tmp_path, config, stage)
    difference = max_weight_difference(final_weights(two), final_weights(resumed))
    print(f"ZeRO-{stage}: max |w_uninterrupted - w_resumed| (from checkpoint-2) = {difference:.2e}")
    assert difference <= 1e-6
    straight, again = logged_losses(two), logged_losses(resumed)
    for step in (3, 4):
        assert again[step] == pytest.approx(straight[step], rel=1e-6)


def test_a_deepspeed_config_that_disagrees_with_the_run_is_refused():
    """DeepSpeed's own micro-batch size, accumulation and clipping are the run's, never silently another."""
    from sftkit.config import ConfigError
    from sftkit.train.distributed import fit_deepspeed_config

    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1, "zero_optimization": {}}
    fit_deepspeed_config(config, micro_batch_size=4, max_grad_norm=0.5)
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_clipping"] == 0.5
    with pytest.raises(ConfigError, match="gradient_accumulation_steps = 8, but this run needs 1"):
        fit_deepspeed_config({"gradient_accumulation_steps": 8}, micro_batch_size=4, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match=r"gradient_clipping = 1\.0, but this run needs 0\.3"):
        fit_deepspeed_config({"gradient_clipping": 1.0}, micro_batch_size=4, max_grad_norm=0.3)
    with pytest.raises(ConfigError, match="zero3_save_16bit_model: true"):
        fit_deepspeed_config({"zero_optimization": {"stage": 3}}, micro_batch_size=4, max_grad_norm=1.0)
