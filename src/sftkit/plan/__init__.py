"""`sftkit plan`: will the run fit, what schedule will it follow, how long will it take, what to change.

Answers in seconds with no GPU time spent and no weights downloaded: the model is built on the
`meta` device from its config (see `memory`), the data is tokenized like training does it, and the
schedule comes from the same functions the training loop uses.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch

from sftkit.config import ConfigError, SFTConfig
from sftkit.model.adapters import AdapterOptions
from sftkit.model.load import load_model_config, resolve_dtype
from sftkit.plan.advice import Setting, advise
from sftkit.plan.gpus import KNOWN_GPUS, Gpu, resolve_gpu
from sftkit.plan.memory import MemoryInputs, MetaModel, estimate_memory
from sftkit.plan.schedule import ScheduleInputs, plan_schedule
from sftkit.plan.throughput import (
    Throughput,
    attention_span,
    default_throughput,
    flops_per_token,
    probe_throughput,
)
from sftkit.train.forward import chunked_loss_is_exact

__all__ = ["build_plan", "run_plan"]

DEFAULT_GPU = KNOWN_GPUS["h100"]


QLORA_TIME_NOTE = (
    "QLoRA dequantises every 4-bit weight in each forward and backward, which costs time on a GPU; "
    "bench/qlora_vs_lora.py measures both methods' memory and step time on your machine"
)


def run_plan(
    config: SFTConfig,
    gpu: str | None = None,
    gpu_memory: str | None = None,
    num_gpus: int = 1,
    probe: bool = False,
    as_json: bool = False,
    console: Any = None,
) -> dict[str, Any]:
    """Build the plan and print it (rich tables, or JSON with `as_json`); returns the plan."""
    plan = build_plan(config, resolve_gpu(gpu, gpu_memory), num_gpus, probe)
    if as_json:
        print(json.dumps(plan, indent=2))
    else:
        from sftkit.plan.render import print_plan

        print_plan(plan, console)
    return plan


def build_plan(config: SFTConfig, gpu: Gpu | None, num_gpus: int = 1, probe: bool = False) -> dict[str, Any]:
    """Every figure of the plan as plain JSON-able values."""
    if num_gpus < 1:
        raise ConfigError(f"--num-gpus = {num_gpus}: must be at least 1")
    notes: list[str] = []
    if gpu is None:
        gpu = DEFAULT_GPU
        notes.append(f"no --gpu or --gpu-memory given: planned for one {gpu.name} ({gpu.memory_bytes / 2**30:.0f} GiB)")
    model_config = load_model_config(config.model_source, config.trust_remote_code)
    data, full_lengths, vocab_size = _read_data(config)

    # --- batch and schedule
    schedule_inputs = ScheduleInputs(
        micro_batch=config.per_device_train_batch_size,
        gradient_accumulation=config.gradient_accumulation_steps,
        num_gpus=num_gpus,
        learning_rate=config.learning_rate,
        finetuning=config.finetuning,
        scheduler=config.lr_scheduler_type,
        min_lr_ratio=config.min_lr_ratio,
        warmup_ratio=config.warmup_ratio or 0.0,
        warmup_steps=config.warmup_steps or 0,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
    )
    sequences = examples = None
    if "error" not in data and not (config.streaming or config.is_mixture):  # those run max_steps, not epochs
        examples = data["train_examples"]
        sequences = data["packed_sequences"] if config.packing else examples
    schedule = plan_schedule(schedule_inputs, sequences, examples)

    # --- memory
    weight_dtype = resolve_dtype(config.torch_dtype, config.bf16, config.fp16)
    autocast = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else None
    targets = config.lora_target_modules
    metas: dict[str, MetaModel] = {}

    def meta_for(finetuning: str) -> MetaModel:
        if finetuning not in metas:
            adapter = AdapterOptions(
                finetuning=finetuning,
                r=config.lora_r,
                alpha=config.lora_alpha,
                dropout=config.lora_dropout,
                target_modules=targets if isinstance(targets, str) else tuple(targets),
            )
            metas[finetuning] = MetaModel.build(
                model_config, weight_dtype, adapter, config.attn_implementation, vocab_size
            )
        return metas[finetuning]

    meta = meta_for(config.finetuning)
    exact = chunked_loss_is_exact(meta.model)
    chunked = exact if config.chunked_loss == "auto" else config.chunked_loss
    if chunked and not exact:
        notes.append(
            "chunked_loss: true is refused by training for this model (its logits are not a plain "
            "linear head); planned as set, but set chunked_loss: auto"
        )
    inputs = MemoryInputs(
        gradient_checkpointing=config.gradient_checkpointing,
        autocast_dtype=autocast,
        attn_implementation=config.attn_implementation,
        micro_batch=config.per_device_train_batch_size,
        seq_len=config.max_seq_length,
        chunked_loss=chunked,
        loss_chunk_size=config.loss_chunk_size,
        activation_offloading=config.activation_offloading,
    )
    estimate = estimate_memory(meta, inputs)
    fits = estimate.total <= gpu.memory_bytes
    changes = advise(
        Setting(inputs, config.finetuning, config.gradient_accumulation_steps),
        estimate.total,
        gpu.memory_bytes,
        meta_for,
        full_lengths,
    )
    adapters_trade_off = lora_against_qlora(
        config.finetuning, estimate.total, lambda ft: estimate_memory(meta_for(ft), inputs).total
    )

    # --- time
    span = attention_span(full_lengths, config.max_seq_length, config.attn_implementation)
    flops = flops_per_token(
        model_config, meta.params.total_params, span, config.finetuning, config.gradient_checkpointing
    )
    throughput: Throughput | None
    if probe:
        throughput = probe_throughput(
            model_config,
            config.finetuning,
            weight_dtype,
            config.max_seq_length,
            config.per_device_train_batch_size,
            flops,
        )
    else:
        throughput = default_throughput(gpu, flops, config.finetuning)
    tokens, tokens_note = _tokens_to_train(data, schedule, config.max_seq_length)
    hours = None
    if throughput is not None and tokens is not None:
        hours = tokens / (throughput.tokens_per_second * num_gpus) / 3600

    return {
        "model": {
            "name": config.model_name_or_path,
            "type": model_config.model_type,
            "parameters": meta.params.base_params,
            "trainable_parameters": meta.params.trainable_params,
            "finetuning": config.finetuning,
            "weight_dtype": str(weight_dtype).removeprefix("torch."),
            "attn_implementation": config.attn_implementation,
            "chunked_loss": inputs.chunked_loss,
        },
        "data": data,
        "schedule": {
            "micro_batch": config.per_device_train_batch_size,
            "gradient_accumulation": config.gradient_accumulation_steps,
            "num_gpus": num_gpus,
            "effective_batch": schedule.effective_batch,
            "sequences_per_epoch": schedule.sequences_per_epoch,
            "steps_per_epoch": schedule.steps_per_epoch,
            "total_steps": schedule.total_steps,
            "epochs": schedule.epochs,
            "warmup_steps": schedule.warmup_steps,
            "learning_rate": config.learning_rate,
            "lr_scheduler_type": config.lr_scheduler_type,
            "lr_points": schedule.lr_points,
            "warnings": schedule.warnings,
        },
        "memory": {
            "gpu": gpu.name,
            "gpu_bytes": gpu.memory_bytes,
            "parts": estimate.parts,
            "total_bytes": estimate.total,
            "held_at_peak": [name for name in estimate.parts if name in estimate.counted],
            "weights_by_dtype": meta.params.weights_by_dtype,
            "loss_bytes": estimate.loss,
            "activations_without_checkpointing": estimate.activations[False],
            "activations_with_checkpointing": estimate.activations[True],
            "gradient_checkpointing": config.gradient_checkpointing,
            "activation_offloading": config.activation_offloading,
            "activations_on_host": estimate.host_activations,
            "micro_batch": config.per_device_train_batch_size,
            "seq_len": config.max_seq_length,
        },
        "fits": fits,
        "lora_vs_qlora": adapters_trade_off,
        "changes": [{"change": c.what, "total_bytes": c.total, "fits": c.fits, "note": c.note} for c in changes],
        "time": {
            "tokens": tokens,
            "tokens_note": tokens_note,
            "flops_per_token": flops,
            "attention_span": span,
            "tokens_per_second_per_gpu": throughput.tokens_per_second if throughput else None,
            "throughput_source": throughput.source if throughput else "unknown GPU: give --gpu or --probe",
            "hours": hours,
        },
        "known_gpus": [
            {"gpu": g.name, "memory_bytes": g.memory_bytes, "fits": estimate.total <= g.memory_bytes}
            for g in KNOWN_GPUS.values()
        ],
        "notes": notes,
    }


def lora_against_qlora(finetuning: str, total: int, estimate_for: Callable[[str], int]) -> dict[str, Any] | None:
    """Both adapter methods' memory for the same step, and what QLoRA's saving costs in time."""
    if finetuning not in ("lora", "qlora"):
        return None
    other = "qlora" if finetuning == "lora" else "lora"
    totals = {finetuning: total, other: estimate_for(other)}
    return {"lora_bytes": totals["lora"], "qlora_bytes": totals["qlora"], "time": QLORA_TIME_NOTE}


def _read_data(config: SFTConfig) -> tuple[dict[str, Any], list[int] | None, int | None]:
    """(data inspect figures or {"error": why}, untruncated example lengths, tokenizer size)."""
    from sftkit.data.dataset import STREAMING_SAMPLE_ROWS, DataOptions, prepare_data
    from sftkit.data.inspect import data_stats
    from sftkit.data.template import resolve_chat_template
    from sftkit.model.load import load_tokenizer

    try:
        tokenizer = load_tokenizer(config.tokenizer_source, config.trust_remote_code)
    except (OSError, ValueError) as err:  # offline hub id, missing folder: the plan goes on without data
        return {"error": f"tokenizer could not be loaded: {err}"}, None, None
    try:
        template = resolve_chat_template(config.chat_template, tokenizer)
        sample_rows = STREAMING_SAMPLE_ROWS if config.streaming else None  # a stream is never read whole
        data = prepare_data(DataOptions.from_config(config, template, sample_rows), tokenizer)
    except (OSError, ValueError) as err:  # hub dataset offline, bad rows: said; the schedule uses max_steps
        return {"error": f"data could not be read: {err}"}, None, len(tokenizer)
    stats = data_stats(data, config.max_seq_length, config.per_device_train_batch_size)
    stats["efficiency"] = stats["packing_efficiency"] if config.packing else stats["padding_efficiency"]
    return stats, list(data.tokenized_train().dataset["full_length"]), len(tokenizer)


def _tokens_to_train(data: dict[str, Any], schedule: Any, max_seq_length: int) -> tuple[int | None, str]:
    """Token positions the GPUs process (padding included), and how they were counted."""
    if schedule.total_steps is None:
        return None, "unknown: no data and no max_steps"
    if "error" in data or not schedule.steps_per_epoch:
        tokens = schedule.total_steps * schedule.effective_batch * max_seq_length
        return tokens, "at most: steps × effective batch × max_seq_length (data not read)"
    per_epoch = data["total_tokens"] / data["efficiency"]
    epochs = schedule.total_steps / schedule.steps_per_epoch
    return round(per_epoch * epochs), "data tokens / packing or padding efficiency × epochs"
