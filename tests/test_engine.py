"""The math of the engine: packed attention never leaks, GA is one big batch, the LR schedule is the formula."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from sftkit.data.collate import collate
from sftkit.model.adapters import AdapterOptions, apply_adapters
from sftkit.model.load import load_model, load_tokenizer
from sftkit.train.forward import CausalLMLoss
from sftkit.train.schedule import build_scheduler, lr_multiplier, warmup_steps_for
from sftkit.train.step import accumulate_gradients

IGNORE = -100


def make_examples(vocab: int, lengths: list[int], seed: int = 0) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=generator).tolist()
        # mask a prompt-like prefix so targets are a strict subset of positions
        labels = [IGNORE] * (n // 3) + ids[n // 3 :]
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def loss_model_for(model_dir, attn: str, chunked: bool = False, finetuning: str = "full", checkpointing: bool = False):
    torch.manual_seed(0)
    model = load_model(str(model_dir), torch.float32, attn)
    model = apply_adapters(
        model, AdapterOptions(finetuning=finetuning, r=8, alpha=16, dropout=0.0, gradient_checkpointing=checkpointing)
    )
    if finetuning == "lora":  # make the adapter non-trivial so its gradients are not all zero
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.02)
    return CausalLMLoss(model, attn, chunked=chunked, chunk_size=7)


def gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_close_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float) -> float:
    assert a.keys() == b.keys() and a
    worst = 0.0
    for name in a:
        scale = max(a[name].abs().max().item(), 1e-12)
        worst = max(worst, (a[name] - b[name]).abs().max().item() / scale)
    assert worst <= rtol, f"max relative gradient difference {worst:.2e} > {rtol:.0e}"
    return worst


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_example_loss_equals_its_loss_alone(tiny_model_dir, attn):
    loss_model = loss_model_for(tiny_model_dir, attn)
    vocab = loss_model.model.config.vocab_size
    examples = make_examples(vocab, [23, 9, 31, 5])
    pad = load_tokenizer(str(tiny_model_dir)).pad_token_id
    with torch.no_grad():
        packed = collate([examples], pad)
        for index, example in enumerate(examples):
            alone = loss_model(**collate([[example]], pad))
            only_this = dict(packed)
            only_this["targets"] = packed["targets"].masked_fill(packed["segment_ids"] != index + 1, IGNORE)
            inside = loss_model(**only_this)
            assert abs(inside.item() - alone.item()) <= 1e-5 * max(1.0, abs(alone.item())), (index, inside, alone)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_gradient_equals_padded_gradient(tiny_model_dir, attn):
    pad = load_tokenizer(str(tiny_model_dir)).pad_token_id
    results = []
    for rows in ("packed", "padded"):
        loss_model = loss_model_for(tiny_model_dir, attn)
        examples = make_examples(loss_model.model.config.vocab_size, [17, 40, 6, 25])
        batch = collate([examples] if rows == "packed" else [[e] for e in examples], pad)
        loss = loss_model(**batch)
        loss.backward()
        results.append((loss.item(), gradients(loss_model)))
    (packed_loss, packed_grads), (padded_loss, padded_grads) = results
    assert abs(packed_loss - padded_loss) <= 1e-5 * abs(padded_loss)
    assert_close_grads(packed_grads, padded_grads, rtol=1e-5)


def test_naive_packing_leaks_with_kv_cache(tiny_model_dir):
    """Why the explicit mask exists: position_ids alone with the default use_cache=True let a packed
    example attend to its neighbours (transformers sdpa), so its logits change."""
    model = load_model(str(tiny_model_dir), torch.float32, "sdpa")
    examples = make_examples(model.config.vocab_size, [12, 10])
    batch = collate([examples], 0)
    with torch.no_grad():
        naive = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits[0, 12:22]
        alone = model(input_ids=torch.tensor([examples[1]["input_ids"]])).logits[0]
    assert (naive - alone).abs().max().item() > 1e-3


@pytest.mark.parametrize("finetuning", ["full", "lora"])
def test_gradient_accumulation_is_one_big_batch(tiny_model_dir, finetuning):
    """micro 2 × GA 4 gives the loss and gradients of micro 8 × GA 1, on very uneven lengths."""
    pad = load_tokenizer(str(tiny_model_dir)).pad_token_id
    accelerator = Accelerator(cpu=True)
    lengths = [5, 60, 7, 33, 12, 90, 4, 21]
    results = []
    for micro in (8, 2):
        loss_model = loss_model_for(tiny_model_dir, "sdpa", finetuning=finetuning)
        examples = make_examples(loss_model.model.config.vocab_size, lengths)
        trained = sum(sum(1 for label in e["labels"][1:] if label != IGNORE) for e in examples)
        batches = [collate([[e] for e in examples[i : i + micro]], pad) for i in range(0, 8, micro)]
        loss_sum = accumulate_gradients(loss_model, accelerator, batches, trained)
        results.append((loss_sum[0].item() / trained, gradients(loss_model)))
    (big_loss, big_grads), (ga_loss, ga_grads) = results
    assert abs(big_loss - ga_loss) <= 1e-6 * abs(big_loss)
    assert_close_grads(big_grads, ga_grads, rtol=1e-6)


def test_loss_is_token_mean_of_reference_cross_entropy(tiny_model_dir):
    """The step loss equals transformers' own per-token mean CE over all trained tokens of the batch."""
    loss_model = loss_model_for(tiny_model_dir, "sdpa")
    examples = make_examples(loss_model.model.config.vocab_size, [8, 30, 15])
    pad = load_tokenizer(str(tiny_model_dir)).pad_token_id
    with torch.no_grad():
        ours = loss_model(**collate([examples], pad)).item()
        total, count = 0.0, 0
        for e in examples:
            out = loss_model.model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]]))
            n = sum(1 for label in e["labels"][1:] if label != IGNORE)
            total += out.loss.item() * n
            count += n
    assert abs(ours / count - total / count) <= 1e-5


@pytest.mark.parametrize("finetuning", ["full", "lora"])
def test_chunked_loss_and_checkpointing_change_nothing(tiny_model_dir, finetuning):
    pad = load_tokenizer(str(tiny_model_dir)).pad_token_id
    results = []
    for chunked, checkpointing in ((False, False), (True, False), (False, True)):
        loss_model = loss_model_for(
            tiny_model_dir, "sdpa", chunked=chunked, finetuning=finetuning, checkpointing=checkpointing
        )
        loss_model.train()
        examples = make_examples(loss_model.model.config.vocab_size, [20, 11, 35])
        loss = loss_model(**collate([examples], pad))
        loss.backward()
        results.append((loss.item(), gradients(loss_model)))
    for loss, grads in results[1:]:
        assert abs(loss - results[0][0]) <= 1e-5 * abs(results[0][0])
        assert_close_grads(results[0][1], grads, rtol=1e-5)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "constant_with_warmup"])
def test_lr_schedule_matches_formula(kind):
    total, lr_max, ratio = 50, 3e-4, 0.1
    warmup = warmup_steps_for(total, 0.1, 0)
    assert warmup == 5
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr_max)
    scheduler = build_scheduler(optimizer, total, warmup, kind, min_lr_ratio=ratio)
    lr_min = ratio * lr_max
    for t in range(total):
        lr = scheduler.get_last_lr()[0]
        if kind == "constant":
            expected = lr_max
        elif t < warmup:
            expected = lr_max * (t + 1) / (warmup + 1)
        elif kind == "cosine":
            expected = lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
        elif kind == "linear":
            expected = lr_max * (1 - (t - warmup) / (total - warmup))
        else:
            expected = lr_max
        assert abs(lr - expected) <= 1e-12, (t, lr, expected)
        assert lr == pytest.approx(lr_max * lr_multiplier(t, total, warmup, kind, ratio), rel=1e-12)
        optimizer.step()
        scheduler.step()


def test_pad_token_is_never_eos(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.pad_token = tokenizer.eos_token  # the common mistake
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token_id is not None and loaded.pad_token_id != loaded.eos_token_id
    assert loaded.padding_side == "right"
