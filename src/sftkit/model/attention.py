"""Packed attention: per-example boundaries → the kernel call of each backend.

A packed micro-batch holds several examples per row; none may attend to another. The collator gives
the boundaries of every example over the flattened batch (`cu_seqlens`, as flash-attn names them),
and this module turns them into what each backend needs:

    row 0   a a a b b p        cu_seqlens = [0, 3, 5, 6, 10, 12]   (p: the row's padding, its own span)
    row 1   c c c c d d        max_length = 4

    varlen              our kernel (registered with transformers' AttentionInterface):
                        CUDA: flash-attn's varlen kernel when installed, else torch's `varlen_attn`;
                        CPU (and fp32 CUDA): causal SDPA per example.
                        Cost Σ l² per layer, never seq²; no mask is built; K/V keep their own head
                        count (the kernels group query heads themselves: enable_gqa, flash-attn GQA).
    flash_attention_2/3 the same `cu_seq_lens_q/k`, `max_length_q/k` kwargs, so transformers runs its
                        varlen path at any micro-batch size (it infers packing from position_ids only at
                        batch 1 and otherwise attends each row as one sequence)
    flex_attention      a BlockMask (same example and causal), GPU only: flex has no CPU backward
    sdpa / eager        a dense (batch, 1, seq, seq) mask: seq² bytes and scores; the reference in tests

Sliding-window models keep their window on the varlen path: the kernel gets the layer's
`sliding_window` and applies it inside each example.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from sftkit.model.load import transformers_model

VARLEN = "varlen"
# Kernels that compute Σ l² scores per example and take no seq × seq mask.
MASK_FREE = (VARLEN, "flash_attention_2", "flash_attention_3", "flex_attention")


def boundary_kwargs(cu: torch.Tensor) -> dict[str, Any]:
    """The kwargs transformers forwards to every attention layer (the names of `FlashAttentionKwargs`)."""
    longest = int((cu[1:] - cu[:-1]).max())  # one host sync per forward, not per layer
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def flex_block_mask(segment_ids: torch.Tensor) -> Any:
    """A FlexAttention BlockMask for the same rule; only blocks holding a visible pair are computed."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_example_causal(batch: Any, head: Any, query: Any, key: Any) -> Any:
        return (segment_ids[batch, query] == segment_ids[batch, key]) & (key <= query)

    batch, seq = segment_ids.shape
    return create_block_mask(same_example_causal, batch, None, seq, seq, device=segment_ids.device)


def _window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """(length, length) bool: causal and at most `window` keys back (the key itself included)."""
    offset = torch.arange(length, device=device)[:, None] - torch.arange(length, device=device)[None, :]
    return (offset >= 0) & (offset < window)


def sdpa_per_example(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu: list[int],
    scale: float | None,
    window: int | None,
    dropout: float,
) -> torch.Tensor:
    """Causal SDPA on each span of the flattened tokens; exact, Σ l² scores.

    query (tokens, heads, dim); key/value (tokens, kv_heads, dim) → (tokens, heads, dim).
    """
    gqa = query.shape[1] != key.shape[1]
    outputs = []
    for start, end in pairwise(cu):
        q, k, v = (x[start:end].transpose(0, 1)[None] for x in (query, key, value))  # (1, heads, l, dim)
        mask = _window_mask(end - start, window, q.device) if window and end - start > window else None
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout, scale=scale, enable_gqa=gqa
        )
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs)


def _flash_attn_varlen() -> Any:
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


@functools.cache
def _torch_varlen_attn() -> Any:
    """torch's varlen_attn where it takes a causal window (`window_size`), else None (torch < 2.11: SDPA per
    example). Where it cannot share key/value heads (no `enable_gqa`, torch 2.11), the heads are repeated."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if "window_size" not in parameters:
        return None
    if "enable_gqa" in parameters:
        return varlen_attn

    def repeating_kv_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
        if kwargs.pop("enable_gqa", False):
            group = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        return varlen_attn(query, key, value, *args, **kwargs)

    return repeating_kv_heads


def _gpu_kernels_apply(query: torch.Tensor) -> bool:
    """flash-attn and torch's varlen_attn run on CUDA in half precision only."""
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)


def varlen_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu: torch.Tensor,
    longest: int,
    scale: float | None,
    window: int | None,
    dropout: float,
) -> torch.Tensor:
    """One layer's attention over the flattened tokens: query (tokens, heads, dim), key/value
    (tokens, kv_heads, dim) → (tokens, heads, dim), on the best kernel present."""
    left = window - 1 if window else -1  # keys visible behind the query: `window` keys including itself
    if _gpu_kernels_apply(query):
        if (flash := _flash_attn_varlen()) is not None:  # GQA is native in flash-attn
            return flash(
                query,
                key,
                value,
                cu,
                cu,
                longest,
                longest,
                dropout_p=dropout,
                softmax_scale=scale,
                causal=True,
                window_size=(left, 0),
            )
        if (varlen := _torch_varlen_attn()) is not None and dropout == 0.0:  # (left, 0): causal
            return varlen(
                query,
                key,
                value,
                cu,
                cu,
                longest,
                longest,
                scale=scale,
                window_size=(left, 0),
                enable_gqa=query.shape[1] != key.shape[1],
            )
    return sdpa_per_example(query, key, value, cu.tolist(), scale, window, dropout)


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query (batch, heads, seq, dim), key/value (batch, kv_heads, seq, dim)
    → ((batch, seq, heads, dim), None)."""
    if softcap is not None or kwargs.get("s_aux") is not None:
        raise ValueError(
            "attn_implementation = 'varlen' does not support attention soft-capping or sinks "
            "(this model uses them); set attn_implementation: eager"
        )
    batch, heads, seq, _ = query.shape
    if cu_seq_lens_q is None:  # no boundaries given: each row is one causal sequence (e.g. a plain forward)
        if key.shape[2] != seq:
            raise ValueError(
                "attn_implementation = 'varlen' is for training without a KV cache; generation "
                "switches the model to sdpa (see sftkit.model.attention.generation_attention)"
            )
        cu_seq_lens_q = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=query.device)
        max_length_q = seq
    elif max_length_q is None:
        raise ValueError("attn_implementation = 'varlen': cu_seq_lens_q came without max_length_q")
    q, k, v = (x.transpose(1, 2).reshape(batch * seq, x.shape[1], x.shape[3]) for x in (query, key, value))
    out = varlen_kernel(
        q, k, v, cu_seq_lens_q, int(max_length_q), scaling, sliding_window, dropout if module.training else 0.0
    )  # (tokens, heads, dim)
    return out.reshape(batch, seq, heads, value.shape[-1]), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The varlen path needs no mask: boundaries travel as kwargs."""
    return None


AttentionInterface.register(VARLEN, varlen_attention_forward)
AttentionMaskInterface.register(VARLEN, _no_mask)


@contextmanager
def generation_attention(model: nn.Module) -> Iterator[None]:
    """Run `generate` with sdpa (KV cache, padding mask), then switch back to varlen.

    The varlen kernel serves training forwards, which carry per-example boundaries and no cache.
    """
    model = transformers_model(model)
    switch = model.config._attn_implementation == VARLEN
    if switch:
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(VARLEN)
