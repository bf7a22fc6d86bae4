"""`trainable_tokens`: exactly the chosen rows of the embedding and output head train beside LoRA, are
saved with the adapter, resume exactly and are folded in by `merge` (merged == base + adapter)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import sftkit.train.loop as loop
import sftkit.train.step as step_module
from sftkit.config import ConfigError
from sftkit.data.template import resolve_chat_template
from sftkit.generate import load_trained
from sftkit.merge import merge_adapter
from sftkit.model.load import ModelError, load_tokenizer
from sftkit.model.tokens import resolve_trainable_tokens
from tests.train_helpers import final_weights, max_weight_difference, tiny_config, write_chat_data

CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def chatml_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny Llama with tied embeddings whose tokenizer has ChatML's two special tokens as new, never
    trained rows: the case of a base model fine-tuned on a chat template it never saw."""
    path = tmp_path_factory.mktemp("chatml_llama")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_auto_picks_the_template_special_tokens(chatml_model_dir):
    tokenizer = load_tokenizer(str(chatml_model_dir))
    template = resolve_chat_template("chatml", tokenizer)
    auto = resolve_trainable_tokens("auto", template, tokenizer)
    assert tokenizer.convert_ids_to_tokens(auto) == CHAT_TOKENS
    assert resolve_trainable_tokens("none", template, tokenizer) == []
    assert resolve_trainable_tokens(["<|im_end|>"], template, tokenizer) == [auto[1]]
    with pytest.raises(ModelError, match=r"\['<\|eot_id\|>'\] are not tokens of this tokenizer"):
        resolve_trainable_tokens(["<|im_end|>", "<|eot_id|>"], template, tokenizer)


def test_a_token_list_with_full_finetuning_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="full fine-tuning already trains every token row"):
        tiny_config(
            tiny_model_dir, tmp_path / "x.jsonl", tmp_path / "run", finetuning="full", trainable_tokens=["</s>"]
        )


def changed_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    return [i for i in range(before.shape[0]) if not torch.equal(before[i], after[i])]


@pytest.mark.slow
def test_trainable_tokens_resume_exactly_and_merge(chatml_model_dir, tmp_path, monkeypatch):
    data = write_chat_data(tmp_path / "chat.jsonl")
    settings = {"trainable_tokens": "auto", "save_steps": 3}
    straight = tiny_config(chatml_model_dir, data, tmp_path / "straight", **settings)
    loop.train(straight)
    weights = final_weights(tmp_path / "straight")
    token_keys = [key for key in weights if "trainable_tokens_delta" in key]
    assert token_keys == ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]  # tied: one copy
    assert weights[token_keys[0]].shape == (2, 64)

    # crash in step 5, resume from checkpoint-3: the same final adapter, token rows included
    real = step_module.accumulate_gradients
    calls = {"n": 0}

    def crash_on_step_five(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "accumulate_gradients", crash_on_step_five)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(tiny_config(chatml_model_dir, data, tmp_path / "crashed", **settings))
    monkeypatch.setattr(step_module, "accumulate_gradients", real)
    loop.train(tiny_config(chatml_model_dir, data, tmp_path / "crashed", resume_from_checkpoint=True, **settings))
    assert max_weight_difference(weights, final_weights(tmp_path / "crashed")) <= 1e-6

    # merge: the same logits as base + adapter; of the embedding (= the tied head) only the two rows moved
    merged_dir = merge_adapter(tmp_path / "straight", tmp_path / "merged")
    adapted, tokenizer, _ = load_trained(tmp_path / "straight" / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(chatml_model_dir)
    input_ids = tokenizer("<|im_start|>user\nthe quick fox<|im_end|>", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=input_ids).logits, adapted(input_ids=input_ids).logits, atol=1e-5, rtol=0
        )
    ids = tokenizer.convert_tokens_to_ids(CHAT_TOKENS)
    assert changed_rows(base.model.embed_tokens.weight, merged.model.embed_tokens.weight) == ids
    assert merged.lm_head.weight is merged.model.embed_tokens.weight


@pytest.mark.slow
def test_untied_head_trains_its_own_rows_and_merges(tiny_model_dir, tmp_path):
    """Untied embeddings: the embedding and the head each train the listed rows, and nothing else."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    words = tokenizer.tokenize(" the quick")  # tokens the chat data uses, so their rows get gradients
    data = write_chat_data(tmp_path / "chat.jsonl", rows=16)
    loop.train(tiny_config(tiny_model_dir, data, tmp_path / "run", max_steps=3, trainable_tokens=words))
    weights = final_weights(tmp_path / "run")
    assert sorted(key for key in weights if "trainable_tokens_delta" in key) == [
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta",
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
    ]
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(tmp_path / "run", tmp_path / "merged"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = sorted(tokenizer.convert_tokens_to_ids(words))
    assert changed_rows(base.model.embed_tokens.weight, merged.model.embed_tokens.weight) == ids
    assert changed_rows(base.lm_head.weight, merged.lm_head.weight) == ids


def test_chunked_loss_sees_the_trained_head_rows(chatml_model_dir):
    """With trainable token rows in the head, the chunked loss (which reads the head's weight rather than
    calling it) equals the plain loss, gradients of the token rows included."""
    from sftkit.data.collate import collate
    from sftkit.model.adapters import AdapterOptions, apply_adapters
    from sftkit.model.load import load_model
    from sftkit.train.forward import CausalLMLoss, chunked_loss_is_exact

    tokenizer = load_tokenizer(str(chatml_model_dir))
    rows = tuple(tokenizer.convert_tokens_to_ids(CHAT_TOKENS))
    model = apply_adapters(
        load_model(str(chatml_model_dir), torch.float32),
        AdapterOptions(r=4, alpha=8, dropout=0.0, trainable_token_ids=rows),
    )
    assert chunked_loss_is_exact(model)
    delta = next(p for n, p in model.named_parameters() if "trainable_tokens_delta" in n)
    with torch.no_grad():
        delta.add_(torch.randn(delta.shape, generator=torch.Generator().manual_seed(0)))  # rows unlike the base
    ids = tokenizer("<|im_start|>user\nthe quick fox<|im_end|>")["input_ids"]
    batch = collate([[{"input_ids": ids, "labels": ids}]], tokenizer.pad_token_id)
    losses, grads = [], []
    for chunked in (False, True):
        loss = CausalLMLoss(model, "sdpa", chunked, chunk_size=16)(**batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append(delta.grad.clone())
        delta.grad = None
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)  # fp32 sums in another order
