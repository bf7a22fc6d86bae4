"""Load the tokenizer and the base model from a hub id or a local folder.

The pad token is never the EOS token: with pad == eos, masking padding also masks the EOS that
ends each reply, and the model never learns to stop.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """The model or tokenizer cannot be loaded as configured."""


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.rstrip("/").split("/", 1)[-1] or Path(name).exists()


def _check_exists(name: str, what: str) -> None:
    if _looks_local(name) and not Path(name).expanduser().exists():
        raise ModelError(f"{what} = {name!r}: no such folder; give a local path that exists or a hub id like "
                         "'meta-llama/Llama-3.1-8B'")


def _remote_code_error(name: str, err: Exception) -> ModelError | None:
    text = str(err)
    if "trust_remote_code" in text:
        return ModelError(f"{name}: this model ships its own code, which sftkit does not run unless you set "
                          "`trust_remote_code: true` (only for models you trust)")
    return None


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """Tokenizer with a pad token that is not EOS, padding on the right for training."""
    _check_exists(name, "model_name_or_path (or tokenizer_name_or_path)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as err:
        if Path(name).expanduser().is_dir() and not _has_tokenizer_files(Path(name).expanduser()):
            raise ModelError(f"{name}: no tokenizer files in this folder (tokenizer.json, tokenizer_config.json, ...); "
                             "set `tokenizer_name_or_path` to the tokenizer of the base model") from None
        raise _remote_code_error(name, err) or ModelError(f"{name}: could not load the tokenizer: {err}") from None
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer


def _has_tokenizer_files(folder: Path) -> bool:
    return any(p.name.startswith(("tokenizer", "vocab")) or p.suffix == ".model" for p in folder.iterdir())


def ensure_pad_token(tokenizer: Any) -> None:
    """Set a pad token distinct from EOS: unk where there is one, else a new `<|pad|>` token."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})


def resolve_dtype(torch_dtype: str, bf16: bool, fp16: bool) -> torch.dtype:
    if torch_dtype != "auto":
        return DTYPES[torch_dtype]
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def load_model_config(name: str, trust_remote_code: bool = False) -> Any:
    _check_exists(name, "model_name_or_path")
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise _remote_code_error(name, err) or ModelError(f"{name}: could not read the model config: {err}") from None


# attn_implementation → (the module it needs, the package that provides it)
_FLASH_PACKAGES = {"flash_attention_2": ("flash_attn", "flash-attn"), "flash_attention_3": ("flash_attn_interface", "flash-attn 3 (hopper)")}


def check_attention(attn_implementation: str) -> None:
    """Fail before loading when the kernel cannot run here; registers the varlen kernel with transformers."""
    import sftkit.model.attention  # noqa: F401  (registers attn_implementation = "varlen")

    if attn_implementation in _FLASH_PACKAGES:
        module, package = _FLASH_PACKAGES[attn_implementation]
        if importlib.util.find_spec(module) is None:
            raise ModelError(f"attn_implementation = {attn_implementation!r} but {package} is not installed; "
                             "install it or use 'varlen' (no extra package)")
    if attn_implementation == "flex_attention" and not torch.cuda.is_available():
        raise ModelError("attn_implementation = 'flex_attention' needs a CUDA GPU (torch has no FlexAttention "
                         "backward on CPU); use 'varlen'")


def load_model(name: str, dtype: torch.dtype, attn_implementation: str = "sdpa",
               trust_remote_code: bool = False, quantization_config: Any = None, vocab_size: int | None = None) -> Any:
    """The base causal LM. Weights are read from safetensors only; the embedding grows if the tokenizer did."""
    load_model_config(name, trust_remote_code)
    check_attention(attn_implementation)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
            use_safetensors=True, quantization_config=quantization_config)
    except Exception as err:
        if "safetensors" in str(err).lower() and ".bin" in str(err):
            raise ModelError(f"{name}: has no safetensors weights; sftkit does not load pickled .bin weights. "
                             "Convert them with safetensors' convert script first") from None
        raise _remote_code_error(name, err) or ModelError(f"{name}: could not load the model: {err}") from None
    if vocab_size is not None and vocab_size > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab_size)
    model.config.use_cache = False  # training: a KV cache would let packed examples see each other
    return model
