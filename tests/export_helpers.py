"""Tiny chat models and adapters for the export tests, saved the way a run saves its final weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sftkit.data.template import resolve_chat_template
from tests.conftest import build_tiny_tokenizer

QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "<|im_start|>user\nWhat is 12 plus 30?<|im_end|>\n<|im_start|>assistant\nThe answer is 42.<|im_end|>",
    "Hello!  How can I help you today? 1234",
]


def chat_tokenizer(folder: Path, arch: str) -> Any:
    """The tiny byte-level BPE with ChatML's two special tokens; Qwen2's split regex for `qwen2`."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer

    build_tiny_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if arch == "qwen2":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    return tokenizer


def build_chat_model(folder: Path, arch: str = "llama", tied: bool = False, template: str = "chatml") -> Path:
    """A random 2-layer Llama or Qwen2 (q/k/v biases) with the chat tokenizer and the run's template file."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = chat_tokenizer(folder, arch)
    torch.manual_seed(0)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-5,
    )
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a lost tensor shows
        for name, parameter in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(resolve_chat_template(template, tokenizer), encoding="utf-8")
    return folder


def build_adapter(base: Path, folder: Path, **lora: Any) -> Path:
    """A LoRA adapter on `base` with random (non-zero) B matrices and token rows, saved like a run's adapter/."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], **lora)
    peft_model = get_peft_model(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name or "token_adapter" in name or "lora_magnitude" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    peft_model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    (folder / "chat_template.jinja").write_text((base / "chat_template.jinja").read_text())
    return folder


def logits(model: Any, tokenizer: Any, texts: list[str] = TEXTS) -> torch.Tensor:
    """(texts, seq, vocab) logits, one text at a time (no padding)."""
    with torch.no_grad():
        rows = [model(torch.tensor([tokenizer(text)["input_ids"]])).logits[0] for text in texts]
    length = min(row.shape[0] for row in rows)
    return torch.stack([row[:length] for row in rows])


def gguf_fields(path: Path) -> dict[str, Any]:
    """The GGUF key-value metadata, token arrays left out."""
    import gguf

    reader = gguf.GGUFReader(path)
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores")
    return {key: field.contents() for key, field in reader.fields.items() if key not in skip}
