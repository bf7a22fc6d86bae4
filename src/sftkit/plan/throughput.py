"""Training FLOPs per token, the rough default throughput of a GPU, and a probe that measures one.

FLOPs per trained-on token (the usual 2 × params per matmul, forward):

    forward   2 × (linear parameters, head included) + 2 × layers × span × attention width
              (q·kᵀ and p·v, 4 × … halved by the causal mask), where span is the number of keys a
              token's row of scores has on average: Σ l² / Σ l over the examples for the kernels
              that attend per example (varlen, flash, flex), the row width for a dense mask
    backward  2 × forward for full fine-tuning (input and weight gradients); 1 × forward with
              adapters (input gradients only; the adapters' own are negligible)
    + 1 × forward again when gradient checkpointing recomputes the layers
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch

from sftkit.plan.gpus import DEFAULT_MFU, QLORA_MFU, Gpu


@dataclass(frozen=True)
class Throughput:
    tokens_per_second: float  # per GPU
    source: str  # what was measured, or that it is a default


def attention_span(lengths: list[int] | None, max_seq_length: int, attn_implementation: str) -> float:
    """Average keys per query row that the kernel computes: Σ l² / Σ l per example for the mask-free
    kernels (the cost of a pack is the sum of its examples' costs), max_seq_length for a dense mask
    (or when the data is unknown). Linear in the number of examples."""
    from sftkit.model.attention import MASK_FREE

    if not lengths or attn_implementation not in MASK_FREE:
        return float(max_seq_length)
    clipped = [min(n, max_seq_length) for n in lengths]
    return sum(n * n for n in clipped) / sum(clipped)


def flops_per_token(
    model_config: Any, total_params: int, span: float, finetuning: str, gradient_checkpointing: bool
) -> float:
    """`span`: keys per query row (see `attention_span`); the sequence length for one unpacked row."""
    embedding = model_config.vocab_size * model_config.hidden_size
    linear = total_params - embedding  # the input embedding is a lookup, not a matmul
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    forward = 2 * linear + 2 * model_config.num_hidden_layers * span * heads * head_dim
    backward = 2 * forward if finetuning == "full" else forward
    return forward + backward + (forward if gradient_checkpointing else 0)


def default_throughput(gpu: Gpu, flops: float, finetuning: str) -> Throughput | None:
    if gpu.bf16_tflops is None:
        return None
    mfu = QLORA_MFU if finetuning == "qlora" else DEFAULT_MFU
    return Throughput(
        gpu.bf16_tflops * 1e12 * mfu / flops,
        f"rough default: {gpu.name} bf16 peak {gpu.bf16_tflops:g} TFLOP/s × {mfu:.0%} utilisation "
        "(measure with --probe)",
    )


@dataclass(frozen=True)
class ProbeShape:
    """What the probe runs: the model shape (maybe reduced), batch and sequence."""

    layers: int
    hidden: int | None  # None: the model's own width
    vocab: int | None
    micro_batch: int
    seq_len: int


def probe_throughput(
    model_config: Any,
    finetuning: str,
    weight_dtype: torch.dtype,
    seq_len: int,
    micro_batch: int,
    flops_full: float,
    steps: int = 3,
) -> Throughput:
    """Time a few real forward + backward + AdamW steps on this machine, with random weights.

    On a GPU the model keeps its shape (if it does not fit, the probe says so); on a CPU it is
    shrunk to 2 layers, width ≤ 256, vocab ≤ 8k, 1 × 128 tokens, and the FLOP rate it achieves is
    converted to tokens/s of the real model. A CPU figure says nothing about a GPU: it is shown so
    that the pipeline can be checked, never as a GPU estimate.
    """
    from transformers import AutoModelForCausalLM

    from sftkit.model.adapters import AdapterOptions, apply_adapters

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = copy.deepcopy(model_config)
    if device == "cpu":
        hidden = min(256, config.hidden_size)
        shape = ProbeShape(
            layers=min(2, config.num_hidden_layers),
            hidden=hidden,
            vocab=min(8192, config.vocab_size),
            micro_batch=1,
            seq_len=min(128, seq_len),
        )
        scale = hidden / config.hidden_size
        config.num_hidden_layers, config.vocab_size = shape.layers, shape.vocab
        config.hidden_size = hidden
        config.intermediate_size = max(8, int(config.intermediate_size * scale))
        heads = max(1, int(config.num_attention_heads * scale))
        kv_heads = max(1, int(getattr(config, "num_key_value_heads", heads) * scale))
        config.num_attention_heads, config.num_key_value_heads = heads, min(kv_heads, heads)
        config.head_dim = hidden // heads
        dtype = torch.float32
    else:
        shape = ProbeShape(config.num_hidden_layers, None, None, micro_batch, seq_len)
        dtype = weight_dtype
    method = "lora" if finetuning == "qlora" else finetuning  # 4-bit needs bitsandbytes; timed as LoRA
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = apply_adapters(model, AdapterOptions(finetuning=method)).to(device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    input_ids = torch.randint(0, config.vocab_size, (shape.micro_batch, shape.seq_len), device=device)
    elapsed = 0.0
    for step in range(steps + 1):  # the first step warms up kernels and allocates optimizer state
        start = time.perf_counter()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            elapsed += time.perf_counter() - start
    tokens = steps * shape.micro_batch * shape.seq_len
    total_params = sum(p.numel() for p in model.parameters())
    probe_flops = flops_per_token(config, total_params, shape.seq_len, method, False)
    achieved = probe_flops * tokens / elapsed  # FLOP/s on this machine
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    what = (
        f"{shape.layers} layers"
        if shape.hidden is None
        else f"a {shape.layers}-layer, width-{shape.hidden}, vocab-{shape.vocab} copy"
    )
    source = (
        f"measured on {name} ({device}): {what}, {method}, batch {shape.micro_batch} × {shape.seq_len}, "
        f"{steps} steps, {achieved / 1e9:.1f} GFLOP/s achieved, converted to this model's FLOPs per token"
    )
    return Throughput(achieved / flops_full, source)
