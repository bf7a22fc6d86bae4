"""Summed token cross-entropy, optionally without ever holding the logits of the whole sequence.

The loop divides the *sum* over an optimizer step's trained tokens by their count, so gradient
accumulation and data parallelism reproduce one big batch exactly. Losses here are sums.

Chunked loss: logits (tokens × vocab, fp32) are the largest activation of small and mid-size
models (8192 tokens × 128k vocab × 4 B = 4 GiB, and autograd keeps a second such tensor for the
log-softmax). `ChunkedCrossEntropy` takes only the tokens that have a target (assistant-only loss
masks the prompts: often half of all tokens), walks them in chunks, computes each chunk's logits,
loss and gradients at once in a single (chunk, vocab) fp32 buffer, and keeps only the gradients
with respect to the hidden states and, when it is trained, the output weight. Peak memory is one
chunk's logits instead of two or three copies of the whole sequence's, and the output layer's
matmuls run on trained tokens only, which is exact: an ignored token's gradient is zero.

    position  0  1  2  3  4  5  6  7  8  9
    target    -  -  -  5  7  -  -  2  9  4        (- = IGNORE_INDEX)
    trained            3  4        7  8  9        chunk_size 2: [3 4] [7 8] [9]
    grad_hidden rows 0-2 and 5-6 stay zero

Token accuracy (how many trained targets are the model's argmax) comes from the same pass: the
chunk's row maximum, which the log-softmax needs anyway, also gives the argmax, so counting costs
one (chunk,) comparison and no vocab-sized buffer.

Loss per training source: both paths also give each position's loss (0 where ignored), which the
cross-entropy computes anyway; `sum_by_source` adds them up by the source of each target. Cost: one
(tokens,) fp32 vector, no extra pass over the output head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sftkit.data.template import IGNORE_INDEX


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of token losses; logits (..., vocab) upcast to fp32 like the reference implementations."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(tokens,) fp32 loss of each position, 0 where the target is ignored; its sum is `cross_entropy_sum`."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )


def sum_by_source(token_losses: torch.Tensor, target_sources: torch.Tensor, sources: int) -> torch.Tensor:
    """(sources,) fp32 summed loss per training source, without gradient.

    token_losses (tokens,), target_sources (...) with tokens elements: the source index of each
    position's target, -1 where there is none. Linear in tokens.
    """
    positions = target_sources.reshape(-1)
    counted = positions >= 0
    return torch.zeros(sources, dtype=torch.float32, device=token_losses.device).index_add_(
        0, positions[counted], token_losses.detach().float()[counted]
    )


def correct_predictions(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How many trained targets equal the argmax of their logits (..., vocab); ignored targets never match."""
    return (logits.detach().argmax(dim=-1) == targets).sum()  # argmax: (...,), no vocab-sized copy


class ChunkedCrossEntropy(torch.autograd.Function):
    """sum_t CE(hidden_t @ weight.T, target_t) over trained tokens, gradients computed chunk by chunk in forward.

    Returns (loss sum, count of targets that are the argmax, (tokens,) loss of each position with 0
    where ignored); the last two carry no gradient.
    """

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int, with_grad: bool
    ):
        # hidden (tokens, hidden), weight (vocab, hidden), targets (tokens,)
        # `needs_input_grad` is also True under torch.no_grad(), hence the explicit `with_grad`.
        need_hidden = with_grad and ctx.needs_input_grad[0]
        need_weight = with_grad and ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        token_losses = torch.zeros(targets.shape[0], dtype=torch.float32, device=hidden.device)  # (tokens,)
        # Ignored tokens add nothing to the loss and get zero gradient: never compute their logits.
        trained = torch.nonzero(targets != IGNORE_INDEX).squeeze(1)  # (trained,)
        trained_hidden = hidden.index_select(0, trained)  # (trained, hidden)
        trained_targets = targets.index_select(0, trained)[:, None]  # (trained, 1)
        for start in range(0, trained.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            # A function call per chunk, so the chunk's (chunk, vocab) buffer is freed before the next is made.
            losses, right = _chunk_loss_and_grads(
                trained_hidden[chunk], weight, trained_targets[chunk], trained[chunk], grad_hidden, grad_weight
            )
            total += losses.sum()
            correct += right
            token_losses[trained[chunk]] = losses
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct, token_losses)
        return total, correct, token_losses

    @staticmethod
    def backward(
        ctx, grad_output: torch.Tensor, _grad_correct: torch.Tensor | None, _grad_token_losses: torch.Tensor | None
    ):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output.float()).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def _chunk_loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor,
    grad_hidden: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of each of one chunk's trained tokens (chunk,) and their argmax hits; adds the chunk's
    gradients into grad_hidden[rows] and grad_weight.

    hidden (chunk, hidden), targets (chunk, 1), rows (chunk,): the chunk's positions in the sequence.
    """
    logits = (hidden @ weight.T).float()  # (chunk, vocab); the only vocab-sized buffer
    target_logits = logits.gather(1, targets)  # (chunk, 1)
    # logsumexp by hand, in place: torch.logsumexp would allocate two more (chunk, vocab) buffers.
    row_max, predicted = logits.max(dim=-1, keepdim=True)  # (chunk, 1) each; ties give the first index, as argmax
    correct = (predicted == targets).sum()
    unnormalized = logits.sub_(row_max).exp_()  # (chunk, vocab), overwrites the logits
    normalizer = unnormalized.sum(dim=-1, keepdim=True)  # (chunk, 1)
    losses = (row_max + normalizer.log() - target_logits).squeeze(1)  # (chunk,)
    if grad_hidden is None and grad_weight is None:
        return losses, correct
    # d(sum CE)/d logits = softmax − onehot(target), in place.
    grad_logits = unnormalized.div_(normalizer)
    grad_logits.scatter_add_(1, targets, torch.full_like(normalizer, -1.0))
    grad_logits = grad_logits.to(hidden.dtype)
    if grad_hidden is not None:
        grad_hidden[rows] = grad_logits @ weight
    if grad_weight is not None:
        grad_weight += (grad_logits.T @ hidden).float()
    return losses, correct


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (batch, seq, hidden), weight (vocab, hidden), targets (batch, seq) → (summed CE, argmax hits,
    (batch × seq,) loss of each position).

    Equals `cross_entropy_sum(hidden @ weight.T, targets)`, values and gradients,
    `correct_predictions(hidden @ weight.T, targets)` and `token_cross_entropy(hidden @ weight.T, targets)`,
    without the (batch × seq, vocab) logits.
    Gradients are computed during forward, so call it once per backward.
    """
    return ChunkedCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk_size, torch.is_grad_enabled()
    )


def chunked_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """The summed CE of `chunked_cross_entropy` alone."""
    return chunked_cross_entropy(hidden, weight, targets, chunk_size)[0]
