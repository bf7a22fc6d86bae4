"""Summed token cross-entropy, optionally without ever holding the logits of the whole sequence.

The loop divides the *sum* over an optimizer step's trained tokens by their count, so gradient
accumulation and data parallelism reproduce one big batch exactly. Losses here are sums.

Chunked loss: logits (tokens × vocab, fp32) are the largest activation of small and mid-size
models (8192 tokens × 128k vocab × 4 B = 4 GiB). `ChunkedCrossEntropy` walks the tokens in chunks,
computes each chunk's logits, loss and gradients at once, and keeps only the gradient with respect
to the hidden states (tokens × hidden), so peak memory is one chunk's logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sftkit.data.template import IGNORE_INDEX


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of token losses; logits (..., vocab) upcast to fp32 like the reference implementations."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


class ChunkedCrossEntropy(torch.autograd.Function):
    """sum_t CE(hidden_t @ weight.T, target_t), with gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int):
        # hidden (tokens, hidden), weight (vocab, hidden), targets (tokens,)
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            chunk_targets = targets[start:start + chunk_size]
            keep = chunk_targets != IGNORE_INDEX
            if not bool(keep.any()):
                continue
            chunk_hidden = hidden[start:start + chunk_size]
            logits = (chunk_hidden @ weight.T).float()  # (chunk, vocab)
            total += F.cross_entropy(logits, chunk_targets, ignore_index=IGNORE_INDEX, reduction="sum")
            if grad_hidden is None and grad_weight is None:
                continue
            # d(sum CE)/d logits = softmax − onehot on trained rows, 0 elsewhere
            grad_logits = torch.softmax(logits, dim=-1)
            rows = torch.nonzero(keep).squeeze(1)
            grad_logits[rows, chunk_targets[rows]] -= 1.0
            grad_logits[~keep] = 0.0
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_size] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ chunk_hidden).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.to(torch.float32)
        return (
            grad_hidden * scale.to(grad_hidden.dtype) if grad_hidden is not None else None,
            (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None,
            None,
            None,
        )


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              chunk_size: int = 1024) -> torch.Tensor:
    """hidden (batch, seq, hidden), weight (vocab, hidden), targets (batch, seq) → summed CE."""
    return ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk_size)
