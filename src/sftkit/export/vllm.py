"""`--to vllm`: what `vllm serve` loads.

    merged (default)   OUT/config.json + model*.safetensors (bf16) + tokenizer + chat_template.jinja
                       vllm serve OUT --chat-template OUT/chat_template.jinja
    lora=True          OUT/adapter_config.json + adapter_model.safetensors + tokenizer + template
                       vllm serve BASE --enable-lora --lora-modules NAME=OUT --chat-template OUT/chat_template.jinja

vLLM's LoRA loader serves plain LoRA on linear layers; an adapter that also uses DoRA, trainable token
rows or `modules_to_save` is merged instead (and the result says so), since vLLM would refuse it or
drop those parts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sftkit.export import ExportResult, copy_tokenizer, load_merged

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def unservable_parts(adapter_config: dict) -> list[str]:
    """The parts of a peft adapter vLLM's LoRA loader cannot serve."""
    parts = []
    if adapter_config.get("use_dora"):
        parts.append("DoRA (use_dora)")
    if adapter_config.get("trainable_token_indices"):
        parts.append("trainable token rows (trainable_token_indices)")
    if adapter_config.get("modules_to_save"):
        parts.append(f"modules_to_save ({', '.join(adapter_config['modules_to_save'])})")
    return parts


def export_vllm(folder: Path, out: Path, lora: bool) -> ExportResult:
    import torch

    from sftkit.generate import TEMPLATE_FILE

    notes: list[str] = []
    adapter_config_path = folder / "adapter_config.json"
    if lora and not adapter_config_path.is_file():
        notes.append(f"{folder} is a full model, not an adapter: wrote it as a bf16 model folder")
        lora = False
    if lora:
        adapter_config = json.loads(adapter_config_path.read_text(encoding="utf-8"))
        parts = unservable_parts(adapter_config)
        if parts:
            notes.append(f"vLLM's LoRA loader cannot serve {', '.join(parts)}: merged into a bf16 model instead")
            lora = False
    out.mkdir(parents=True, exist_ok=True)
    if lora:
        for name in ADAPTER_FILES:
            shutil.copy2(folder / name, out / name)
        copy_tokenizer(folder, out)
        base = adapter_config.get("base_model_name_or_path")
        notes.append(
            f"serve: vllm serve {base} --enable-lora --lora-modules {out.name}={out} "
            f"--max-lora-rank {adapter_config.get('r', 16)} --chat-template {out / TEMPLATE_FILE}"
        )
        return ExportResult(out, out, sorted(out.iterdir()), False, notes)
    model, tokenizer, template, merged = load_merged(folder, torch.float32)
    model.to(torch.bfloat16).save_pretrained(out)  # merged in float32, rounded to bf16 once
    tokenizer.save_pretrained(out)
    (out / TEMPLATE_FILE).write_text(template, encoding="utf-8")  # after the tokenizer, which may write its own
    notes.append(f"serve: vllm serve {out} --chat-template {out / TEMPLATE_FILE}")
    return ExportResult(out, out, sorted(out.iterdir()), merged, notes)
