"""`sftkit export`: ship a trained model where people run models.

    --to gguf   one GGUF file (llama.cpp, Ollama, LM Studio) + an Ollama Modelfile:
                OUT/NAME-QUANT.gguf, OUT/Modelfile
    --to vllm   what `vllm serve` loads: a bf16 merged safetensors folder (OUT/), or with `lora=True`
                the adapter as vLLM's LoRA loader reads it (OUT/, served beside its base)

An adapter is merged first (W + (alpha / r) B A, and peft's trainable token rows and modules_to_save
folded in), in float32 so that quantising starts from the exact merged weights. The file carries the
run's chat template, its special tokens and the end-of-turn token, so llama.cpp (`--jinja`) and Ollama
render prompts as training did and stop where training taught the model to stop.

Cost: loading and merging the model (O(parameters) in time and float32 memory), then one write.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sftkit.errors import SftkitError
from sftkit.export.gguf_file import QUANTS, check_quant
from sftkit.merge import load_merged

__all__ = ["QUANTS", "ExportError", "ExportResult", "export"]

TARGETS = ("gguf", "vllm")


class ExportError(SftkitError):
    """The model cannot be exported as asked; the message says why and what to do."""


@dataclass
class ExportResult:
    """What an export wrote: `path` is the GGUF file or the vLLM folder; `notes` what the user should know."""

    out_dir: Path
    path: Path
    files: list[Path]
    merged: bool
    notes: list[str] = field(default_factory=list)
    hub_url: str | None = None


def export(
    model: str | Path,
    out: str | Path,
    to: Literal["gguf", "vllm"] = "gguf",
    quant: str = "f16",
    lora: bool = False,
    push_to_hub: str | None = None,
) -> ExportResult:
    """Export a run directory, adapter folder or model folder (`model`) to `out`, a new or empty folder.

    `quant` (GGUF only): one of `QUANTS`. `lora` (vLLM only): write the adapter instead of merging, where
    vLLM's LoRA loader can serve it. `push_to_hub`: upload `out` to that Hugging Face repo (HF_TOKEN)."""
    if to not in TARGETS:
        raise ExportError(f"--to {to}: unknown target; choose one of {', '.join(TARGETS)}")
    if to == "gguf":
        quant = check_quant(quant)
        if importlib.util.find_spec("gguf") is None:
            raise ExportError("--to gguf needs the gguf package (llama.cpp's writer): pip install 'sftkit[gguf]'")
    folder = final_weights(Path(model))
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: already exists and is not empty; give a new or empty folder")
    if to == "gguf":
        result = export_gguf(folder, out, quant)
    else:
        from sftkit.export.vllm import export_vllm

        result = export_vllm(folder, out, lora)
    if push_to_hub:
        from sftkit.export.hub import upload_folder

        result.hub_url = upload_folder(out, push_to_hub)
    return result


def final_weights(path: Path) -> Path:
    """The folder with a run's final weights (or the folder given); a run that has none points to its
    newest checkpoint and how to finish from it."""
    from sftkit.generate import resolve_weights
    from sftkit.train.checkpoint import checkpoint_dirs

    if (
        path.is_dir()
        and (path / "metrics.jsonl").is_file()
        and not any((path / d).is_dir() for d in ("adapter", "model"))
    ):
        steps = checkpoint_dirs(path)
        where = (
            f"its newest checkpoint is {steps[-1]}; finish the run with `sftkit train CONFIG "
            "--resume_from_checkpoint true`, then export"
            if steps
            else "it saved no checkpoint either; train it to the end, then export"
        )
        raise ExportError(f"{path}: the run has no final weights (adapter/ or model/); {where}")
    return resolve_weights(path)


def model_name(folder: Path) -> str:
    """A file name for the export: the run directory's name (folder is RUN/adapter or RUN/model) or the folder's."""
    named = folder.parent if folder.name in ("adapter", "model") else folder
    return re.sub(r"[^A-Za-z0-9._-]+", "-", named.resolve().name) or "model"


def export_gguf(folder: Path, out: Path, quant: str) -> ExportResult:
    import torch

    from sftkit.export.gguf_file import resolve_architecture, write_gguf
    from sftkit.export.ollama import write_modelfile
    from sftkit.model.load import load_model_config

    config_source = folder
    adapter_config = folder / "adapter_config.json"
    if adapter_config.is_file():
        config_source = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path", folder)
    resolve_architecture(load_model_config(str(config_source)))  # refuse before loading any weights
    model, tokenizer, template, merged = load_merged(folder, torch.float32)
    name = model_name(folder)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".{name}-{quant}.gguf.partial"
    try:
        write_gguf(model, tokenizer, template, staging, quant, name)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    path = staging.rename(out / f"{name}-{quant}.gguf")
    modelfile, notes = write_modelfile(out, path.name, template, tokenizer)
    return ExportResult(out, path, [path, modelfile], merged, notes)


def copy_tokenizer(source: Path, out: Path) -> None:
    """The tokenizer files and chat template saved beside the weights."""
    from sftkit.generate import TEMPLATE_FILE

    for child in source.iterdir():
        if child.name.startswith(("tokenizer", "special_tokens")) or child.name == TEMPLATE_FILE:
            shutil.copy2(child, out / child.name)
