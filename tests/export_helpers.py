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
PROMPTS = [
    "What is the capital of France?",
    "Give me one word that rhymes with cat.",
    "What is 2 + 3?",
    "Name a color of the sky.",
    "Say hello in Spanish.",
]
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


def build_chat_model(
    folder: Path, arch: str = "llama", tied: bool = False, template: str = "chatml", **extra: Any
) -> Path:
    """A random 2-layer Llama, Qwen2 (q/k/v biases) or Qwen3 (q/k norms) with the chat tokenizer and the run's
    template file; `extra`: more config keys."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

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
        head_dim=16,
    )
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch](**{**common, **extra})
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


def chat_inputs(tokenizer: Any, template: str, prompts: list[str]) -> list[list[int]]:
    """Each prompt rendered as a user turn with the template's generation prompt, as token ids."""
    from sftkit.data.template import render_prompt

    return [
        tokenizer(render_prompt([{"role": "user", "content": p}], template, tokenizer), add_special_tokens=False)[
            "input_ids"
        ]
        for p in prompts
    ]


def compare(expected_model: Any, got_model: Any, inputs: list[list[int]]) -> dict[str, float]:
    """Over every position of every input: max |Δlogit|, mean KL(expected ‖ got) and top-1 agreement."""
    worst, kl_sum, agree, positions = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for ids in inputs:
            batch = torch.tensor([ids])
            expected = expected_model(batch).logits[0].float()  # (seq, vocab)
            got = got_model(batch).logits[0].float()
            worst = max(worst, (got - expected).abs().max().item())
            log_p, log_q = expected.log_softmax(-1), got.log_softmax(-1)
            kl_sum += (log_p.exp() * (log_p - log_q)).sum(-1).sum().item()
            agree += (expected.argmax(-1) == got.argmax(-1)).sum().item()
            positions += len(ids)
    return {"max_abs_logit": worst, "mean_kl": kl_sum / positions, "top1": agree / positions, "positions": positions}


def train_chat_run(model_dir: Path, folder: Path) -> Path:
    """A 3-step LoRA run with `trainable_tokens: auto` on the model's own chat template, through the API;
    returns the run directory. Small on purpose: it only has to move the weights off the base."""
    import sftkit
    from tests.train_helpers import write_chat_data

    result = sftkit.train(
        {
            "model_name_or_path": str(model_dir),
            "datasets": [{"path": str(write_chat_data(folder / "chat.jsonl", rows=16))}],
            "output_dir": str(folder / "run"),
            "report_to": "none",
        },
        finetuning="lora",
        trainable_tokens="auto",
        lora_r=8,
        lora_alpha=16,
        max_seq_length=128,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=3,
        learning_rate=1e-3,
        warmup_steps=0,
        save_steps=100,
        sample_prompts=[],
        seed=3,
    )
    assert result.status == "finished" and result.final_dir is not None
    return result.output_dir
