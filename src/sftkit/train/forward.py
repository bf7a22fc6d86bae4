"""The training forward pass: packed batches with block-diagonal attention, loss as a token sum.

Packing must never let an example attend to its neighbours. No backend is trusted to infer that from
`position_ids` (transformers' flash path does so only at micro-batch 1; with a KV cache its sdpa/eager
paths let a packed example see the previous ones). Each backend gets the boundaries explicitly, as
`sftkit.model.attention` describes: cu_seqlens kwargs for varlen and flash, a BlockMask for flex, a
dense block-causal mask for sdpa and eager.

`tests/test_attention.py` proves, per backend, that each packed example's loss equals its loss alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sftkit.data.collate import block_causal_mask
from sftkit.model.attention import VARLEN, boundary_kwargs, flex_block_mask
from sftkit.train.loss import chunked_cross_entropy, correct_predictions, sum_by_source, token_cross_entropy

# Configs whose logits are not plain `lm_head(hidden)`; the chunked loss would not be exact for them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def causal_lm(model: Any) -> Any:
    """The transformers CausalLM inside a PEFT wrapper (LoRA layers are injected in place); typed
    `Any` because transformers' and peft's methods are not on `nn.Module`."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_weight(head: Any) -> torch.Tensor:
    """The output head's weight as its forward uses it: with trainable token rows (peft's
    `trainable_token_indices`), the base weight with those rows replaced by their trained values."""
    rows = getattr(head, "token_adapter", None)
    return rows.get_merged_weights(rows.active_adapters) if rows is not None else head.weight


def chunked_loss_is_exact(model: nn.Module) -> bool:
    """True when logits are exactly `hidden @ head_weight.T` (no bias, scaling or soft-capping)."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    linear = head.token_adapter.base_layer if hasattr(head, "token_adapter") else head
    config = lm.config
    return (
        type(linear) is nn.Linear
        and linear.bias is None
        and hasattr(lm, lm.base_model_prefix)
        and not any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)
    )


class CausalLMLoss(nn.Module):
    """Wraps the model so one call returns the summed loss of a batch.

    Wrapping (rather than calling submodules from the loop) keeps DDP/FSDP hooks working when
    accelerate prepares this module. After each call, `correct` holds how many of the batch's trained
    targets were the model's argmax (for token accuracy), and `source_loss` the summed loss of the
    targets of each of the run's `sources` training sources: kept beside the return value so that
    every caller that wants the loss alone stays a plain `loss = loss_model(**batch)`.
    """

    def __init__(
        self, model: nn.Module, attn_implementation: str, chunked: bool, chunk_size: int = 1024, sources: int = 1
    ):
        super().__init__()
        self.model = model
        self.attn_implementation = attn_implementation
        self.chunked = chunked
        self.chunk_size = chunk_size
        self.sources = sources
        self.correct: torch.Tensor | None = None  # 0-d long, set by forward
        self.source_loss: torch.Tensor | None = None  # (sources,) fp32, set by forward when given target_sources

    def attention_inputs(self, segment_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> dict:
        """What the model's forward needs so that each example attends only to itself."""
        if self.attn_implementation in (VARLEN, "flash_attention_2", "flash_attention_3"):  # cu_seqlens kwargs
            return boundary_kwargs(cu_seqlens)
        if self.attn_implementation == "flex_attention":
            return {"attention_mask": flex_block_mask(segment_ids)}
        mask = block_causal_mask(segment_ids)  # (batch, 1, seq, seq) bool
        if self.attn_implementation == "eager":
            dtype = next(self.model.parameters()).dtype
            dtype = dtype if dtype.is_floating_point else torch.float32
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        return {"attention_mask": mask}

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        position_ids: torch.Tensor,
        segment_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        target_sources: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Summed cross-entropy over the trained targets of the batch (a 0-d fp32 tensor).

        `target_sources` (batch, seq): the source index of each target, -1 where none (see `collate`).
        """
        inputs = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "use_cache": False,
            **self.attention_inputs(segment_ids, cu_seqlens),
        }
        if not self.chunked:
            logits = self.model(**inputs).logits  # (batch, seq, vocab)
            self.correct = correct_predictions(logits, targets)
            token_losses = token_cross_entropy(logits, targets)  # (batch × seq,)
            loss = token_losses.sum()
        else:
            lm = causal_lm(self.model)
            hidden = getattr(lm, lm.base_model_prefix)(**inputs).last_hidden_state  # (batch, seq, hidden)
            loss, self.correct, token_losses = chunked_cross_entropy(
                hidden, head_weight(lm.get_output_embeddings()), targets, self.chunk_size
            )
        self.source_loss = None if target_sources is None else sum_by_source(token_losses, target_sources, self.sources)
        return loss
