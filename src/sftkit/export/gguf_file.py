"""One GGUF file from a merged transformers model: hyperparameters, tensors and (via `gguf_vocab`) the tokenizer.

Everything GGUF-specific comes from the `gguf` package that llama.cpp maintains: the writer, the key names,
the map from transformers tensor names to llama.cpp's (`gguf.get_tensor_name_map`) and the quantizers
(`gguf.quants`). What is ours is the choice of architecture and dtype per tensor, and the one layout change
llama.cpp's own converter makes: Llama-family q/k projections are stored with each head's rotary halves
interleaved (transformers' GGUF reader undoes it in `LlamaTensorProcessor._reverse_permute_weights`).

Cost: one pass over the weights; quantizing is numpy on the CPU, O(parameters), and the file is
written tensor by tensor (the writer holds the converted arrays until it writes them: ~file size in RAM).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sftkit.model.load import ModelError

# transformers class → (GGUF architecture, the gguf package's MODEL_ARCH name, q/k interleaved like llama.cpp)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "LLAMA", True),
    "MistralForCausalLM": ("llama", "LLAMA", True),  # llama.cpp runs Mistral as `llama`
    "Qwen2ForCausalLM": ("qwen2", "QWEN2", False),
    "Qwen3ForCausalLM": ("qwen3", "QWEN3", False),
}

# --quant → (tensor type of 2-D weights, the file type llama.cpp records). Only types the gguf package can
# write: f32/f16 are numpy casts, the rest have a quantizer in gguf.quants (the k-quants have none there).
QUANTS = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
LOW_BIT = ("q5_1", "q5_0", "q4_1", "q4_0")
ROPE_SCALINGS = ("default", "linear", "llama3")


@dataclass(frozen=True)
class Architecture:
    gguf_name: str  # e.g. "llama"
    model_arch: Any  # gguf.MODEL_ARCH member
    interleave_qk: bool


def check_quant(quant: str) -> str:
    """The quantisation name in lower case, or a ModelError listing those the gguf package can write."""
    if quant.lower() not in QUANTS:
        raise ModelError(
            f"--quant {quant}: the gguf package cannot produce it; choose one of {', '.join(QUANTS)} "
            "(k-quants such as q4_k_m need llama.cpp's llama-quantize, run on this file's f16 export)"
        )
    return quant.lower()


def resolve_architecture(config: Any) -> Architecture:
    """The GGUF architecture of a transformers config, or a ModelError naming the unsupported one."""
    import gguf

    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            gguf_name, arch, interleave = ARCHITECTURES[name]
            scaling = rope_scaling(config)
            if scaling is not None and scaling.get("rope_type", "default") not in ROPE_SCALINGS:
                raise ModelError(
                    f"{name}: rope scaling {scaling.get('rope_type')!r} is not exported; supported: "
                    f"{', '.join(ROPE_SCALINGS)}"
                )
            return Architecture(gguf_name, getattr(gguf.MODEL_ARCH, arch), interleave)
    found = ", ".join(names) or getattr(config, "model_type", "unknown")
    raise ModelError(
        f"GGUF export supports {', '.join(ARCHITECTURES)}; this model is {found}. Export it with "
        "`--to vllm` (a safetensors folder) and convert that with llama.cpp's convert_hf_to_gguf.py"
    )


def rope_scaling(config: Any) -> dict | None:
    """The config's rope scaling, None when plain RoPE (transformers 5 calls it `rope_parameters`)."""
    scaling = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return None
    return {**scaling, "rope_type": scaling.get("rope_type", scaling.get("type"))}


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_theta(config: Any) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def add_hyperparameters(writer: Any, config: Any, arch: Architecture, vocab_size: int, quant: str) -> None:
    """The `{arch}.*` keys llama.cpp reads, with the names transformers' GGUF reader maps back."""
    import gguf

    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:  # e.g. Qwen3
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_vocab_size(vocab_size)
    scaling = rope_scaling(config)
    if scaling is not None and scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_file_type(getattr(gguf.LlamaFileType, QUANTS[quant][1]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def llama3_rope_factors(config: Any) -> np.ndarray:
    """Llama 3.1's per-frequency RoPE divisors, which llama.cpp reads from the `rope_freqs` tensor:
    transformers' default inverse frequencies over its llama3-scaled ones."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")  # (head_dim / 2,)
    base = 1.0 / (rope_theta(config) ** (torch.arange(0, head_dim(config), 2, dtype=torch.float32) / head_dim(config)))
    return (base / scaled.float()).numpy().astype(np.float32)


def interleave_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """(heads × head_dim, in) with each head's two rotary halves [x0..x63 | x64..x127] reordered to pairs
    (x0, x64, x1, x65, …): llama.cpp's `llama` graph rotates adjacent pairs."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def tensor_type(name: str, array: np.ndarray, quant: str) -> Any:
    """The GGUF type of the tensor `name` (llama.cpp's name), following llama.cpp's rules:

    - 1-D tensors (norms, biases, rope factors) stay F32.
    - Below 8 bits, the embedding and the output head (the embedding itself when tied) are Q8_0: every
      logit goes through them, and small models lose most at 4–5 bits there.
    - A 2-D weight whose rows are not a multiple of the block size falls back to F16."""
    import gguf

    if array.ndim < 2:
        return gguf.GGMLQuantizationType.F32
    qtype = getattr(gguf.GGMLQuantizationType, QUANTS[quant][0])
    if quant in LOW_BIT and name in ("token_embd.weight", "output.weight"):
        qtype = gguf.GGMLQuantizationType.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if array.shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def encode(array: np.ndarray, qtype: Any) -> np.ndarray:
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array.astype(np.float32), qtype)


def add_tensors(writer: Any, model: Any, arch: Architecture, quant: str) -> None:
    """Every weight under its llama.cpp name; the output head only where it is not tied to the embedding."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(arch.model_arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    scaling = rope_scaling(config)
    if scaling is not None and scaling["rope_type"] == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(config))
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"{hf_name}: no llama.cpp tensor name for it in architecture {arch.gguf_name}")
        weight = tensor.detach().to(torch.float32).cpu()
        if arch.interleave_qk and hf_name.endswith("q_proj.weight"):
            weight = interleave_rotary(weight, config.num_attention_heads)
        elif arch.interleave_qk and hf_name.endswith("k_proj.weight"):
            weight = interleave_rotary(weight, config.num_key_value_heads)
        array = weight.numpy()
        qtype = tensor_type(name, array, quant)
        writer.add_tensor(name, encode(array, qtype), raw_dtype=qtype)


def write_gguf(model: Any, tokenizer: Any, template: str, path: Path, quant: str, name: str) -> Path:
    """Write `model` (a merged transformers model), its tokenizer and chat template to one GGUF file."""
    import gguf

    from sftkit.export.gguf_vocab import add_tokenizer

    quant = check_quant(quant)
    arch = resolve_architecture(model.config)
    writer = gguf.GGUFWriter(path, arch.gguf_name)
    writer.add_name(name)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    add_hyperparameters(writer, model.config, arch, vocab_size, quant)
    add_tokenizer(writer, tokenizer, template, vocab_size)
    add_tensors(writer, model, arch, quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
