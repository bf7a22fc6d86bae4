"""LoRA, QLoRA or full fine-tuning on top of a loaded base model."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sftkit.model.load import ModelError
from sftkit.model.quantize import keep_4bit_layers_trainable


@dataclass(frozen=True)
class AdapterOptions:
    finetuning: str = "lora"  # lora | qlora | full
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = "all-linear"
    gradient_checkpointing: bool = False


def linear_module_names(model: nn.Module) -> list[str]:
    """Leaf names of every linear layer except the output head (what `all-linear` means)."""
    head = model.get_output_embeddings()
    names: set[str] = set()
    for name, module in model.named_modules():
        if module is head:
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def apply_adapters(model: nn.Module, options: AdapterOptions) -> nn.Module:
    """Wrap the base model for training; returns the model whose parameters the optimizer sees."""
    if options.finetuning == "qlora":
        from peft import prepare_model_for_kbit_training

        keep_4bit_layers_trainable(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=options.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif options.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if options.finetuning == "full":
        return model
    from peft import LoraConfig, get_peft_model

    targets = linear_module_names(model) if options.target_modules == "all-linear" else list(options.target_modules)
    known = set(linear_module_names(model))
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise ModelError(f"lora_target_modules: {unknown} are not linear layers of this model; "
                         f"its linear layers are {sorted(known)}")
    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    if options.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return get_peft_model(model, config)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit weight counts its weights, not its packed bytes (2 per byte)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(weight_count(p) for p in model.parameters())
    return trainable, total


def weight_count(parameter: nn.Parameter) -> int:
    quant_state = getattr(parameter, "quant_state", None)  # bitsandbytes Params4bit: uint8 storage
    return quant_state.shape.numel() if quant_state is not None else parameter.numel()
