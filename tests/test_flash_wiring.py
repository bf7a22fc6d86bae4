"""flash_attention_2 keeps packed examples apart at any micro-batch size.

transformers infers packing from position_ids only when batch size is 1
(`modeling_flash_attention_utils._is_packed_sequence`); at batch > 1 it attends each row as one causal
sequence unless it is given `cu_seq_lens_q/k` and `max_length_q/k`. Without a GPU, transformers' own
flash path runs here on CPU reference kernels with flash-attn's signatures, so what is tested is the
wiring: which kwargs reach the kernel and which kernel transformers then picks.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers import modeling_flash_attention_utils as fa_utils

from sftkit.data.collate import collate
from sftkit.train.forward import CausalLMLoss
from tests.train_helpers import worst_packed_vs_alone

VOCAB = 96


def _attend(q, k, v, scale, causal):
    """q (seq, heads, dim), k/v (seq, kv_heads, dim): plain softmax attention, K/V repeated for GQA."""
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q, k) * (scale or q.shape[-1] ** -0.5)
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def flash_attn_func(
    q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False
):
    """flash-attn's dense kernel: (batch, seq, heads, dim), each row one sequence."""
    return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal) for b in range(q.shape[0])])


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    deterministic=False,
):
    """flash-attn's varlen kernel: (tokens, heads, dim), one sequence per cu_seqlens span."""
    bounds = cu_seqlens_q.tolist()
    return torch.cat([_attend(q[s:e], k[s:e], v[s:e], softmax_scale, causal) for s, e in pairwise(bounds)])


@pytest.fixture
def flash_on_cpu(monkeypatch):
    """transformers' flash_attention_2 path with the reference kernels above in place of flash-attn."""
    monkeypatch.setattr(
        fa_utils,
        "_lazy_imports",
        lambda *args, **kwargs: (
            flash_attn_func,
            flash_attn_varlen_func,
            None,
            fa_utils._pad_input,
            fa_utils._unpad_input,
        ),
    )
    monkeypatch.setattr(fa_utils, "_loaded_implementation", None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    model.config._attn_implementation = "flash_attention_2"  # flash-attn itself is not installed here
    yield model
    monkeypatch.setattr(fa_utils, "_loaded_implementation", None)


def examples_of(lengths: list[int]) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]
    return [{"input_ids": x, "labels": x} for x in ids]


@pytest.mark.parametrize("micro_batch", [1, 4])
def test_flash_attention_2_packed_example_loss_equals_alone(flash_on_cpu, micro_batch):
    examples = examples_of([14, 9, 21, 6, 11, 17, 8, 12])
    rows = [examples[r::micro_batch] for r in range(micro_batch)]
    worst = worst_packed_vs_alone(CausalLMLoss(flash_on_cpu, "flash_attention_2", chunked=False), rows)
    print(f"flash_attention_2 wiring, micro-batch {micro_batch}: max relative loss difference {worst:.1e}")
    assert worst <= 1e-5


def test_position_ids_alone_leak_at_batch_above_one(flash_on_cpu):
    """Why the boundaries are passed: transformers' detection from position_ids skips batch > 1."""
    examples = examples_of([10, 12, 9, 13])
    batch = collate([examples[:2], examples[2:]], pad_token_id=0)
    with torch.no_grad():
        leaked = flash_on_cpu(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, 10:22]
        alone = flash_on_cpu(input_ids=torch.tensor([examples[1]["input_ids"]])).logits[0]
    assert (leaked - alone).abs().max().item() > 1e-3
