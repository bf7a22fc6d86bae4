"""The training loop, readable top to bottom: set the run up, resume it, then step after step.

    run = setup(config)                    setup.py   data, model, loss, optimizer, schedule, records
    state = resume(run) or a new RunState  checkpoint.py, state.py
    each step:
        draw = feed.draw(step)             feed.py    which examples, packed how, on which process
        train_step(run, state, draw)       step.py    forward/backward per micro-batch, one optimizer step
        record; then log, evaluate, sample and save when due
    finish: the last checkpoint, the final weights, run.json

A reader follows one optimizer step in this file, step.py and feed.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

from sftkit.config import SFTConfig, eval_loss_key, greater_is_better
from sftkit.model.load import ModelError
from sftkit.monitor.samples import generate_samples
from sftkit.rng import capture_rng, restore_rng
from sftkit.train.checkpoint import resume, run_fingerprint, save
from sftkit.train.distributed import is_sharded
from sftkit.train.errors import TrainingError
from sftkit.train.feed import Draw
from sftkit.train.interrupt import StopRequests
from sftkit.train.metrics import (
    accumulate,
    accumulate_sources,
    empty_window,
    source_figures,
    truncate_after,
    window_row,
)
from sftkit.train.outputs import log_samples, save_final, write_run_info
from sftkit.train.setup import Run, setup
from sftkit.train.state import RunState
from sftkit.train.step import InterruptedWhileApplying, StepResult, evaluate, train_step
from sftkit.train.task_eval import task_metrics

# what a caller of `train` uses: the errors it raises besides CheckpointError, and the fingerprint
__all__ = ["ModelError", "RunResult", "TrainingError", "run_fingerprint", "train"]


@dataclass
class RunResult:
    output_dir: Path
    status: str  # finished | stopped | early_stopped
    last_step: int
    final_dir: Path | None
    best_checkpoint: str | None
    final_loss: float | None


def train(config: SFTConfig, console: Console | None = None) -> RunResult:
    run = setup(config, console or Console())
    state = resume(run) or RunState(run_fingerprint(config, run.world))
    start_step, total = state.step, run.data.total_steps
    begun: tuple[int, Any] | None = None  # (step, RNG at its start): Ctrl-C mid-step saves that RNG
    status, progress, started = "finished", make_progress(run, start_step), time.perf_counter()
    begin(run, state)
    try:
        try:
            with progress, StopRequests(lockstep=run.world > 1) as stops:
                while state.step < total:
                    begun = (state.step, capture_rng())
                    draw = run.data.feed.draw(state.step)
                    if draw is None:  # on_exhausted: stop, and every example read is trained on
                        break
                    result = train_step(run, state, draw, stops)
                    record(run, state, result, draw, progress)
                    if due(state.step, config.logging_steps, total):
                        log(run, state, result, elapsed=time.perf_counter() - started)
                    if result.stop_requested:  # Ctrl-C in some process: all of them stop after this same step
                        raise KeyboardInterrupt
                    side_work_started = time.time()  # eval, samples and saves do not count against throughput
                    evaluation = evaluate_if_due(run, state.step)
                    if evaluation:
                        keep_best(run, state, evaluation)
                    if run.can_sample and due(state.step, sample_steps(config), total):
                        sample(run, state.step)
                    if state.step % config.save_steps == 0 and state.step != state.saved_step:
                        save(run, state, evaluation)
                    state.window["time"] += time.time() - side_work_started
                    if state.step % config.logging_steps == 0:
                        write_run_info(run, state, "running")
                    if evaluation and patience_spent(run, state):
                        status = "early_stopped"
                        break
        except KeyboardInterrupt as interrupt:  # Ctrl-C during the steps: save where the run stands
            stop(run, state, start_step, begun, while_applying=isinstance(interrupt, InterruptedWhileApplying))
            write_run_info(run, state, "stopped")
            return RunResult(run.output_dir, "stopped", state.step, None, state.best_checkpoint, state.last_loss)
        final_dir = finish(run, state, status)
    except BaseException as error:
        write_run_info(run, state, "stopped" if isinstance(error, KeyboardInterrupt) else "crashed")
        raise
    finally:
        run.data.feed.close()
        if run.writer:
            run.writer.close()
    write_run_info(run, state, status, final_dir)
    return RunResult(run.output_dir, status, state.step, final_dir, state.best_checkpoint, state.last_loss)


# --------------------------------------------------------------------------- the loop's parts


def begin(run: Run, state: RunState) -> None:
    """Logs past the resumed step are dropped (the run writes them again); run.json says "running"."""
    if run.main:
        for name in ("metrics.jsonl", "samples.jsonl", "diagnosis.jsonl"):
            truncate_after(run.output_dir / name, state.step)
    write_run_info(run, state, "running")
    config, data, model = run.config, run.data, run.model
    per_epoch = f" ({data.steps_per_epoch}/epoch)" if data.steps_per_epoch else ""
    micro, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
    run.say(
        f"[bold]Effective batch[/bold] = {micro} (micro) × {accumulation} (GA) × {run.world} (processes) = "
        f"{micro * accumulation * run.world} sequences · {data.total_steps} steps{per_epoch} · warmup "
        f"{data.warmup_steps} · trainable {model.trainable:,} / {model.total:,} parameters "
        f"({model.trainable / model.total:.2%})"
    )


def due(step: int, every: int | None, total: int) -> bool:
    """Every `every` steps and at the last one; never when `every` is 0 or None."""
    return every is not None and every > 0 and (step % every == 0 or step == total)


def evaluate_if_due(run: Run, step: int) -> dict[str, float] | None:
    """The eval sets' loss and token accuracy every eval_steps, and their task metrics (eval_metric) every
    eval_generation_steps, with the loss beside them."""
    config, total = run.config, run.data.total_steps
    generate = run.task_eval is not None and due(step, config.resolved_generation_steps, total)
    if not generate and not due(step, config.resolved_eval_steps, total):
        return None
    evaluation = evaluate(run)
    if generate:
        assert run.task_eval is not None
        evaluation |= task_metrics(run.task_eval, run.model.model, run.tokenizer, run.template, run.accelerator)
    return evaluation


def sample_steps(config: SFTConfig) -> int:
    return config.sample_steps or config.resolved_eval_steps or config.logging_steps * 10


def record(run: Run, state: RunState, result: StepResult, draw: Draw, progress: Progress) -> None:
    """Add the step to the metric window (a skipped step adds its tokens, not its loss), tell the monitor."""
    applied = result.applied
    if applied:
        state.last_loss = result.loss
    window = state.window
    accumulate(
        window,
        result.loss_sum if applied else 0.0,
        draw.trained,
        draw.tokens,
        int(result.correct) if applied else 0,
        result.clipped,
    )
    source_losses = result.source_loss_sums if applied else [0.0] * len(result.source_loss_sums)
    accumulate_sources(window, source_losses, draw.source_trained.tolist())
    if run.monitor:
        run.tell(run.monitor.observe_step(state.step, result.loss, result.grad_norm, result.lr, draw.rows))
    progress.update(progress.task_ids[0], completed=state.step, loss=result.loss, lr=result.lr)


def log(run: Run, state: RunState, result: StepResult, elapsed: float) -> None:
    """One metrics row over the window, which then starts again."""
    feed, step = run.data.feed, state.step
    row = {
        **window_row(state.window, step, feed.epoch_of(step), result.lr, result.grad_norm, elapsed, run.world),
        **source_figures(state.window, feed.sources),
    }
    if run.writer:
        run.writer.log(row)
        if not run.console.is_terminal:  # logs to a file get a line per row instead of a bar
            run.say(
                f"step {step}/{run.data.total_steps} loss {row['loss']:.4f} lr {result.lr:.2e} grad_norm "
                f"{result.grad_norm:.3f} {row['trained_tokens_per_s']:.0f} trained tok/s",
                highlight=False,
            )
    state.window = empty_window()


def keep_best(run: Run, state: RunState, evaluation: dict[str, float]) -> None:
    """Log an evaluation, and keep its checkpoint when its `metric_for_best_model` is the best yet. A task
    metric generated every eval_generation_steps is judged at the evals that generate it."""
    config, step, metric = run.config, state.step, run.config.best_model_metric
    assert metric is not None  # set whenever there is eval data
    if run.writer:
        run.writer.log({"step": step, "epoch": run.data.feed.epoch_of(step), **evaluation})
    value = evaluation.get(metric)
    improved = value is not None and is_better(value, state.best_value, metric)
    if improved:
        state.best_value, state.evals_without_gain = value, 0
    elif value is not None:
        state.evals_without_gain += 1
    if improved and (config.early_stopping_patience or step % config.save_steps == 0):
        state.best_checkpoint = f"checkpoint-{step}"
        save(run, state, evaluation)
    if run.monitor:  # overfitting is judged on the loss of the set that picks the best checkpoint
        train_loss = state.last_loss or math.nan
        run.tell(run.monitor.observe_eval(step, train_loss, evaluation[eval_loss_key(metric)], state.best_checkpoint))


def is_better(value: float, best: float | None, metric: str) -> bool:
    """Whether an eval improves on the best so far: lower for losses, higher for accuracies."""
    if best is None:
        return math.isfinite(value)
    return value > best if greater_is_better(metric) else value < best


def patience_spent(run: Run, state: RunState) -> bool:
    patience = run.config.early_stopping_patience
    if not patience or state.evals_without_gain < patience:
        return False
    run.say(
        f"Early stopping at step {state.step}: {run.config.best_model_metric} has not improved for {patience} "
        f"evals; best is {state.best_checkpoint} ({state.best_value:.4f})"
    )
    return True


def sample(run: Run, step: int) -> None:
    """Completions of the sample prompts, generated by the main process while the others wait."""
    if run.main:
        with torch.compiler.set_stance("force_eager"):  # KV-cache decoding: never worth compiling
            samples = generate_samples(
                run.model.model, run.tokenizer, run.template, run.sample_prompts, run.config.max_new_tokens
            )
        log_samples(run.output_dir, run.writer, step, samples, run.console)
        if run.monitor:
            run.tell(run.monitor.observe_samples(step, samples))
    run.accelerator.wait_for_everyone()


def stop(run: Run, state: RunState, start_step: int, begun: tuple[int, Any] | None, while_applying: bool) -> None:
    """Ctrl-C: save where the run stands (`save_on_interrupt`) unless a step was being applied."""
    run.say(f"[yellow]Interrupted at step {state.step}.[/yellow]")
    if not run.config.save_on_interrupt or state.step <= start_step:
        return
    if while_applying:
        run.say(
            f"[yellow]Not saved: interrupted while applying step {state.step + 1}; resume from the newest "
            "checkpoint with `--resume_from_checkpoint true`.[/yellow]"
        )
        return
    if begun is not None and begun[0] == state.step:  # a step was half done: its dropout draws are redone
        restore_rng(*begun[1])
    path = save(run, state)
    run.say(f"Saved {path}; resume with `--resume_from_checkpoint true`.")


def finish(run: Run, state: RunState, status: str) -> Path:
    """A last checkpoint, and the final adapter or model with its tokenizer and template."""
    total = run.data.total_steps
    if status == "finished" and state.step < total:
        run.say(
            f"[yellow]The training data ran out at step {state.step} of {total}; stopping "
            "(on_exhausted: stop).[/yellow]"
        )
    if state.step != state.saved_step:
        save(run, state)
    final_dir = run.output_dir / ("model" if run.config.finetuning == "full" else "adapter")
    # Under FSDP/DeepSpeed the full weights must be gathered by every process first.
    gathered = run.accelerator.get_state_dict(run.model.loss_module) if is_sharded(run.accelerator) else None
    if run.main:
        state_dict = {k.removeprefix("model."): v for k, v in gathered.items()} if gathered else None
        save_final(run.model.model, run.tokenizer, run.template, final_dir, state_dict, run.model.initial_adapter)
    run.accelerator.wait_for_everyone()
    loss = "n/a (no step run since the resumed checkpoint)" if state.last_loss is None else f"{state.last_loss:.4f}"
    run.say(
        f"[bold green]Done[/bold green]: {state.step} steps, final loss {loss}. Weights: {final_dir}. "
        f"Report: `sftkit report {run.output_dir}`"
    )
    return final_dir


def make_progress(run: Run, start_step: int) -> Progress:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f} · lr {task.fields[lr]:.2e}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=run.console,
        disable=not run.main,
        transient=False,
    )
    progress.add_task("training", total=run.data.total_steps, completed=start_step, loss=math.nan, lr=0.0)
    return progress
