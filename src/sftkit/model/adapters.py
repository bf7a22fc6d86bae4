"""LoRA, QLoRA or full fine-tuning on top of a loaded base model.

LoRA variants (DoRA, rsLoRA, extra fully trained modules, other initialisations) are peft options
gathered in `LoraVariant`. PiSSA and OLoRA initialise the adapter from the base weights and subtract
that from the base (W = W_res + B0 A0), so an adapter trained that way only fits the *modified*
base. `save_adapter` therefore writes the final adapter as a plain LoRA against the original base:

    ΔW = B A − B0 A0 = [B | −B0] [A ; A0]      (rank 2r, peft's PiSSA/OLoRA → LoRA conversion)

Checkpoints keep the raw A, B: resume rebuilds the same W_res (the initialisation is deterministic)
and loads them, so the run continues exactly.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from sftkit.model.load import ModelError, embedding_weight
from sftkit.model.quantize import keep_4bit_layers_trainable

# init_lora_weights values that move part of the base weights into the adapter at init.
BASE_MUTATING_INITS = re.compile(r"^(pissa(_niter_\d+)?|olora)$")


@dataclass(frozen=True)
class LoraVariant:
    """peft LoRA options beyond rank, alpha and dropout.

    use_dora: weight-decomposed LoRA (a learned magnitude per output feature); use_rslora: scale
    alpha / sqrt(r) instead of alpha / r; modules_to_save: modules trained in full and saved with the
    adapter (e.g. lm_head); init_lora_weights: peft's initialisation (True, False, gaussian, pissa,
    pissa_niter_N, olora, orthogonal).
    """

    use_dora: bool = False
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] = ()
    init_lora_weights: bool | str = True

    @property
    def mutates_base(self) -> bool:
        """PiSSA / OLoRA: the base weights change at init, so the saved adapter must be converted."""
        return isinstance(self.init_lora_weights, str) and bool(BASE_MUTATING_INITS.match(self.init_lora_weights))

    def lora_config_kwargs(self) -> dict[str, Any]:
        return {
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
            "modules_to_save": list(self.modules_to_save) or None,
            "init_lora_weights": self.init_lora_weights,
        }


@dataclass(frozen=True)
class AdapterOptions:
    finetuning: str = "lora"  # lora | qlora | full
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = "all-linear"
    gradient_checkpointing: bool = False
    variant: LoraVariant = field(default_factory=LoraVariant)
    trainable_token_ids: tuple[int, ...] = ()  # embedding and output-head rows trained beside LoRA


def linear_module_names(model: PreTrainedModel) -> list[str]:
    """Leaf names of every linear layer except the output head (what `all-linear` means)."""
    head = model.get_output_embeddings()
    names: set[str] = set()
    for name, module in model.named_modules():
        if module is head:
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def apply_adapters(model: PreTrainedModel, options: AdapterOptions) -> nn.Module:
    """Wrap the base model for training; returns the model whose parameters the optimizer sees."""
    if options.finetuning == "qlora":
        from peft import prepare_model_for_kbit_training

        keep_4bit_layers_trainable(model)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=options.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif options.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if options.finetuning == "full":
        return model
    from peft import LoraConfig, get_peft_model

    targets = linear_module_names(model) if options.target_modules == "all-linear" else list(options.target_modules)
    known = set(linear_module_names(model))
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise ModelError(
            f"lora_target_modules: {unknown} are not linear layers of this model; its linear layers are {sorted(known)}"
        )
    check_modules_to_save(model, options.variant.modules_to_save)
    config = LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,  # type: ignore[arg-type]  # peft annotates int; it only divides by it
        lora_dropout=options.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        **options.variant.lora_config_kwargs(),
        trainable_token_indices=token_rows(model, options.trainable_token_ids),
    )
    if options.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return get_peft_model(model, config)


def check_modules_to_save(model: nn.Module, names: tuple[str, ...]) -> None:
    """`lora_modules_to_save` must name modules of this model (peft would silently train nothing)."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [name for name in names if name not in leaves and name not in dict(model.named_modules())]
    if unknown:
        top = sorted({n for n in leaves if n and not n.isdigit()})
        raise ModelError(f"lora_modules_to_save: {unknown} are not modules of this model; its module names are {top}")


def initial_adapter_state(model: nn.Module, variant: LoraVariant) -> dict[str, torch.Tensor] | None:
    """A CPU copy of the freshly initialised adapter when the init changed the base (PiSSA/OLoRA), else None.

    Taken before any training or resume; `save_adapter` needs it to express the trained adapter against
    the original base. Costs one adapter's worth of host memory: the low-rank matrices, plus the fully
    trained modules (peft's loader expects every modules_to_save weight in an adapter it loads).
    """
    if not variant.mutates_base:
        return None
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def save_adapter(
    model: nn.Module,
    directory: Path,
    initial: dict[str, torch.Tensor] | None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save the adapter so that original base + adapter == the trained model.

    With `initial` (PiSSA/OLoRA), peft rewrites the adapter as the plain rank-2r LoRA ΔW = BA − B0A0;
    peft's conversion keeps only lora_A/lora_B, so fully trained modules (modules_to_save) are added back.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise ModelError(f"save_adapter: {type(model).__name__} carries no peft adapter")
    if initial is None:
        model.save_pretrained(str(directory), safe_serialization=True, state_dict=state_dict)
        return
    import copy

    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    config = copy.deepcopy(model.peft_config["default"])
    if not isinstance(config, LoraConfig):
        raise ModelError(f"save_adapter: an initial adapter is converted for LoRA only, not {type(config).__name__}")
    config.init_lora_weights = True  # the initial adapter is loaded as it is, not initialised again
    with tempfile.TemporaryDirectory() as temp:
        initial_dir = Path(temp) / "initial_adapter"
        config.save_pretrained(str(initial_dir))
        save_file({k: v.contiguous() for k, v in initial.items()}, str(initial_dir / "adapter_model.safetensors"))
        model.save_pretrained(
            str(directory),
            safe_serialization=True,
            state_dict=state_dict,
            path_initial_model_for_weight_conversion=str(initial_dir),
        )
    saved = directory / "adapter_model.safetensors"
    extra = {
        k: v.contiguous()
        for k, v in get_peft_model_state_dict(model, state_dict=state_dict).items()
        if "lora_" not in k
    }  # modules_to_save (not low-rank, unchanged by the conversion)
    if extra:
        save_file({**load_file(str(saved)), **extra}, str(saved), metadata={"format": "pt"})


def token_rows(model: PreTrainedModel, token_ids: tuple[int, ...]) -> dict[str, list[int]] | None:
    """peft `trainable_token_indices`: the same rows of the input embedding and of the output head.

    With tied embeddings (one matrix for both) peft wraps the head around the embedding's trainable
    rows, so each token has one trained row serving both; untied, each module trains its own copy.
    """
    if not token_ids:
        return None
    modules = {id(module): name for name, module in model.named_modules()}
    rows = sorted(token_ids)
    vocab = embedding_weight(model).shape[0]
    if rows[-1] >= vocab:
        raise ModelError(f"trainable_tokens: token id {rows[-1]} is beyond this model's {vocab} embedding rows")
    return {modules[id(model.get_input_embeddings())]: rows, modules[id(model.get_output_embeddings())]: rows}


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit weight counts its weights, not its packed bytes (2 per byte)."""
    trainable = sum(weight_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(weight_count(p) for p in model.parameters())
    return trainable, total


def weight_count(parameter: nn.Parameter) -> int:
    quant_state = getattr(parameter, "quant_state", None)  # bitsandbytes Params4bit: uint8 storage
    if quant_state is not None:
        return quant_state.shape.numel()
    # loaded under DeepSpeed ZeRO-3 (zero3_init_flag), a parameter is an empty placeholder of its shards
    return getattr(parameter, "ds_numel", parameter.numel())
