"""One optimizer step, and the eval pass that sums loss and accuracy the same way.

One optimizer step is exactly one big batch: its loss is the sum of per-token losses over all its
micro-batches on all processes, divided by the number of trained tokens in the whole step. Each
micro-batch's backward uses `sum / N_step × world` (DDP averages gradients over processes), so
micro 2 × GA 4 and 2 processes × GA 2 give the gradients of micro 8 × GA 1.

    draw (feed.py) ─▶ micro-batches ─▶ forward + backward each (accumulate_gradients)
        ─▶ one all-reduce of the sums (loss, argmax hits, per-source loss, stop votes)
        ─▶ clip ─▶ optimizer step, or skip a non-finite one ─▶ schedule step ─▶ state.step += 1

Cost: one forward and backward per micro-batch, and one all-reduce of 3 + sources floats per step.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import nn

from sftkit.config import eval_metric_key
from sftkit.data.collate import collate
from sftkit.data.examples import Example
from sftkit.data.template import IGNORE_INDEX
from sftkit.train.errors import TrainingError
from sftkit.train.feed import Draw
from sftkit.train.interrupt import StopRequests
from sftkit.train.setup import Run
from sftkit.train.state import RunState


@dataclass
class StepResult:
    """One optimizer step's figures, over every process's share."""

    loss_sum: float  # summed loss of the step's trained targets
    loss: float  # loss_sum / trained targets of the step
    correct: float  # trained targets that were the model's argmax (NaN with a NaN loss)
    source_loss_sums: list[float]  # loss_sum by training source
    grad_norm: float  # before clipping
    lr: float  # the rate this step was taken with
    applied: bool  # False: loss or gradient not finite, the step was skipped
    clipped: bool  # max_grad_norm scaled the gradients down
    stop_requested: bool  # Ctrl-C in some process: every process stops after this step (interrupt.py)


class InterruptedWhileApplying(KeyboardInterrupt):
    """Ctrl-C between the optimizer's step and the step count's: the weights and `state.step` disagree."""


def micro_batch(rows: list[list[Example]], counts: bool, pad_token_id: int, device: torch.device) -> dict:
    """Collate a micro-batch on `device`; one that does not count (a process's empty slot) has no targets."""
    batch = collate(rows, pad_token_id)
    if not counts:
        batch["targets"].fill_(IGNORE_INDEX)
        batch["target_sources"].fill_(-1)
    return {key: value.to(device) for key, value in batch.items()}


def forward_sums(loss_module: nn.Module, accelerator: Accelerator, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's summed loss (what backward takes) and its figures as one (2 + sources,) tensor:
    summed loss, trained targets that were the argmax, summed loss of each training source."""
    loss = loss_module(**batch)
    causal_loss = accelerator.unwrap_model(loss_module)  # the CausalLMLoss, which keeps the batch's figures
    figures = torch.stack([loss.detach().float(), causal_loss.correct.float()])
    return loss, torch.cat([figures, causal_loss.source_loss])


def accumulate_gradients(
    loss_model: nn.Module,
    accelerator: Accelerator,
    batches: list[dict[str, torch.Tensor]],
    step_trained: int,
    saved_tensors: AbstractContextManager | None = None,
) -> torch.Tensor:
    """Backward over this process's micro-batches of one optimizer step; returns their summed
    `forward_sums` figures, so one all-reduce gathers them all.

    Each micro-batch contributes sum_loss / N_step, N_step counting the trained tokens of the whole
    step on all processes; × world because DDP averages gradients. Gradients are only all-reduced
    on the last micro-batch. `saved_tensors` is the context the forward runs in (activation offloading).
    """
    world = accelerator.num_processes
    sums = torch.zeros(2 + accelerator.unwrap_model(loss_model).sources, device=accelerator.device)
    for index, batch in enumerate(batches):
        last = index == len(batches) - 1
        # DeepSpeed steps inside backward when gradients sync: only on the last micro-batch.
        accelerator.gradient_state._set_sync_gradients(last)
        with nullcontext() if last else accelerator.no_sync(loss_model):
            with saved_tensors or nullcontext():
                micro_loss, figures = forward_sums(loss_model, accelerator, batch)
            accelerator.backward(micro_loss * world / step_trained)
        sums += figures
    return sums


def train_step(run: Run, state: RunState, draw: Draw, stops: StopRequests) -> StepResult:
    """Train on one draw and apply the step (or skip it when not finite); advances `state.step`."""
    accelerator, model, max_norm = run.accelerator, run.model, run.config.max_grad_norm
    batches = [micro_batch(rows, counts, run.pad_token_id, accelerator.device) for rows, counts in draw.micro_batches]
    sums = accumulate_gradients(model.loss_module, accelerator, batches, draw.trained, model.offload)
    sums = torch.cat([sums, sums.new_tensor([stops.vote()])])
    loss_sum, correct, *source_loss_sums, stop_votes = accelerator.reduce(sums, "sum").tolist()
    norm = accelerator.clip_grad_norm_(model.loss_module.parameters(), max_norm if max_norm > 0 else math.inf)
    grad_norm = float(norm) if norm is not None else math.nan
    loss = loss_sum / draw.trained
    result = StepResult(
        loss_sum=loss_sum,
        loss=loss,
        correct=correct,
        source_loss_sums=source_loss_sums,
        grad_norm=grad_norm,
        lr=model.scheduler.get_last_lr()[0],
        applied=math.isfinite(loss) and (run.config.fp16 or math.isfinite(grad_norm)),  # fp16: the scaler skips
        clipped=0 < max_norm < grad_norm,
        stop_requested=stop_votes > 0,
    )
    try:
        if result.applied:
            model.optimizer.step()
        else:
            skip(run, state, result, draw)
        model.optimizer.zero_grad(set_to_none=True)
        model.scheduler.step()
        state.step += 1
    except KeyboardInterrupt:
        raise InterruptedWhileApplying from None
    return result


def skip(run: Run, state: RunState, result: StepResult, draw: Draw) -> None:
    """Count a non-finite step, which is not applied; past `max_bad_steps` the run fails."""
    state.skipped_steps += 1
    step, allowed = state.step + 1, run.config.max_bad_steps
    if state.skipped_steps > allowed:
        if run.monitor:
            run.tell(run.monitor.observe_step(step, result.loss, result.grad_norm, result.lr, draw.rows))
        raise TrainingError(
            f"step {step}: loss {result.loss} / grad norm {result.grad_norm} is not finite; the step was not "
            f"applied. {nonfinite_advice(run.config.fp16)} (or allow skipping with max_bad_steps: N)"
        )
    run.say(
        f"[yellow]step {step}: non-finite loss or gradient, step skipped ({state.skipped_steps}/{allowed} "
        "allowed)[/yellow]"
    )


def nonfinite_advice(fp16: bool) -> str:
    hints = ["lower learning_rate", "lengthen warmup (warmup_ratio: 0.03-0.1)"]
    if fp16:
        hints.insert(0, "fp16 overflows easily: use bf16: true on GPUs that support it")
    return "Try: " + "; ".join(hints)


def evaluate(run: Run) -> dict[str, float]:
    """Loss and token accuracy of each eval set (eval_loss or eval_<label>_loss, ...), normalised by
    trained tokens as in training, over every process's share of its micro-batches."""
    accelerator, loss_module = run.accelerator, run.model.loss_module
    rank, world = accelerator.process_index, accelerator.num_processes
    figures: dict[str, float] = {}
    loss_module.eval()
    with torch.no_grad():
        for label, eval_set in run.data.eval_sets.items():
            sums = torch.zeros(2, device=accelerator.device)
            for sequence_ids in eval_set.micro_batches[rank::world]:
                rows = eval_set.examples.read(eval_set.sequences, sequence_ids)
                batch = micro_batch(rows, True, run.pad_token_id, accelerator.device)
                sums += forward_sums(loss_module, accelerator, batch)[1][:2]
            loss_sum, correct = accelerator.reduce(sums, "sum").tolist()
            tokens = int(eval_set.examples.trained.sum())
            figures[eval_metric_key(label, "loss")] = loss_sum / tokens
            figures[eval_metric_key(label, "token_accuracy")] = correct / tokens
            figures[eval_metric_key(label, "tokens")] = tokens
    loss_module.train()
    return figures
