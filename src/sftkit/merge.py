"""`sftkit merge`: fold a LoRA adapter into its base weights and save a model that needs neither peft nor
the base: safetensors shards, the tokenizer and the training chat template, loadable with
`AutoModelForCausalLM.from_pretrained(out)` or by `sftkit generate out`.

The base is loaded unquantised, in the dtype it was saved in or in `dtype` (float32 or bfloat16), also
for QLoRA adapters: merging into 4-bit weights would round the adapter's update away. A QLoRA adapter
was trained on the NF4-rounded base, so its merged model differs from the 4-bit model + adapter by the
rounding of the base weights; tests/test_qlora.py measures that difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sftkit.generate import TEMPLATE_FILE, load_trained, resolve_weights
from sftkit.model.load import DTYPES, ModelError


def load_merged(folder: Path, dtype: torch.dtype | None = None) -> tuple[Any, Any, str, bool]:
    """(model, tokenizer, template, was_adapter): an adapter folder folded into its base (W + (alpha / r) B A
    in every adapted layer, trainable token rows and modules_to_save written in), or a model folder as it is."""
    model, tokenizer, template = load_trained(folder, dtype)
    was_adapter = hasattr(model, "merge_and_unload")
    if was_adapter:
        model = model.merge_and_unload()  # a plain transformers model
    model.config.use_cache = True  # training turned the KV cache off; inference wants it
    return model, tokenizer, template, was_adapter


def merge_adapter(run_dir: Path, out: Path, max_shard_size: str = "5GB", dtype: str = "auto") -> Path:
    """Merge RUN_DIR/adapter (or an adapter folder) into its base and write the standalone model to `out`.

    `dtype`: "auto" keeps the base's saved dtype; "float32" or "bfloat16" loads and writes in that one."""
    if dtype not in ("auto", "float32", "bfloat16"):
        raise ModelError(f"--dtype {dtype}: unknown; use auto, float32 or bfloat16")
    folder = resolve_weights(run_dir)
    if not (folder / "adapter_config.json").is_file():
        raise ModelError(
            f"{folder}: is not a LoRA adapter (no adapter_config.json); a full fine-tune's model/ is "
            "already a standalone model, nothing to merge"
        )
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"--out {out}: already holds files; give a new or empty folder")
    merged, tokenizer, template, _ = load_merged(folder, None if dtype == "auto" else DTYPES[dtype])
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, max_shard_size=max_shard_size)  # safetensors
    tokenizer.save_pretrained(out)
    (out / TEMPLATE_FILE).write_text(template, encoding="utf-8")  # after the tokenizer, which may write its own
    return out
