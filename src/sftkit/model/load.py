"""Load the tokenizer and the base model from a hub id, a local folder, or a GGUF file in either.

The pad token is never the EOS token: with pad == eos, masking padding also masks the EOS that
ends each reply, and the model never learns to stop.

A GGUF base is named by one string, `FOLDER_OR_HUB_ID/FILE.gguf` (`SFTConfig.model_source` builds it from the
`model_name_or_path` and `gguf_file` keys). transformers dequantizes it into a plain dense model, and
that same string becomes the model's `name_or_path`, so peft writes it as the adapter's
`base_model_name_or_path`: resume, `merge` and `generate` reload the base from it like any other.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from sftkit.errors import SftkitError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(SftkitError, ValueError):
    """The model or tokenizer cannot be loaded as configured."""


def transformers_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model itself, under peft's adapter wrapper where there is one."""
    get_base_model = getattr(model, "get_base_model", None)
    base = get_base_model() if get_base_model is not None else model
    if not isinstance(base, PreTrainedModel):
        raise ModelError(f"{type(base).__name__} is not a transformers model")
    return base


def embedding_weight(model: PreTrainedModel) -> torch.Tensor:
    """The input embedding's matrix, (vocab, hidden): a row for every token id the model reads."""
    weight = model.get_input_embeddings().weight
    if not isinstance(weight, torch.Tensor):
        raise ModelError(f"{type(model).__name__}: its input embedding has no weight matrix")
    return weight


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.rstrip("/").split("/", 1)[-1] or Path(name).exists()


def _check_exists(name: str, what: str) -> None:
    if _looks_local(name) and not Path(name).expanduser().exists():
        raise ModelError(
            f"{what} = {name!r}: no such folder; give a local path that exists or a hub id like "
            "'meta-llama/Llama-3.1-8B'"
        )


def _remote_code_error(name: str, err: Exception) -> ModelError | None:
    text = str(err)
    if "trust_remote_code" in text:
        return ModelError(
            f"{name}: this model ships its own code, which sftkit does not run unless you set "
            "`trust_remote_code: true` (only for models you trust)"
        )
    return None


def split_gguf(source: str) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file inside it or None): the reverse of `SFTConfig.model_source`.

    `../models/x/model.Q4.gguf` → (`../models/x`, `model.Q4.gguf`); a hub `owner/repo/sub/m.gguf`, not
    on disk, → (`owner/repo`, `sub/m.gguf`).
    """
    if not source.endswith(".gguf"):
        return source, None
    path = Path(source).expanduser()
    parts = source.split("/")
    if not path.exists() and not source.startswith((".", "/", "~")) and len(parts) > 3:
        return "/".join(parts[:2]), "/".join(parts[2:])
    return str(path.parent), path.name


def _gguf_arguments(folder: str, gguf_file: str | None) -> dict[str, Any]:
    """from_pretrained arguments for a GGUF file; checks the file and the `gguf` package first."""
    if gguf_file is None:
        return {}
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(
            f"gguf_file = {gguf_file!r}: reading GGUF checkpoints needs the `gguf` package; pip install 'sftkit[gguf]'"
        )
    if _looks_local(folder) and not (Path(folder).expanduser() / gguf_file).is_file():
        raise ModelError(
            f"gguf_file = {gguf_file!r}: no such file in {folder}; set gguf_file to the name of a "
            ".gguf file in the model_name_or_path folder"
        )
    return {"gguf_file": gguf_file}


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """Tokenizer with a pad token that is not EOS, padding on the right for training.

    `name` may be `FOLDER/FILE.gguf`: the tokenizer stored in the GGUF file.
    """
    name, gguf_file = split_gguf(name)
    _check_exists(name, "model_name_or_path (or tokenizer_name_or_path)")
    gguf = _gguf_arguments(name, gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, **gguf)
    except Exception as err:
        if Path(name).expanduser().is_dir() and not _has_tokenizer_files(Path(name).expanduser()):
            raise ModelError(
                f"{name}: no tokenizer files in this folder (tokenizer.json, tokenizer_config.json, ...); "
                "set `tokenizer_name_or_path` to the tokenizer of the base model"
            ) from None
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
    name, gguf_file = split_gguf(name)
    _check_exists(name, "model_name_or_path")
    gguf = _gguf_arguments(name, gguf_file)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, **gguf)
    except Exception as err:
        raise _remote_code_error(name, err) or ModelError(f"{name}: could not read the model config: {err}") from None


# attn_implementation → (the module it needs, the package that provides it)
_FLASH_PACKAGES = {
    "flash_attention_2": ("flash_attn", "flash-attn"),
    "flash_attention_3": ("flash_attn_interface", "flash-attn 3 (hopper)"),
}


def check_attention(attn_implementation: str) -> None:
    """Fail before loading when the kernel cannot run here; registers the varlen kernel with transformers."""
    import sftkit.model.attention  # noqa: F401  (registers attn_implementation = "varlen")

    if attn_implementation in _FLASH_PACKAGES:
        module, package = _FLASH_PACKAGES[attn_implementation]
        if importlib.util.find_spec(module) is None:
            raise ModelError(
                f"attn_implementation = {attn_implementation!r} but {package} is not installed; "
                "install it or use 'varlen' (no extra package)"
            )
    if attn_implementation == "flex_attention" and not torch.cuda.is_available():
        raise ModelError(
            "attn_implementation = 'flex_attention' needs a CUDA GPU (torch has no FlexAttention "
            "backward on CPU); use 'varlen'"
        )


def load_model(
    name: str,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    quantization_config: Any = None,
    vocab_size: int | None = None,
) -> Any:
    """The base causal LM. Weights are read from safetensors (or a GGUF file, dequantized); the embedding
    grows if the tokenizer did."""
    source = name
    name, gguf_file = split_gguf(source)
    load_model_config(source, trust_remote_code)
    if gguf_file is not None and quantization_config is not None:
        raise ModelError(
            f"{source}: a GGUF base cannot be quantized again for QLoRA; use finetuning: lora, or a "
            "safetensors base for qlora"
        )
    gguf = _gguf_arguments(name, gguf_file)
    if gguf:
        from transformers import GgufConfig

        # dequantize: a model left in GGUF blocks (where a GGUF matmul kernel is installed) cannot train
        quantization_config = GgufConfig(dequantize=True)
    check_attention(attn_implementation)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if gguf else True,
            quantization_config=quantization_config,
            **gguf,
        )
    except Exception as err:
        if "safetensors" in str(err).lower() and ".bin" in str(err):
            raise ModelError(
                f"{name}: has no safetensors weights; sftkit does not load pickled .bin weights. "
                "Convert them with safetensors' convert script first"
            ) from None
        raise _remote_code_error(name, err) or ModelError(f"{name}: could not load the model: {err}") from None
    if gguf:
        as_plain_model(model, source)
    if vocab_size is not None and vocab_size > embedding_weight(model).shape[0]:
        model.resize_token_embeddings(vocab_size)
    model.config.use_cache = False  # training: a KV cache would let packed examples see each other
    return model


def as_plain_model(model: Any, source: str) -> None:
    """Make a model dequantized from GGUF an ordinary transformers model, in place.

    Its weights are plain tensors by now, but it still carries transformers' GGUF quantizer, which
    refuses `save_pretrained` (so no final model, no merge). Dropping the quantizer is all it takes:
    the saved folder reloads with plain `AutoModelForCausalLM.from_pretrained` to the same weights.
    `name_or_path` becomes `FOLDER/FILE.gguf`, which peft records as the adapter's base.
    """
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.name_or_path = source
