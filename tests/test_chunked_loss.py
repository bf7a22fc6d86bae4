"""The chunked loss is the plain loss: same value and same gradients, whatever the chunking.

Reference: `cross_entropy_sum(hidden @ weight.T, targets)`, autograd through the full logits.
"""

from __future__ import annotations

import pytest
import torch

from sftkit.data.template import IGNORE_INDEX
from sftkit.train.loss import chunked_cross_entropy_sum, cross_entropy_sum

BATCH, SEQ, HIDDEN, VOCAB = 2, 37, 16, 101  # 74 tokens: chunk sizes 8 and 16 leave a short last chunk


def make_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) / HIDDEN**0.5
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    targets[torch.rand(BATCH, SEQ, generator=generator) < 0.3] = IGNORE_INDEX  # scattered prompt tokens
    targets[0, :16] = IGNORE_INDEX  # chunk size 8: the first two chunks have nothing to train
    targets[:, -1] = IGNORE_INDEX  # last position of a row never has a target
    return hidden, weight, targets


def loss_and_grads(loss_fn, hidden, weight, targets, train_weight: bool, scale: float):
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(train_weight)
    loss = loss_fn(hidden, weight, targets)
    # The loop backpropagates loss_sum / trained_tokens, so the incoming gradient is not 1.
    (loss * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def plain(hidden, weight, targets):
    return cross_entropy_sum(hidden @ weight.T, targets)  # (batch, seq, vocab) logits


@pytest.mark.parametrize("train_weight", [False, True], ids=["weight_frozen", "weight_trained"])
@pytest.mark.parametrize("chunk_size", [1, 8, 16, 37, 74, 4096])
def test_chunked_equals_plain_in_value_and_gradients(chunk_size, train_weight):
    hidden, weight, targets = make_inputs()
    scale = 1 / int((targets != IGNORE_INDEX).sum())
    expected = loss_and_grads(plain, hidden, weight, targets, train_weight, scale)
    chunked = loss_and_grads(
        lambda h, w, t: chunked_cross_entropy_sum(h, w, t, chunk_size), hidden, weight, targets, train_weight, scale
    )

    torch.testing.assert_close(chunked[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked[1], expected[1], rtol=1e-5, atol=1e-5)
    if train_weight:
        torch.testing.assert_close(chunked[2], expected[2], rtol=1e-5, atol=1e-5)
    else:
        assert chunked[2] is None and expected[2] is None


def test_untrained_positions_get_zero_gradient():
    hidden, weight, targets = make_inputs()
    _, grad_hidden, _ = loss_and_grads(
        lambda h, w, t: chunked_cross_entropy_sum(h, w, t, 8), hidden, weight, targets, train_weight=False, scale=1.0
    )
    untrained = targets == IGNORE_INDEX
    assert untrained[0, :16].all()  # with chunk size 8, two whole chunks of positions with nothing to train
    assert not grad_hidden[untrained].any()
    assert grad_hidden[~untrained].abs().sum(-1).gt(0).all()


def test_all_targets_ignored_gives_zero_loss_and_zero_gradients():
    hidden, weight, _ = make_inputs()
    targets = torch.full((BATCH, SEQ), IGNORE_INDEX)
    loss, grad_hidden, grad_weight = loss_and_grads(
        lambda h, w, t: chunked_cross_entropy_sum(h, w, t, 8), hidden, weight, targets, train_weight=True, scale=1.0
    )
    assert loss.item() == 0.0 == plain(hidden, weight, targets).item()
    assert not grad_hidden.any() and not grad_weight.any()


def test_gradient_flows_through_the_layers_below():
    """hidden is an activation, not a leaf: the gradient reaches the weights that produced it."""
    hidden, weight, targets = make_inputs()
    layer = torch.nn.Linear(HIDDEN, HIDDEN)
    grads = []
    for loss_fn in (plain, lambda h, w, t: chunked_cross_entropy_sum(h, w, t, 16)):
        layer.zero_grad()
        loss_fn(layer(hidden), weight, targets).backward()
        grads.append(layer.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


def test_no_grad_gives_the_same_value():
    """Eval runs under torch.no_grad(): same loss, and no gradient buffers are built."""
    hidden, weight, targets = make_inputs()
    with torch.no_grad():
        loss = chunked_cross_entropy_sum(hidden.requires_grad_(True), weight, targets, 8)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, plain(hidden, weight, targets).detach(), rtol=1e-5, atol=1e-5)
