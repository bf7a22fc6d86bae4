"""The model side of a run, set up from the config: base weights, adapters and what trains them.

load (dtype, attention, 4-bit for QLoRA) → adapters (LoRA variant, trainable token rows)
  → NEFTune noise → compiled decoder layers → which loss path is exact
  → loss module, optimizer, schedule (prepared by accelerate for DDP/FSDP) → activation offloading
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from sftkit.config import SFTConfig
from sftkit.model.adapters import AdapterOptions, LoraVariant, apply_adapters, initial_adapter_state, parameter_counts
from sftkit.model.compile import compile_decoder_layers
from sftkit.model.load import ModelError, load_model, resolve_dtype
from sftkit.model.neftune import add_neftune_noise
from sftkit.model.quantize import quantization_config
from sftkit.model.tokens import resolve_trainable_tokens
from sftkit.train.forward import CausalLMLoss, chunked_loss_is_exact
from sftkit.train.offload import activation_offloading
from sftkit.train.optim import build_optimizer
from sftkit.train.run_data import RunData
from sftkit.train.schedule import build_scheduler


@dataclass
class RunModel:
    model: nn.Module  # the model itself (PEFT-wrapped with adapters), never the DDP/FSDP wrapper
    initial_adapter: Any  # PiSSA/OLoRA: the adapter at init, to save the trained one against the original base
    token_ids: tuple[int, ...]  # token rows LoRA trains in the embedding and the head
    trainable: int
    total: int
    chunked: bool  # the chunked cross-entropy (never all logits at once) is exact for this model
    loss_module: nn.Module  # CausalLMLoss around `model`, as accelerate prepared it (DDP/FSDP wrapper)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    offload: AbstractContextManager | None  # where the forward keeps what backward needs (activation offloading)


def load_run_model(
    config: SFTConfig, tokenizer: Any, template: str, accelerator: Accelerator, data: RunData, tell: Callable
) -> RunModel:
    """The model with its adapters, and the loss, optimizer and schedule that train it for `data.total_steps`."""
    model, initial_adapter, token_ids, chunked = _load_model(config, tokenizer, template)
    loss_module = CausalLMLoss(
        model, config.attn_implementation, chunked, config.loss_chunk_size, len(data.feed.sources)
    )
    optimizer = build_optimizer(
        model, config.learning_rate, config.weight_decay, (config.adam_beta1, config.adam_beta2), config.adam_epsilon
    )
    scheduler = build_scheduler(
        optimizer, data.total_steps, data.warmup_steps, config.lr_scheduler_type, config.min_lr_ratio
    )
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    loss_module.train()  # dropout and NEFTune noise on: from_pretrained returns the model in eval mode
    offload = activation_offloading(config.activation_offloading, tell=tell)
    return RunModel(
        model, initial_adapter, token_ids, *parameter_counts(model), chunked, loss_module, optimizer, scheduler, offload
    )


def _load_model(config: SFTConfig, tokenizer: Any, template: str) -> tuple[nn.Module, Any, tuple[int, ...], bool]:
    model = load_model(
        config.model_source,
        resolve_dtype(config.torch_dtype, config.bf16, config.fp16),
        config.attn_implementation,
        config.trust_remote_code,
        quantization_config() if config.finetuning == "qlora" else None,
        vocab_size=len(tokenizer),
    )
    variant = LoraVariant(
        config.use_dora, config.use_rslora, tuple(config.lora_modules_to_save or ()), config.init_lora_weights
    )
    # full fine-tuning trains every token row already: `auto` has nothing to add there
    token_ids = (
        ()
        if config.finetuning == "full"
        else tuple(resolve_trainable_tokens(config.trainable_tokens, template, tokenizer))
    )
    targets = config.lora_target_modules
    model = apply_adapters(
        model,
        AdapterOptions(
            config.finetuning,
            config.lora_r,
            config.lora_alpha,
            config.lora_dropout,
            tuple(targets) if isinstance(targets, list) else targets,
            config.gradient_checkpointing,
            variant=variant,
            trainable_token_ids=token_ids,
        ),
    )
    initial_adapter = initial_adapter_state(model, variant)
    if config.neftune_noise_alpha:
        add_neftune_noise(model, config.neftune_noise_alpha)  # active in train mode only
    if config.torch_compile:
        compile_decoder_layers(model)  # compiled on the first step's forward
    chunked = chunked_loss_is_exact(model) if config.chunked_loss == "auto" else config.chunked_loss
    if chunked and not chunked_loss_is_exact(model):
        raise ModelError(
            "chunked_loss = true, but this model's logits are not a plain linear head "
            "(bias, scaling or soft-capping); set chunked_loss: auto"
        )
    return model, initial_adapter, token_ids, chunked
