"""The Accelerator of a run, with FSDP honoured on CPU.

accelerate turns an FSDP config into FSDP only on GPU-like devices: with `use_cpu: true` its state
stays MULTI_CPU (accelerate/state.py sets FSDP only for MULTI_GPU, MULTI_NPU, ...), so `prepare`
wraps the model in DDP. A run launched with an FSDP config on CPU then trains full replicas and
writes unsharded checkpoints while the config says it shards. torch's FSDP2 (`fully_shard`) runs on
CPU over gloo, so when the launcher asks for FSDP2 on CPU we set the distributed type accelerate
would have set on GPU; `prepare`, `save_state`, `load_state` and `get_state_dict` then take their
FSDP paths, and each process holds 1/world of every sharded parameter.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


def fsdp_requested_on_cpu() -> bool:
    """`accelerate launch` with an FSDP config, several processes and no CUDA."""
    return (
        not torch.cuda.is_available()
        and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        and int(os.environ.get("WORLD_SIZE", "1")) > 1
    )


def make_accelerator(mixed_precision: str) -> Accelerator:
    """cpu=True without CUDA so `torchrun`/`accelerate launch` on CPU machines form a gloo process group."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision)
    if fsdp_requested_on_cpu():
        plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* settings
        if plugin.fsdp_version != 2:
            raise ValueError("FSDP on CPU needs fsdp_version: 2 in the accelerate config (FSDP1 has no CPU support)")
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)
        # AcceleratorState copies PartialState's fields on every construction: set both.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["fsdp_plugin"] = plugin
    return accelerator


def is_sharded(accelerator: Accelerator) -> bool:
    """Weights and optimizer state are split over processes: checkpoints go through accelerate's save_state."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
