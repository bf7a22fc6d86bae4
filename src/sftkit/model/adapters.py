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
    trainable_token_ids: tuple[int, ...] = ()  # embedding and output-head rows trained beside LoRA


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
                        target_modules=targets, bias="none", task_type="CAUSAL_LM",
                        trainable_token_indices=token_rows(model, options.trainable_token_ids))
    if options.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return get_peft_model(model, config)


def token_rows(model: nn.Module, token_ids: tuple[int, ...]) -> dict[str, list[int]] | None:
    """peft `trainable_token_indices`: the same rows of the input embedding and of the output head.

    With tied embeddings (one matrix for both) peft wraps the head around the embedding's trainable
    rows, so each token has one trained row serving both; untied, each module trains its own copy.
    """
    if not token_ids:
        return None
    modules = {id(module): name for name, module in model.named_modules()}
    rows = sorted(token_ids)
    vocab = model.get_input_embeddings().weight.shape[0]
    if rows[-1] >= vocab:
        raise ModelError(f"trainable_tokens: token id {rows[-1]} is beyond this model's {vocab} embedding rows")
    return {modules[id(model.get_input_embeddings())]: rows, modules[id(model.get_output_embeddings())]: rows}


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit weight counts its weights, not its packed bytes (2 per byte)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(weight_count(p) for p in model.parameters())
    return trainable, total


def weight_count(parameter: nn.Parameter) -> int:
    quant_state = getattr(parameter, "quant_state", None)  # bitsandbytes Params4bit: uint8 storage
    return quant_state.shape.numel() if quant_state is not None else parameter.numel()
