"""NEFTune: uniform noise on the input embeddings while training (Jain et al., 2023, arXiv:2310.05914).

The noise is drawn in a forward hook on the embedding layer and only when that layer is in training
mode, so eval loss, sample generation and `sftkit generate` (all in eval mode, or without the hook)
see the model unchanged. Scale as in the paper and in transformers' Trainer:

    noise ~ U(-1, 1) · alpha / sqrt(seq × hidden)

with `seq` the row's length in tokens: for packed rows, the length of the pack. Costs one tensor the
size of the embeddings output per forward; draws from the torch RNG, which checkpoints save, so a
resumed run draws the same noise.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sftkit.model.load import transformers_model


def add_neftune_noise(model: nn.Module, alpha: float) -> RemovableHandle:
    """Hook noise into `model`'s input embeddings; `handle.remove()` takes it out again."""

    def noisy(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        magnitude = alpha / math.sqrt(output.size(1) * output.size(2))  # output: (batch, seq, hidden)
        return output + torch.empty_like(output).uniform_(-magnitude, magnitude)

    return transformers_model(model).get_input_embeddings().register_forward_hook(noisy)
