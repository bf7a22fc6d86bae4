"""`torch_compile`: compile each decoder layer in place, once, before training.

Compiling the layers rather than the whole forward keeps the parts that do not trace well (mask
building, the chunked loss, peft's wrappers around the model) in eager mode, and lets every layer
reuse one compiled graph: the layers share code and shapes, and with `dynamic=True` the sequence
length is symbolic, so packed batches of varying length do not recompile. The compiled graph is
built on the first call (step 1), and once more for no-grad eval, since grad mode is part of its guards.

Layer inputs must agree on `requires_grad`, or the first layer (whose input comes from a frozen
embedding under LoRA) gets a graph of its own: the embedding output is therefore made to require grad,
as gradient checkpointing does; this costs the first layer's input gradient, 1/num_layers of the
input-gradient work in backward.
"""

from __future__ import annotations

from torch import nn

from sftkit.model.load import ModelError, transformers_model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks, found by the class names transformers lists in `_no_split_modules`."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def compile_decoder_layers(model: nn.Module) -> int:
    """Compile every decoder layer in place (`nn.Module.compile`); returns how many were compiled."""
    layers = decoder_layers(model)
    if not layers:
        raise ModelError(
            f"torch_compile: found no decoder layers in {type(model).__name__} "
            "(none of the classes its _no_split_modules names); set torch_compile: false"
        )
    transformers_model(model).enable_input_require_grads()
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
