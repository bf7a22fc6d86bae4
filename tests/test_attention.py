"""Packed attention is exact on every CPU path: each example's loss inside a pack equals its loss alone,
and a packed batch's gradient equals the padded batch's, at micro-batch 1 and 4, on GQA models shaped
like Llama and Qwen2. The CUDA kernels' wiring is checked through CPU stand-ins with their signatures."""

from __future__ import annotations

import importlib.util
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from sftkit.data.collate import collate, cu_seqlens
from sftkit.model import attention
from sftkit.train.forward import CausalLMLoss
from tests.train_helpers import worst_packed_vs_alone

IGNORE = -100
VOCAB = 96
LENGTHS = [23, 9, 31, 5, 17, 12, 28, 6]  # 8 examples; micro-batch 4 packs them two per row, uneven rows
PATHS = ["varlen", "sdpa", "eager"]


def tiny_model(shape: str, attn: str) -> torch.nn.Module:
    """2 layers, hidden 64, 4 query heads over 2 KV heads (GQA)."""
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    if shape == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif shape == "qwen2":  # biased q/k/v projections
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:  # mistral with a window shorter than the examples
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=8))
    model.set_attn_implementation(attn)
    return model


def examples_of(lengths: list[int], seed: int = 0) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * (n // 3) + ids[n // 3 :]})  # prompt-like masked prefix
    return out


def rows_of(examples: list[dict], micro_batch: int) -> list[list[dict]]:
    """Examples dealt round-robin into `micro_batch` packed rows."""
    return [examples[r::micro_batch] for r in range(micro_batch)]


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(1.0, abs(b))


@pytest.mark.parametrize("micro_batch", [1, 4])
@pytest.mark.parametrize("shape", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", PATHS)
def test_packed_example_loss_equals_its_loss_alone(attn, shape, micro_batch):
    loss_model = CausalLMLoss(tiny_model(shape, attn), attn, chunked=False)
    worst = worst_packed_vs_alone(loss_model, rows_of(examples_of(LENGTHS), micro_batch))
    print(f"{attn} {shape} micro-batch {micro_batch}: max relative loss difference packed vs alone {worst:.1e}")
    assert worst <= 1e-5


@pytest.mark.parametrize("micro_batch", [1, 4])
@pytest.mark.parametrize("shape", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", PATHS)
def test_packed_gradient_equals_padded_gradient(attn, shape, micro_batch):
    examples = examples_of(LENGTHS, seed=1)
    results = []
    for rows in (rows_of(examples, micro_batch), [[e] for e in examples]):
        loss_model = CausalLMLoss(tiny_model(shape, attn), attn, chunked=False)
        loss = loss_model(**collate(rows, pad_token_id=0))
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in loss_model.named_parameters()}))
    (packed_loss, packed), (padded_loss, padded) = results
    worst = max((packed[n] - padded[n]).abs().max().item() / max(padded[n].abs().max().item(), 1e-12) for n in padded)
    print(
        f"{attn} {shape} micro-batch {micro_batch}: loss {relative(packed_loss, padded_loss):.1e}, "
        f"max relative gradient difference packed vs padded {worst:.1e}"
    )
    assert relative(packed_loss, padded_loss) <= 1e-5 and worst <= 1e-5


def test_sliding_window_is_kept_inside_each_example():
    """A packed example on varlen gets the loss it gets alone under transformers' own sliding-window sdpa."""
    examples = examples_of([21, 14, 30])
    packed_model = CausalLMLoss(tiny_model("mistral", "varlen"), "varlen", chunked=False)
    plain = tiny_model("mistral", "sdpa")  # same weights (same seed); no packing, transformers' window mask
    packed = collate([examples], pad_token_id=0)
    with torch.no_grad():
        for s, example in enumerate(examples, start=1):
            ids = torch.tensor([example["input_ids"]])
            alone = F.cross_entropy(
                plain(input_ids=ids).logits[0, :-1],
                torch.tensor(example["labels"][1:]),
                ignore_index=IGNORE,
                reduction="sum",
            ).item()
            only_this = dict(packed, targets=packed["targets"].masked_fill(packed["segment_ids"] != s, IGNORE))
            assert relative(packed_model(**only_this).item(), alone) <= 1e-5
    # and the window matters here: without it the loss differs
    full = tiny_model("mistral", "sdpa")
    full.config.sliding_window = None
    with torch.no_grad():
        ids = torch.tensor([examples[2]["input_ids"]])
        assert (full(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max() > 1e-4


def test_cu_seqlens_cover_examples_and_each_rows_padding():
    assert cu_seqlens([[3, 2], [4]], width=6).tolist() == [0, 3, 5, 6, 10, 12]
    assert cu_seqlens([[6]], width=6).tolist() == [0, 6]
    batch = collate([examples_of([3, 2]), examples_of([4])], pad_token_id=0)
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 9, 10]  # rows padded to the longest (5)


# ---- the CUDA kernels' wiring, through CPU stand-ins that take their exact signatures


def reference_attention(query, key, value, cu, scale, left):
    """Plain softmax attention per span, K/V heads repeated: (tokens, heads, dim)."""
    outputs = []
    for start, end in pairwise(cu.tolist()):
        q, k, v = query[start:end], key[start:end], value[start:end]
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q, k) * (scale or q.shape[-1] ** -0.5)
        offset = torch.arange(end - start)[:, None] - torch.arange(end - start)[None, :]
        visible = (offset >= 0) & ((offset <= left) if left >= 0 else True)
        outputs.append(torch.einsum("hqk,khd->qhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v))
    return torch.cat(outputs)


def flash_attn_varlen_stand_in(
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
    **kwargs,
):
    assert causal and window_size[1] == 0 and dropout_p == 0.0 and torch.equal(cu_seqlens_q, cu_seqlens_k)
    assert max_seqlen_q == (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()
    return reference_attention(q, k, v, cu_seqlens_q, softmax_scale, window_size[0])


def torch_varlen_attn_stand_in(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False, **kwargs
):
    assert window_size[1] == 0, "(left, 0) is causal in torch's varlen_attn"
    assert enable_gqa == (query.shape[1] != key.shape[1]) and max_q == (cu_seq_q[1:] - cu_seq_q[:-1]).max()
    return reference_attention(query, key, value, cu_seq_q, scale, window_size[0])


@pytest.mark.parametrize("kernel", ["flash_attn", "torch_varlen_attn"])
@pytest.mark.parametrize("window", [None, 5])
def test_gpu_kernel_wiring_matches_sdpa_per_example(monkeypatch, kernel, window):
    monkeypatch.setattr(attention, "_gpu_kernels_apply", lambda query: True)
    monkeypatch.setattr(
        attention, "_flash_attn_varlen", lambda: flash_attn_varlen_stand_in if kernel == "flash_attn" else None
    )
    monkeypatch.setattr(attention, "_torch_varlen_attn", lambda: torch_varlen_attn_stand_in)
    torch.manual_seed(0)
    cu = cu_seqlens([[7, 12], [9, 3]], width=19)
    query, key, value = torch.randn(38, 4, 16), torch.randn(38, 2, 16), torch.randn(38, 2, 16)
    out = attention.varlen_kernel(query, key, value, cu, 12, 0.3, window, 0.0)
    expected = attention.sdpa_per_example(query, key, value, cu.tolist(), 0.3, window, 0.0)
    assert (out - expected).abs().max().item() <= 1e-5


def torch_2_11_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """torch 2.11's signature: a causal window, but no `enable_gqa` (query and key/value heads must match)."""
    assert query.shape[1] == key.shape[1] == value.shape[1], "torch 2.11's varlen_attn has no GQA"
    return reference_attention(query, key, value, cu_seq_q, scale, window_size[0])


@pytest.mark.parametrize("window", [None, 5])
def test_torch_varlen_attn_without_gqa_gets_repeated_kv_heads(monkeypatch, window):
    """On torch 2.11 (no `enable_gqa`) grouped key/value heads are repeated for the kernel, with the same result."""
    import torch.nn.attention.varlen

    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", torch_2_11_varlen_attn)
    monkeypatch.setattr(attention, "_gpu_kernels_apply", lambda query: True)
    monkeypatch.setattr(attention, "_flash_attn_varlen", lambda: None)
    attention._torch_varlen_attn.cache_clear()
    try:
        torch.manual_seed(0)
        cu = cu_seqlens([[7, 12], [9, 3]], width=19)
        query, key, value = torch.randn(38, 6, 16), torch.randn(38, 2, 16), torch.randn(38, 2, 16)
        out = attention.varlen_kernel(query, key, value, cu, 12, 0.3, window, 0.0)
    finally:
        attention._torch_varlen_attn.cache_clear()
    expected = attention.sdpa_per_example(query, key, value, cu.tolist(), 0.3, window, 0.0)
    assert (out - expected).abs().max().item() <= 1e-5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("window", [None, 64])
def test_cuda_varlen_kernel_matches_sdpa_per_example(window):
    torch.manual_seed(0)
    cu = cu_seqlens([[700, 300, 24], [512, 512]], width=1024).cuda()
    query, key, value = (torch.randn(2048, h, 128, device="cuda", dtype=torch.bfloat16) for h in (32, 8, 8))
    out = attention.varlen_kernel(query, key, value, cu, 700, None, window, 0.0)
    expected = attention.sdpa_per_example(query.float(), key.float(), value.float(), cu.tolist(), None, window, 0.0)
    assert (out.float() - expected).abs().max().item() <= 2e-2  # bf16 inputs


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "attn",
    [
        "varlen",
        "sdpa",
        pytest.param(
            "flash_attention_2",
            marks=pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn not installed"),
        ),
    ],
)
def test_cuda_packed_loss_equals_alone_in_bf16(attn):
    loss_model = CausalLMLoss(tiny_model("llama", attn).cuda().to(torch.bfloat16), attn, chunked=False)
    assert worst_packed_vs_alone(loss_model, rows_of(examples_of(LENGTHS), 4)) <= 2e-2  # bf16 rounding per layout
