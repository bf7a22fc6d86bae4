"""`sftkit generate`: talk to a trained model with the very template it was trained with.

What a run leaves behind, and what this module loads from it:

    RUN_DIR/adapter/   adapter_config.json + adapter_model.safetensors   LoRA: base from base_model_name_or_path
    RUN_DIR/model/     config.json + model*.safetensors                  full fine-tune (or `sftkit merge` output)
    either folder      tokenizer files + chat_template.jinja             saved beside the weights
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.text import Text

from sftkit.config import ConfigError
from sftkit.model.load import ModelError, load_model, load_model_config, load_tokenizer
from sftkit.monitor.samples import generate_samples, load_sample_prompts

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def resolve_weights(path: Path) -> Path:
    """The folder holding the weights: a run directory's adapter/ or model/, else the folder itself."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder; give a run directory, an adapter folder or a model folder")
    for final in ("adapter", "model"):
        if (path / final).is_dir():
            return path / final
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return path
    if (path / "metrics.jsonl").is_file():
        raise ModelError(f"{path}: the run has no final weights (adapter/ or model/) yet; wait for it to finish")
    raise ModelError(
        f"{path}: holds neither adapter/ nor model/ nor adapter_config.json / config.json; give a run "
        "directory, an adapter folder or a model folder"
    )


def base_dtype(name: str) -> torch.dtype:
    """The dtype a model was saved in (its config's `dtype`), float32 when the config does not say."""
    config = load_model_config(name)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def load_trained(folder: Path, dtype: torch.dtype | None = None) -> tuple[Any, Any, str]:
    """(model, tokenizer, template) from an adapter or model folder. An adapter is applied to its base model,
    unmerged (a PeftModel); `dtype` None means the weights' own dtype."""
    folder = Path(folder)
    tokenizer, template = load_tokenizer_and_template(folder)
    adapter_config = folder / "adapter_config.json"
    if not adapter_config.is_file():
        model = load_model(str(folder), dtype or base_dtype(str(folder)), vocab_size=len(tokenizer))
    else:
        base = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base:
            raise ModelError(f"{adapter_config}: has no base_model_name_or_path, so the base model is unknown")
        try:
            model = load_model(base, dtype or base_dtype(base), vocab_size=len(tokenizer))
        except ModelError as err:
            raise ModelError(
                f"{adapter_config}: base model (base_model_name_or_path) cannot be loaded: {err}"
            ) from None
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder))
    model.eval()
    return model, tokenizer, template


def load_tokenizer_and_template(folder: Path) -> tuple[Any, str]:
    """The tokenizer and training template saved beside a run's weights, without the weights."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(
            f"{folder}: has no tokenizer ({', '.join(TOKENIZER_FILES)}); sftkit saves it beside the "
            "weights, so copy the tokenizer files of the base model into this folder"
        )
    template_path = folder / TEMPLATE_FILE
    if not template_path.is_file():
        raise ModelError(
            f"{folder}: has no {TEMPLATE_FILE}; sftkit saves the training template beside the weights so "
            f"inference renders prompts the same way; copy the run's {TEMPLATE_FILE} into this folder"
        )
    return load_tokenizer(str(folder)), template_path.read_text(encoding="utf-8")


def generate_cli(
    model: Path,
    prompts: list[str],
    prompts_file: Path | None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    console: Console | None = None,
) -> list[dict]:
    """Load, generate a reply to each prompt (single-turn), print them; returns the samples."""
    if prompts_file is not None and not Path(prompts_file).is_file():
        raise FileNotFoundError(f"--prompts-file {prompts_file}: no such file")
    conversations = load_sample_prompts(list(prompts), [])
    if prompts_file is not None:
        conversations += load_sample_prompts(str(prompts_file), [])
    if not conversations:
        raise ConfigError("nothing to generate: give --prompt TEXT (repeatable) or --prompts-file FILE")
    folder = resolve_weights(model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    loaded, tokenizer, template = load_trained(folder, dtype)
    samples = generate_samples(
        loaded.to(device), tokenizer, template, conversations, max_new_tokens, temperature=temperature, top_p=top_p
    )
    if console is not None:
        console.print(Text(str(folder), style="dim"))
        for sample in samples:
            console.rule(style="dim")
            # Text, not markup: replies may contain "[INST]" and the like
            console.print(Text.assemble(("user: ", "bold"), sample["prompt"]))
            console.print(Text.assemble(("assistant: ", "bold"), sample["completion"]))
            if not sample["ended"]:
                console.print(f"[yellow](stopped at max_new_tokens = {max_new_tokens})[/yellow]")
    return samples
