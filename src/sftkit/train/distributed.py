"""The Accelerator of a run, with FSDP and DeepSpeed honoured on CPU, and DeepSpeed fitted to the run.

accelerate turns an FSDP or DeepSpeed config into FSDP or DeepSpeed only on GPU-like devices: with
`use_cpu: true` its state stays MULTI_CPU (accelerate/state.py sets FSDP only for MULTI_GPU, MULTI_NPU,
..., and DeepSpeed only when `cpu` is false), so `prepare` wraps the model in DDP. A run launched with
such a config on CPU then trains full replicas and writes unsharded checkpoints while the config says
it shards. torch's FSDP2 (`fully_shard`) runs on CPU over gloo, and so does DeepSpeed with its CPU
accelerator (`DS_ACCELERATOR=cpu`; gloo unless oneCCL's torch bindings are installed), so when the
launcher asks for either on CPU we set the distributed type accelerate would have set on GPU;
`prepare`, `save_state`, `load_state` and `get_state_dict` then take their FSDP or DeepSpeed paths.

DeepSpeed also takes the micro-batch size, gradient accumulation and gradient clipping from its own
config: the run's values are written there (sftkit accumulates micro-batches itself, so DeepSpeed's
accumulation is 1), and a DeepSpeed config that says otherwise is refused rather than overridden.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import (
    DeepSpeedPlugin,
    DistributedType,
    FullyShardedDataParallelPlugin,
    broadcast_object_list,
    gather_object,
)

from sftkit.config import ConfigError
from sftkit.train.errors import TrainingError


def _requested_on_cpu(variable: str) -> bool:
    """`accelerate launch` set `variable` (its FSDP or DeepSpeed switch), several processes and no CUDA."""
    return (
        not torch.cuda.is_available()
        and os.environ.get(variable, "false").lower() == "true"
        and int(os.environ.get("WORLD_SIZE", "1")) > 1
    )


def fsdp_requested_on_cpu() -> bool:
    """`accelerate launch` with an FSDP config, several processes and no CUDA."""
    return _requested_on_cpu("ACCELERATE_USE_FSDP")


def make_accelerator(mixed_precision: str, micro_batch_size: int, max_grad_norm: float) -> Accelerator:
    """cpu=True without CUDA so `torchrun`/`accelerate launch` on CPU machines form a gloo process group."""
    on_cpu = not torch.cuda.is_available()
    deepspeed_on_cpu = _requested_on_cpu("ACCELERATE_USE_DEEPSPEED")
    # The plugin reads the launcher's ACCELERATE_DEEPSPEED_* settings; on CPU accelerate would not build it.
    plugin = DeepSpeedPlugin() if deepspeed_on_cpu else None
    accelerator = Accelerator(cpu=on_cpu, mixed_precision=mixed_precision, deepspeed_plugin=plugin)
    if fsdp_requested_on_cpu():
        fsdp = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* settings
        if fsdp.fsdp_version != 2:
            raise ValueError("FSDP on CPU needs fsdp_version: 2 in the accelerate config (FSDP1 has no CPU support)")
        if mixed_precision != "no":
            fsdp.set_mixed_precision(mixed_precision)
        _set_distributed_type(DistributedType.FSDP)
        AcceleratorState._shared_state["fsdp_plugin"] = fsdp
    elif plugin is not None:
        plugin.set_mixed_precision(mixed_precision)
        plugin.select(_from_accelerator_state=True)
        _set_distributed_type(DistributedType.DEEPSPEED)
        AcceleratorState._shared_state["deepspeed_plugins"] = plugin
        AcceleratorState._shared_state["_mixed_precision"] = "no"  # DeepSpeed's own config holds the precision
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        fit_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, micro_batch_size, max_grad_norm)
    return accelerator


def _set_distributed_type(kind: DistributedType) -> None:
    # AcceleratorState copies PartialState's fields on every construction: set both.
    PartialState._shared_state["distributed_type"] = kind
    AcceleratorState._shared_state["distributed_type"] = kind


def fit_deepspeed_config(config: dict[str, Any], micro_batch_size: int, max_grad_norm: float) -> None:
    """Write the run's micro-batch size, accumulation (1: sftkit accumulates) and clipping into DeepSpeed's
    config where it leaves them unset or `auto`; a value that disagrees is an error naming the key.

    accelerate would otherwise ask for a DataLoader to learn the micro-batch size (the run has none) and
    clip at 1.0 whatever `max_grad_norm` says; DeepSpeed accumulating too would scale every micro-batch's
    loss and step on its own count of micro-batches."""
    wanted = {
        "train_micro_batch_size_per_gpu": (micro_batch_size, "per_device_train_batch_size in the run config"),
        "gradient_accumulation_steps": (1, "sftkit accumulates micro-batches itself (gradient_accumulation_steps)"),
        "gradient_clipping": (max_grad_norm, "max_grad_norm in the run config; 0 disables it in both"),
    }
    for key, (value, why) in wanted.items():
        given = config.get(key, "auto")
        if given != "auto" and given != value:
            raise ConfigError(
                f"DeepSpeed config: {key} = {given}, but this run needs {value} ({why}); "
                f"set {key}: auto (or {value}) in the DeepSpeed config"
            )
        config[key] = value
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage == 3 and not config["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False):
        raise ConfigError(
            "DeepSpeed config: ZeRO-3 with zero3_save_16bit_model: false cannot gather the final model from "
            "its shards; set zero3_save_16bit_model: true in the accelerate config "
            "(stage3_gather_16bit_weights_on_model_save in a DeepSpeed JSON)"
        )


def is_sharded(accelerator: Accelerator) -> bool:
    """Weights and optimizer state are split over processes: checkpoints go through accelerate's save_state."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


@contextmanager
def main_process_first_on_each_machine(accelerator: Accelerator) -> Iterator[None]:
    """The body runs in the main process first, then in the first process of each other machine, then in
    the other processes: data are tokenized once per job where the `datasets` cache is on a filesystem
    every machine sees, once per machine where it is not.

    The main process tokenizes into the cache. The first process of another machine then looks up the
    same cache key (the rows, the tokenizer, the options): on a shared filesystem it finds the main
    process's Arrow files and reads them; on a disk of its own it finds nothing and tokenizes, once for
    its machine. The machine's other processes then read whichever copy their machine sees. On one
    machine the second turn is empty: the main process, then the others.
    """
    if accelerator.num_processes == 1:
        yield
        return
    turn = 0 if accelerator.is_main_process else 1 if accelerator.is_local_main_process else 2
    for this in range(3):  # every process passes the same two barriers between the turns
        if this == turn:
            yield
        if this < 2:
            accelerator.wait_for_everyone()


def require_shared_output_dir(accelerator: Accelerator, output_dir: Path, patience_s: float = 5.0) -> None:
    """Wait until the main process has prepared `output_dir`, then check that every process sees it.

    Every process writes its part of each checkpoint into `output_dir` and reads all of it back when
    resuming, so on several machines it must be one directory on a filesystem they all see. The main
    process leaves a probe file there, named afresh for this run; a process that does not find it
    (within `patience_s`, for network filesystems that show new files late) fails the run now, in
    every process, instead of at the first checkpoint.
    """
    if accelerator.num_processes == 1:
        return
    name = broadcast_object_list([f".shared-{uuid.uuid4().hex}" if accelerator.is_main_process else None])[0]
    probe = output_dir / name
    if accelerator.is_main_process:
        probe.touch()
    accelerator.wait_for_everyone()
    deadline = time.monotonic() + patience_s
    while not probe.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    blind = gather_object([None if probe.exists() else socket.gethostname()])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        probe.unlink()
    missing = [host for host in blind if host is not None]
    if missing:
        raise TrainingError(
            f"output_dir {output_dir}: {len(missing)} of {accelerator.num_processes} processes (on "
            f"{', '.join(sorted(set(missing)))}) do not see the directory the main process prepared; every "
            "process writes its part of each checkpoint there, so put output_dir on a filesystem every machine sees"
        )
