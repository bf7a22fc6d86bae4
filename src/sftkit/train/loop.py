"""The training loop: setup → train → save, readable top to bottom.

One optimizer step is exactly one big batch: its loss is the sum of per-token losses over all its
micro-batches on all processes, divided by the number of trained tokens in the whole step. Each
micro-batch's backward uses `sum / N_step × world` (DDP averages gradients over processes), so
micro 2 × GA 4 and 2 processes × GA 2 give the gradients of micro 8 × GA 1.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from rich.markup import escape

from sftkit.config import SFTConfig, eval_loss_key, eval_metric_key, greater_is_better, redacted, save_config
from sftkit.data.collate import collate
from sftkit.data.examples import TrainingExamples
from sftkit.data.template import IGNORE_INDEX, resolve_chat_template
from sftkit.model.load import ModelError, load_tokenizer
from sftkit.model.quantize import check_qlora_supported
from sftkit.monitor.diagnosis import Monitor, MonitorSettings
from sftkit.monitor.samples import generate_samples, load_sample_prompts
from sftkit.rng import capture_rng, restore_rng
from sftkit.train import checkpoint as ckpt
from sftkit.train.checkpoint import save_checkpoint
from sftkit.train.distributed import is_sharded, make_accelerator, require_shared_output_dir
from sftkit.train.errors import TrainingError
from sftkit.train.forward import CausalLMLoss
from sftkit.train.interrupt import StopRequests
from sftkit.train.metrics import (
    MetricsWriter,
    accumulate,
    accumulate_sources,
    empty_window,
    source_figures,
    truncate_after,
    window_row,
)
from sftkit.train.offload import activation_offloading
from sftkit.train.optim import build_optimizer
from sftkit.train.outputs import (
    log_samples,
    prepare_output_dir,
    save_final,
    write_run_info,
)
from sftkit.train.run_data import load_run_data
from sftkit.train.run_model import load_run_model
from sftkit.train.schedule import build_scheduler, lr_multiplier, warmup_steps_for
from sftkit.train.sinks import check_installed


@dataclass
class RunResult:
    output_dir: Path
    status: str  # finished | stopped | early_stopped
    last_step: int
    final_dir: Path | None
    best_checkpoint: str | None
    final_loss: float | None


def train(config: SFTConfig, console: Console | None = None) -> RunResult:
    console = console or Console()
    accelerator = make_accelerator(
        "bf16" if config.bf16 else "fp16" if config.fp16 else "no",
        config.per_device_train_batch_size,
        config.max_grad_norm,
    )
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    say = console.print if main else (lambda *a, **k: None)

    def tell(findings: list) -> None:
        for finding in findings:  # model text may hold [brackets]: never read as markup
            say(f"[bold yellow]diagnosis:[/bold yellow] {escape(finding.message)} — {escape(finding.advice)}")

    output_dir = Path(config.output_dir)
    note = check_hardware(config)
    if note:
        say(f"[yellow]{escape(note)}[/yellow]")
    check_installed(config.report_sinks)  # a missing tracker fails before data and model are loaded
    if main:
        prepare_output_dir(output_dir, config)
    require_shared_output_dir(accelerator, output_dir)  # several machines: one output_dir they all see
    set_seed(config.seed)

    # ---- data: tokenized, masked, packed; the feed says which examples each step trains on
    tokenizer = load_tokenizer(config.tokenizer_source, config.trust_remote_code)
    template = resolve_chat_template(config.chat_template, tokenizer)
    run_data = load_run_data(config, tokenizer, template, accelerator, tell=lambda text: say(escape(text)))
    data, feed, total_steps = run_data.prepared, run_data.feed, run_data.total_steps
    warmup = warmup_steps_for(total_steps, *config.warmup_fraction_or_steps)

    # ---- model: base weights, adapters, the loss wrapper, optimizer and schedule
    run_model = load_run_model(config, tokenizer, template)
    model, initial_adapter, trainable, total_params = (
        run_model.model,
        run_model.initial_adapter,
        run_model.trainable,
        run_model.total,
    )
    if run_model.token_ids:
        names = tokenizer.convert_ids_to_tokens(list(run_model.token_ids))
        say(f"Trainable token rows (embedding and output head): {escape(', '.join(names))}")
    offload = activation_offloading(config.activation_offloading, tell=say)
    chunked = run_model.chunked
    loss_model = CausalLMLoss(model, config.attn_implementation, chunked, config.loss_chunk_size, len(feed.sources))
    optimizer = build_optimizer(
        model, config.learning_rate, config.weight_decay, (config.adam_beta1, config.adam_beta2), config.adam_epsilon
    )
    scheduler = build_scheduler(optimizer, total_steps, warmup, config.lr_scheduler_type, config.min_lr_ratio)
    loss_model, optimizer = accelerator.prepare(loss_model, optimizer)
    unwrapped = accelerator.unwrap_model(loss_model).model

    # ---- resume: weights, optimizer, schedule, RNG and position of the same run
    fingerprint = run_fingerprint(config, world)
    state: dict[str, Any] = {
        "step": 0,
        "best_metric": None,
        "best_checkpoint": None,
        "evals_without_gain": 0,
        "window": empty_window(),
        "fingerprint": fingerprint,
    }
    if config.resume_from_checkpoint not in (None, False):
        found = ckpt.find_resume_checkpoint(
            output_dir,
            "true" if config.resume_from_checkpoint is True else config.resume_from_checkpoint,
            fingerprint,
            world,
            warn=say,
        )
        if found is None:
            say(f"[yellow]resume_from_checkpoint: no checkpoint in {output_dir}; starting from step 0[/yellow]")
        else:
            path, state = found
            ckpt.load_state(path, unwrapped, optimizer, scheduler, config.finetuning, rank, accelerator)
            feed.load_state(ckpt.load_data_state(path))
            say(f"Resumed from {path} at step {state['step']}")
    start_step = state["step"]
    stats = run_data.stats(config.max_seq_length, config.per_device_train_batch_size, config.packing)

    # ---- run directory, sinks, monitor, samples
    eval_steps = config.resolved_eval_steps
    best_metric = config.best_model_metric  # e.g. eval_loss, eval_gsm8k_loss; None without eval data
    sample_steps = config.sample_steps or eval_steps or config.logging_steps * 10
    prompts = load_sample_prompts(config.sample_prompts, data.eval_messages or [], count=4)
    writer, monitor = None, None
    if main:
        for name in ("metrics.jsonl", "samples.jsonl", "diagnosis.jsonl"):
            truncate_after(output_dir / name, start_step)
        save_config(config, output_dir / "config.yaml")
        (output_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
        (output_dir / "data_stats.json").write_text(json.dumps(stats, indent=2))
        writer = MetricsWriter(output_dir, config.report_sinks, output_dir.name, redacted(config))
        monitor = Monitor(
            MonitorSettings(
                learning_rate=config.learning_rate,
                total_steps=total_steps,
                warmup_steps=warmup,
                expected_lr=lambda s: (
                    config.learning_rate
                    * lr_multiplier(s - 1, total_steps, warmup, config.lr_scheduler_type, config.min_lr_ratio)
                ),
                trained_token_fraction=stats["trained_token_fraction"],
                precision="bf16" if config.bf16 else "fp16" if config.fp16 else "fp32",
            ),
            output_dir / "diagnosis.jsonl",
        )
    run_info = {
        "status": "running",
        "model_name_or_path": config.model_name_or_path,
        "finetuning": config.finetuning,
        "world_size": world,
        "micro_batch_size": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "effective_batch": config.per_device_train_batch_size * config.gradient_accumulation_steps * world,
        "sequences": run_data.sequences,
        "steps_per_epoch": run_data.steps_per_epoch,
        "total_steps": total_steps,
        "streaming": config.streaming,
        "sources": feed.sources,
        "source_weights": [spec.weight for spec in config.datasets] if config.is_mixture else None,
        "warmup_steps": warmup,
        "trainable_params": trainable,
        "total_params": total_params,
        "trained_token_fraction": stats["trained_token_fraction"],
        "packing": config.packing,
        "chunked_loss": chunked,
        "last_step": start_step,
        "best_checkpoint": state["best_checkpoint"],
        "metric_for_best_model": best_metric,
        "best_metric": state["best_metric"],
        "final_dir": None,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "finished_at": None,
    }
    write_run_info(output_dir, run_info, main)
    per_epoch = f" ({run_data.steps_per_epoch}/epoch)" if run_data.steps_per_epoch else ""
    say(
        f"[bold]Effective batch[/bold] = {config.per_device_train_batch_size} (micro) × "
        f"{config.gradient_accumulation_steps} (GA) × {world} (processes) = {run_info['effective_batch']} sequences "
        f"· {total_steps} steps{per_epoch} · warmup {warmup} · "
        f"trainable {trainable:,} / {total_params:,} parameters ({trainable / total_params:.2%})"
    )

    def batch_of(rows: list[list[dict]], counts: bool) -> dict[str, torch.Tensor]:
        """Collate a micro-batch; one that does not count (a process's empty slot) has no targets."""
        batch = collate(rows, tokenizer.pad_token_id)
        if not counts:
            batch["targets"].fill_(IGNORE_INDEX)
            batch["target_sources"].fill_(-1)
        return {k: v.to(accelerator.device) for k, v in batch.items()}

    eval_sets = {}  # label ('' when unnamed) → (examples, their sequences, micro-batches of sequence ids)
    for label, tokenized in data.eval_sets.items():
        eval_examples = TrainingExamples.from_dataset(tokenized.dataset)
        eval_sequences = eval_examples.sequences(config.max_seq_length, config.packing)
        size = config.per_device_eval_batch_size
        eval_sets[label] = (
            eval_examples,
            eval_sequences,
            [range(i, min(i + size, len(eval_sequences))) for i in range(0, len(eval_sequences), size)],
        )

    def evaluate() -> dict[str, float]:
        """Loss and token accuracy of each eval set (eval_loss or eval_<label>_loss, ...), normalised by
        trained tokens as in training, over every process's share."""
        metrics: dict[str, float] = {}
        counter = accelerator.unwrap_model(loss_model)
        loss_model.eval()
        with torch.no_grad():
            for label, (eval_examples, eval_sequences, micro_batches) in eval_sets.items():
                tokens = int(eval_examples.trained.sum())
                sums = torch.zeros(2, device=accelerator.device)
                for sequence_ids in micro_batches[rank::world]:
                    batch = collate(eval_examples.read(eval_sequences, sequence_ids), tokenizer.pad_token_id)
                    loss = loss_model(**{k: v.to(accelerator.device) for k, v in batch.items()})
                    sums += torch.stack([loss.float(), counter.correct.float()])
                loss_sum, correct = accelerator.reduce(sums, "sum").tolist()
                metrics.update(
                    {
                        eval_metric_key(label, "loss"): loss_sum / tokens,
                        eval_metric_key(label, "token_accuracy"): correct / tokens,
                        eval_metric_key(label, "tokens"): tokens,
                    }
                )
        loss_model.train()
        return metrics

    # Steps checkpointed by this run (and the one it resumed from): any other checkpoint-STEP in the
    # directory, e.g. a damaged one that `resume_from_checkpoint: latest` skipped, is written again.
    saved_steps = {start_step}

    def save(step: int, evaluation: dict[str, float] | None = None) -> Path:
        saved_steps.add(step)
        path = save_checkpoint(
            accelerator,
            output_dir,
            step,
            unwrapped,
            optimizer,
            scheduler,
            {**state, "step": step, "epoch": feed.epoch_of(step), **(evaluation or {})},
            config,
            template,
            feed.state_for(step),
        )
        if main:
            keep = {output_dir / state["best_checkpoint"]} if state["best_checkpoint"] else set()
            ckpt.prune(output_dir, config.save_total_limit, keep)
        return path

    # ---- the loop
    step = start_step
    status = "finished"
    last_loss: float | None = None
    window = state["window"]
    bad_steps = 0
    loss_model.train()
    started = time.perf_counter()
    progress = make_progress(console, main)
    task = progress.add_task("training", total=total_steps, completed=start_step, loss=float("nan"), lr=0.0)
    applying, rng_at_step_start = False, None
    try:
        with progress, StopRequests(lockstep=world > 1) as stops:
            while step < total_steps:
                rng_at_step_start = capture_rng()  # Ctrl-C mid-step saves the RNG this step began with
                drawn = feed.step(step)
                if drawn is None:  # on_exhausted: stop, and every example read is trained on
                    say(
                        f"[yellow]The training data ran out at step {step} of {total_steps}; stopping "
                        "(on_exhausted: stop).[/yellow]"
                    )
                    break
                step_trained, step_tokens = drawn.trained, drawn.tokens
                batches = [batch_of(rows, counts) for rows, counts in drawn.micro_batches]
                sums = accumulate_gradients(loss_model, accelerator, batches, step_trained, offload)
                sums = torch.cat([sums, sums.new_tensor([stops.vote()])])
                reduced = accelerator.reduce(sums, "sum").tolist()
                step_loss_sum, step_correct, *step_source_loss, stop_votes = reduced
                step_loss = step_loss_sum / step_trained
                grad_norm = accelerator.clip_grad_norm_(
                    loss_model.parameters(), config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
                )
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
                clipped = 0 < config.max_grad_norm < grad_norm  # the norm is the one before clipping
                lr = scheduler.get_last_lr()[0]
                finite = math.isfinite(step_loss) and (config.fp16 or math.isfinite(grad_norm))
                applying = True  # from here until `step += 1` the weights and the step count disagree
                if finite:
                    optimizer.step()
                else:
                    bad_steps += 1
                    if bad_steps > config.max_bad_steps:
                        if monitor:
                            tell(monitor.observe_step(step + 1, step_loss, grad_norm, lr, drawn.rows))
                        raise TrainingError(
                            f"step {step + 1}: loss {step_loss} / grad norm {grad_norm} is not finite; the step was "
                            "not applied. " + nonfinite_advice(config) + " (or allow skipping with max_bad_steps: N)"
                        )
                    say(
                        f"[yellow]step {step + 1}: non-finite loss or gradient, step skipped "
                        f"({bad_steps}/{config.max_bad_steps} allowed)[/yellow]"
                    )
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                applying, rng_at_step_start = False, None
                last_loss = step_loss if finite else last_loss
                accumulate(
                    window,
                    step_loss_sum if finite else 0.0,
                    step_trained,
                    step_tokens,
                    int(step_correct) if finite else 0,
                    clipped,
                )
                accumulate_sources(
                    window, step_source_loss if finite else [0.0] * len(step_source_loss), drawn.source_trained.tolist()
                )

                if monitor:
                    tell(monitor.observe_step(step, step_loss, grad_norm, lr, drawn.rows))
                if step % config.logging_steps == 0 or step == total_steps:
                    elapsed = time.perf_counter() - started
                    row = {
                        **window_row(window, step, feed.epoch_of(step), lr, grad_norm, elapsed, world),
                        **source_figures(window, feed.sources),
                    }
                    if writer:
                        writer.log(row)
                        if not console.is_terminal:  # logs to a file get a line per row instead of a bar
                            say(
                                f"step {step}/{total_steps} loss {row['loss']:.4f} lr {lr:.2e} grad_norm {grad_norm:.3f} "
                                f"{row['trained_tokens_per_s']:.0f} trained tok/s",
                                highlight=False,
                            )
                    window = state["window"] = empty_window()
                progress.update(task, completed=step, loss=step_loss, lr=lr)
                if stop_votes:  # Ctrl-C in some process: all of them stop after this same step (interrupt.py)
                    raise KeyboardInterrupt

                evaluation = None
                side_work_started = time.time()  # eval, samples and saves do not count against throughput
                if eval_steps and (step % eval_steps == 0 or step == total_steps):
                    evaluation = evaluate()
                    improved = is_better(evaluation[best_metric], state["best_metric"], best_metric)
                    if improved:
                        state["best_metric"], state["evals_without_gain"] = evaluation[best_metric], 0
                    else:
                        state["evals_without_gain"] += 1
                    if writer:
                        writer.log({"step": step, "epoch": feed.epoch_of(step), **evaluation})
                    if improved and (config.early_stopping_patience or step % config.save_steps == 0):
                        state["best_checkpoint"] = f"checkpoint-{step}"
                        save(step, evaluation)
                    if monitor:  # overfitting is judged on the loss of the set that picks the best checkpoint
                        tell(
                            monitor.observe_eval(
                                step,
                                last_loss or float("nan"),
                                evaluation[eval_loss_key(best_metric)],
                                state["best_checkpoint"],
                            )
                        )
                # Samples run on the main process alone, which a sharded (FSDP/DeepSpeed) model cannot do.
                if prompts and not is_sharded(accelerator) and (step % sample_steps == 0 or step == total_steps):
                    if main:
                        with torch.compiler.set_stance("force_eager"):  # KV-cache decoding: never worth compiling
                            samples = generate_samples(unwrapped, tokenizer, template, prompts, config.max_new_tokens)
                        log_samples(output_dir, writer, step, samples, console)
                        tell(monitor.observe_samples(step, samples))
                    accelerator.wait_for_everyone()
                if step % config.save_steps == 0 and step not in saved_steps:
                    save(step, evaluation)
                window["time"] += time.time() - side_work_started
                run_info.update(
                    last_step=step, best_checkpoint=state["best_checkpoint"], best_metric=state["best_metric"]
                )
                if step % config.logging_steps == 0:
                    write_run_info(output_dir, run_info, main)
                if (
                    config.early_stopping_patience
                    and evaluation is not None
                    and state["evals_without_gain"] >= config.early_stopping_patience
                ):
                    say(
                        f"Early stopping at step {step}: {best_metric} has not improved for "
                        f"{config.early_stopping_patience} evals; best is {state['best_checkpoint']} "
                        f"({state['best_metric']:.4f})"
                    )
                    status = "early_stopped"
                    break
    except KeyboardInterrupt:
        status = "stopped"
        say(f"[yellow]Interrupted at step {step}.[/yellow]")
        if config.save_on_interrupt and step > start_step and applying:
            say(
                f"[yellow]Not saved: interrupted while applying step {step + 1}; resume from the newest "
                "checkpoint with `--resume_from_checkpoint true`.[/yellow]"
            )
        elif config.save_on_interrupt and step > start_step:
            if rng_at_step_start is not None:  # a step was half done: its dropout draws are redone on resume
                restore_rng(*rng_at_step_start)
            path = save(step)
            say(f"Saved {path}; resume with `--resume_from_checkpoint true`.")
        run_info.update(status=status, last_step=step)
        write_run_info(output_dir, run_info, main)
        return RunResult(output_dir, status, step, None, state["best_checkpoint"], last_loss)
    except BaseException:
        run_info.update(status="crashed", last_step=step)
        write_run_info(output_dir, run_info, main)
        raise
    finally:
        feed.close()
        if writer:
            writer.close()

    # ---- save: a last checkpoint, and the final adapter or model with its tokenizer and template
    if step not in saved_steps:
        save(step)
    final_dir = output_dir / ("model" if config.finetuning == "full" else "adapter")
    # Under FSDP/DeepSpeed the full weights must be gathered by every process first.
    gathered = accelerator.get_state_dict(loss_model) if is_sharded(accelerator) else None
    if main:
        state_dict = {k.removeprefix("model."): v for k, v in gathered.items()} if gathered else None
        save_final(unwrapped, tokenizer, template, final_dir, state_dict, initial_adapter)
    accelerator.wait_for_everyone()
    run_info.update(
        status=status,
        last_step=step,
        final_dir=str(final_dir),
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    write_run_info(output_dir, run_info, main)
    loss_text = "n/a (no step run since the resumed checkpoint)" if last_loss is None else f"{last_loss:.4f}"
    say(
        f"[bold green]Done[/bold green]: {step} steps, final loss {loss_text}. Weights: {final_dir}. "
        f"Report: `sftkit report {output_dir}`"
    )
    return RunResult(output_dir, status, step, final_dir, state["best_checkpoint"], last_loss)


# --------------------------------------------------------------------------- helpers


def accumulate_gradients(
    loss_model: torch.nn.Module,
    accelerator: Accelerator,
    batches: list[dict[str, torch.Tensor]],
    step_trained: int,
    saved_tensors: AbstractContextManager | None = None,
) -> torch.Tensor:
    """Backward over this process's micro-batches of one optimizer step; returns (2 + sources,): their
    summed loss, how many of their trained targets were the argmax, and the summed loss of each
    training source, so one all-reduce gathers them all.

    Each micro-batch contributes sum_loss / N_step, N_step counting the trained tokens of the whole
    step on all processes; × world because DDP averages gradients. Gradients are only all-reduced
    on the last micro-batch. `saved_tensors` is the context the forward runs in (activation offloading).
    """
    world = accelerator.num_processes
    counter = accelerator.unwrap_model(loss_model)  # the CausalLMLoss that records `correct`
    sums = torch.zeros(2 + counter.sources, device=accelerator.device)
    for index, batch in enumerate(batches):
        last = index == len(batches) - 1
        # DeepSpeed steps inside backward when gradients sync: only on the last micro-batch.
        accelerator.gradient_state._set_sync_gradients(last)
        with nullcontext() if last else accelerator.no_sync(loss_model):
            with saved_tensors or nullcontext():
                micro_loss = loss_model(**batch)
            accelerator.backward(micro_loss * world / step_trained)
        sums += torch.cat([torch.stack([micro_loss.detach().float(), counter.correct.float()]), counter.source_loss])
    return sums


def is_better(value: float, best: float | None, metric: str) -> bool:
    """Whether an eval improves on the best so far: lower for losses, higher for accuracies."""
    if best is None:
        return math.isfinite(value)
    return value > best if greater_is_better(metric) else value < best


def check_hardware(config: SFTConfig) -> str | None:
    """Settings the hardware cannot honour fail before any model is loaded; returns a note on what it
    can honour only slowly (QLoRA on CPU)."""
    if config.bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ModelError("bf16 = true but this GPU has no bfloat16 support (pre-Ampere); use fp16: true")
    if config.fp16 and not torch.cuda.is_available():
        raise ModelError(
            "fp16 = true needs a CUDA GPU (fp16 autocast with loss scaling); on CPU use bf16: true or neither"
        )
    return check_qlora_supported(torch.cuda.is_available()) if config.finetuning == "qlora" else None


def run_fingerprint(config: SFTConfig, world: int) -> dict[str, Any]:
    """Settings that must not change between a checkpoint and the run that resumes it."""
    return {
        "model_name_or_path": config.model_name_or_path,
        "gguf_file": config.gguf_file,
        "finetuning": config.finetuning,
        "lora": [config.lora_r, config.lora_alpha, config.lora_target_modules] if config.finetuning != "full" else None,
        **(
            {
                "lora_variant": [
                    config.use_dora,
                    config.use_rslora,
                    config.lora_modules_to_save,
                    config.init_lora_weights,
                ]
            }
            if config.finetuning != "full"
            else {}
        ),
        "trainable_tokens": None
        if config.finetuning == "full" or config.trainable_tokens == "none"
        else config.trainable_tokens,
        # an unweighted source is written as before weights existed, so older checkpoints still resume
        "datasets": [
            {k: v for k, v in spec.items() if not (k == "weight" and v is None)}
            for spec in redacted(config)["datasets"]
        ],
        "max_seq_length": config.max_seq_length,
        "packing": config.packing,
        "seed": config.seed,
        "per_device_train_batch_size": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "world_size": world,
        **(
            {
                "streaming": config.streaming,
                "packing_buffer": config.packing_buffer,
                "on_exhausted": config.on_exhausted,
            }
            if config.streaming or config.is_mixture
            else {}
        ),
    }


def nonfinite_advice(config: SFTConfig) -> str:
    hints = ["lower learning_rate", "lengthen warmup (warmup_ratio: 0.03-0.1)"]
    if config.fp16:
        hints.insert(0, "fp16 overflows easily: use bf16: true on GPUs that support it")
    return "Try: " + "; ".join(hints)


def make_progress(console: Console, enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f} · lr {task.fields[lr]:.2e}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )
