"""sftkit vs TRL's SFTTrainer on identical model, data, masks, batches and schedule.

    python bench/vs_trl.py            # CPU, tiny random Llama (4 × 256), about 7 minutes on 2 CPU cores
    python bench/vs_trl.py --quick    # smoke run: 1 repeat, 3 steps
    python bench/vs_trl.py --gpu      # CUDA: Llama-3-8B-shaped, bf16, LoRA r=16, seq 4096, MFU

What is the same on both sides:
  model      one random Llama saved once (same init seed), fp32 on CPU, full fine-tuning; attention is
             each side's default (sftkit: varlen; TRL: sdpa, which its padding-free mode relies on)
  data       GSM8K train rows (prompt_completion: question → answer) + the ShareGPT chats, rendered
             with sftkit's built-in `llama2` template and tokenized *once*, by sftkit; TRL gets the
             same `input_ids` and `labels` (assistant-only loss), so masks are identical
  batches    sftkit padded and TRL padded see the same examples in the same micro-batches in the same
             order (sftkit's seeded order, fed to TRL with a sequential sampler)
  optimizer  AdamW (0.9, 0.999, 1e-8), no weight decay, cosine without warmup, clip 1.0, same GA
Configurations, run as separate processes interleaved A B C D A B C D … to cancel machine noise:
  sftkit-packed   balanced best-fit packing, per-example (varlen) attention, chunked loss (the default)
  sftkit-padded   one example per row, padded to the longest row of the micro-batch
  trl-padded      SFTTrainer, padding to the longest row of the micro-batch
  trl-bfd         SFTTrainer, packing_strategy="bfd" (padding-free: a micro-batch is one flat row)
plus one check-only run, trl-on-sftkit-packs: TRL padding-free fed sftkit's own packs in sftkit's
order, so that the packed loss curves can be compared batch for batch.

Throughput counts steady state: tokens of steps 2..N over the time from the end of step 1 to the
end of step N (both sides timed the same way, at the end of each optimizer step).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZER = SHARED / "tokenizers" / "llama2"
GSM8K = SHARED / "data" / "gsm8k" / "train.jsonl"
SHAREGPT = SHARED / "data" / "sharegpt" / "conversations.json"
CONFIGS = ("sftkit-packed", "sftkit-padded", "trl-padded", "trl-bfd")
CHECK_ONLY = "trl-on-sftkit-packs"
PAIRS = (
    ("sftkit-packed", "trl-bfd"),
    ("sftkit-packed", "trl-padded"),
    ("sftkit-padded", "trl-padded"),
    ("sftkit-packed", "trl-on-sftkit-packs"),
)


@dataclass(frozen=True)
class Settings:
    """Everything both sides are given."""

    layers: int = 4
    hidden: int = 256
    intermediate: int = 688
    heads: int = 4
    kv_heads: int = 4
    vocab: int = 32_000
    dtype: str = "float32"
    finetuning: str = "full"
    lora_r: int = 16
    gsm8k_rows: int = 300
    max_seq_length: int = 512
    packed_micro_batch: int = 1  # packs of up to max_seq_length tokens
    padded_micro_batch: int = 3  # examples (≈ the tokens of one pack)
    gradient_accumulation: int = 2
    steps: int = 10
    learning_rate: float = 5e-4
    seed: int = 42
    attn: str = "sdpa"  # TRL's attention
    sftkit_attn: str = "varlen"  # sftkit's default: per-example kernel, no seq² mask
    gradient_checkpointing: bool = False


GPU_SETTINGS = Settings(
    layers=32,
    hidden=4096,
    intermediate=14336,
    heads=32,
    kv_heads=8,
    vocab=128_256,
    dtype="bfloat16",
    finetuning="lora",
    gsm8k_rows=3000,
    max_seq_length=4096,
    packed_micro_batch=1,
    padded_micro_batch=16,
    gradient_accumulation=4,
    steps=10,
    learning_rate=2e-4,
    gradient_checkpointing=True,
)


# --------------------------------------------------------------------------- shared preparation (parent)


def build_model(settings: Settings, folder: Path) -> None:
    """A random Llama of the given shape with the Llama-2 tokenizer, saved like a hub checkpoint."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=settings.vocab,
        hidden_size=settings.hidden,
        intermediate_size=settings.intermediate,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.kv_heads,
        max_position_embeddings=max(2048, settings.max_seq_length),
        tie_word_embeddings=False,
    )
    device = "cuda" if settings.dtype == "bfloat16" and torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, settings.dtype))
    model.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the runs are other processes: leave them the memory
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(folder)


def sftkit_config(settings: Settings, workdir: Path, packing: bool, output_dir: Path):
    from sftkit.config import validate_config

    return validate_config(
        {
            "model_name_or_path": str(workdir / "model"),
            "finetuning": settings.finetuning,
            "lora_r": settings.lora_r,
            "lora_alpha": 2 * settings.lora_r,
            "lora_dropout": 0.0,
            "torch_dtype": settings.dtype,
            "bf16": settings.dtype == "bfloat16",
            "attn_implementation": settings.sftkit_attn,
            "datasets": [
                {
                    "path": str(workdir / "gsm8k.jsonl"),
                    "format": "prompt_completion",
                    "columns": {"prompt": "question", "completion": "answer"},
                },
                {"path": str(SHAREGPT), "format": "sharegpt"},
            ],
            "chat_template": "llama2",
            "assistant_only_loss": True,
            "packing": packing,
            "max_seq_length": settings.max_seq_length,
            "truncation": "truncate_right",
            "per_device_train_batch_size": settings.packed_micro_batch if packing else settings.padded_micro_batch,
            "gradient_accumulation_steps": settings.gradient_accumulation,
            "max_steps": settings.steps,
            "learning_rate": settings.learning_rate,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "seed": settings.seed,
            "gradient_checkpointing": settings.gradient_checkpointing,
            "output_dir": str(output_dir),
            "overwrite_output_dir": True,
            "logging_steps": 1,
            "save_steps": 10**9,
            "report_to": "none",
        }
    )


def prepare(settings: Settings, workdir: Path) -> dict:
    """Model, data files, sftkit's tokenization and batch order, and TRL's datasets built from them."""
    import datasets

    from sftkit.data.dataset import DataOptions, prepare_data
    from sftkit.data.examples import TrainingExamples
    from sftkit.data.template import IGNORE_INDEX, resolve_chat_template
    from sftkit.model.load import load_tokenizer
    from sftkit.train.batches import BatchPlan

    build_model(settings, workdir / "model")
    with GSM8K.open() as source, (workdir / "gsm8k.jsonl").open("w") as subset:
        subset.writelines(islice(source, settings.gsm8k_rows))  # the first rows
    tokenizer = load_tokenizer(str(workdir / "model"))
    facts: dict = {"pad_token_id": tokenizer.pad_token_id}
    for packing in (True, False):
        config = sftkit_config(settings, workdir, packing, workdir / "unused")
        data = prepare_data(DataOptions.from_config(config, resolve_chat_template("llama2", tokenizer)), tokenizer)
        table = data.train.dataset
        ids, labels, lengths = table["input_ids"], table["labels"], table["length"]
        # The very plan the loop builds (same functions, same arguments), to know its batches.
        sequences = TrainingExamples.from_dataset(table).sequences(settings.max_seq_length, packing)
        plan = BatchPlan(
            sequences, config.per_device_train_batch_size, config.gradient_accumulation_steps, 1, config.seed
        )
        order = plan.epoch_order(0).tolist()
        name = "packed" if packing else "padded"
        steps = [plan.step_micro_batches(step) for step in range(settings.steps)]
        facts[name] = {
            "trained_per_step": [
                sum(
                    sum(1 for x in labels[e][1:] if x != IGNORE_INDEX)
                    for micro in group
                    for s in micro
                    for e in sequences[s]
                )
                for group in steps
            ],
            "positions_per_step": [
                sum(len(micro) * max(sum(lengths[e] for e in sequences[s]) for s in micro) for micro in group)
                for group in steps
            ],
            "trained_per_epoch": sum(sum(1 for x in row[1:] if x != IGNORE_INDEX) for row in labels),
            "examples": len(ids),
            "tokens": sum(lengths),
            # keys per query row attended per example (Σ l² / Σ l): the attention FLOPs a kernel that
            # respects example boundaries needs, the rule `sftkit plan` uses
            "attention_span": sum(min(n, settings.max_seq_length) ** 2 for n in lengths)
            / sum(min(n, settings.max_seq_length) for n in lengths),
        }
        if packing:  # check-only: TRL padding-free on sftkit's own packs, in sftkit's order
            datasets.Dataset.from_dict(
                {
                    "input_ids": [[t for e in sequences[s] for t in ids[e]] for s in order],
                    "labels": [[t for e in sequences[s] for t in labels[e]] for s in order],
                    "seq_lengths": [[lengths[e] for e in sequences[s]] for s in order],
                }
            ).save_to_disk(workdir / CHECK_ONLY)
            datasets.Dataset.from_dict({"input_ids": ids, "labels": labels}).save_to_disk(workdir / "trl-bfd")
        else:  # the padded examples in the order sftkit's padded run uses
            datasets.Dataset.from_dict(
                {"input_ids": [ids[s] for s in order], "labels": [labels[s] for s in order]}
            ).save_to_disk(workdir / "trl-padded")
    return facts


# --------------------------------------------------------------------------- workers (one process per run)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_sftkit(settings: Settings, workdir: Path, name: str, output_dir: Path) -> dict:
    from rich.console import Console

    from sftkit.train import loop

    # Instrumentation only: note the process CPU time whenever the loop writes a metrics row (every step).
    cpu_s: list[float] = []
    write_row = loop.window_row

    def timed_row(*args, **kwargs):
        cpu_s.append(time.process_time())
        return write_row(*args, **kwargs)

    loop.window_row = timed_row
    config = sftkit_config(settings, workdir, name == "sftkit-packed", output_dir)
    with open(os.devnull, "w") as quiet:
        loop.train(config, Console(file=quiet))
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    return {
        "loss": [r["loss"] for r in rows],
        "trained": [r["trained_tokens"] for r in rows],
        "tokens": [r["tokens"] for r in rows],
        "step_end_s": [r["elapsed_s"] for r in rows],
        "step_end_cpu_s": cpu_s,
    }


def run_trl(settings: Settings, workdir: Path, name: str, output_dir: Path, pad_token_id: int) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    dataset = datasets.load_from_disk(str(workdir / name))
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    tokenizer.pad_token_id = pad_token_id  # sftkit's pad token (unk), never EOS
    model = AutoModelForCausalLM.from_pretrained(
        workdir / "model", dtype=getattr(torch, settings.dtype), attn_implementation=settings.attn
    )
    peft_config = None
    if settings.finetuning == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=settings.lora_r,
            lora_alpha=2 * settings.lora_r,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    packed = name == "trl-bfd"
    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=settings.steps,
        learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.packed_micro_batch
        if name != "trl-padded"
        else settings.padded_micro_batch,
        gradient_accumulation_steps=settings.gradient_accumulation,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=settings.seed,
        bf16=settings.dtype == "bfloat16",
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=settings.gradient_checkpointing,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        packing=packed,
        # sftkit's packs are already at most max_seq_length long; TRL refuses a max_length it would not enforce
        max_length=None if name == CHECK_ONLY else settings.max_seq_length,
        packing_strategy="bfd",
        padding_free=name != "trl-padded",
        pad_to_multiple_of=None,
        # TRL's own shuffling for its own packs; sftkit's order, as given, for the batch-for-batch runs
        train_sampling_strategy="random" if packed else "sequential",
    )
    counts = {"trained": 0, "tokens": 0, "positions": 0}
    per_step: dict[str, list] = {"trained": [], "tokens": [], "positions": [], "step_end_s": [], "step_end_cpu_s": []}

    class CountingTrainer(SFTTrainer):
        """Counts exactly what each micro-batch trains on: labels shifted by one, as the loss sees them."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            counts["trained"] += int((inputs["labels"][..., 1:] != -100).sum())
            counts["positions"] += inputs["input_ids"].numel()
            mask = inputs.get("attention_mask")
            counts["tokens"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            return super().training_step(model, inputs, num_items_in_batch)

    class StepClock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            _sync()
            per_step["step_end_s"].append(time.perf_counter() - self.start)
            per_step["step_end_cpu_s"].append(time.process_time())
            for key, value in counts.items():
                per_step[key].append(value)
                counts[key] = 0

    trainer = CountingTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[StepClock()],
    )
    epoch_trained = None
    if packed:  # what TRL trains on over one epoch of its own packs, to compare with sftkit's count
        epoch_trained = sum(int((b["labels"][..., 1:] != -100).sum()) for b in trainer.get_train_dataloader())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"loss": losses, **per_step, "epoch_trained": epoch_trained}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    settings = Settings(**json.loads(args.settings))
    workdir = Path(args.workdir)
    output_dir = workdir / "runs" / args.worker
    started = time.perf_counter()
    if args.worker.startswith("sftkit"):
        result = run_sftkit(settings, workdir, args.worker, output_dir)
    else:
        result = run_trl(settings, workdir, args.worker, output_dir, args.pad_token_id)
    result.update(process_s=time.perf_counter() - started, peak_rss_gib=peak_rss_gib())
    if "cuda" in args.device:
        import torch

        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    shutil.rmtree(output_dir, ignore_errors=True)
    Path(args.result).write_text(json.dumps(result))


# --------------------------------------------------------------------------- report (parent)


def steady(values: list[float], ends: list[float]) -> float:
    """Rate over steps 2..N: the first step pays for warm-up (allocator, kernels, lazy imports)."""
    if len(ends) < 2:
        return sum(values) / max(ends[-1], 1e-9)
    return sum(values[1:]) / max(ends[-1] - ends[0], 1e-9)


def paired_ratio(mine: list[dict], theirs: list[dict], clock: str) -> float:
    """Median of per-repeat ratios; a configuration run once is paired with the other's last run."""
    pairs = list(zip(mine, theirs, strict=True)) if len(mine) == len(theirs) else [(mine[-1], theirs[-1])]
    return statistics.median(steady(a["trained"], a[clock]) / steady(b["trained"], b[clock]) for a, b in pairs)


def summarize(name: str, runs: list[dict], facts: dict) -> dict:
    layout = "padded" if name in ("sftkit-padded", "trl-padded") else "packed"
    summaries = []
    for run in runs:
        positions = run.get("positions") or facts[layout]["positions_per_step"][: len(run["trained"])]
        summaries.append(
            {
                "trained_per_s": steady(run["trained"], run["step_end_s"]),
                "trained_per_cpu_s": steady(run["trained"], run["step_end_cpu_s"]),
                "positions_per_s": steady(positions, run["step_end_s"]),
                "padding": 1 - sum(run["tokens"]) / sum(positions),
                "train_s": run["step_end_s"][-1],
                "process_s": run["process_s"],
                "rss": run["peak_rss_gib"],
            }
        )
    median = {key: statistics.median(s[key] for s in summaries) for key in summaries[0]}
    return {
        **median,
        "final_loss": runs[0]["loss"][-1],
        "loss": runs[0]["loss"],
        "trained": runs[0]["trained"],
        "repeats": len(runs),
        "spread": (max(s["trained_per_s"] for s in summaries) / min(s["trained_per_s"] for s in summaries) - 1),
    }


def print_report(
    results: dict[str, dict], facts: dict, settings: Settings, raw: dict[str, list[dict]], threads: int
) -> None:
    print(
        f"\nsftkit vs TRL: {settings.layers} layers × {settings.hidden} hidden, vocab {settings.vocab}, "
        f"{settings.dtype}, {settings.finetuning}, max_seq_length {settings.max_seq_length}, GA "
        f"{settings.gradient_accumulation}, {settings.steps} steps, {threads} torch thread(s); median of "
        f"{results[CONFIGS[0]]['repeats']} interleaved runs"
    )
    header = (
        f"{'config':22} {'trained tok/s':>13} {'per CPU-s':>9} {'positions/s':>11} {'padding':>7} {'train s':>7} "
        f"{'process s':>9} {'peak RSS GiB':>12} {'final loss':>10} {'spread':>6}"
    )
    print(header + "\n" + "-" * len(header))
    for name, r in results.items():
        print(
            f"{name:22} {r['trained_per_s']:>13.0f} {r['trained_per_cpu_s']:>9.0f} {r['positions_per_s']:>11.0f} "
            f"{r['padding']:>7.1%} "
            f"{r['train_s']:>7.1f} {r['process_s']:>9.1f} {r['rss']:>12.2f} {r['final_loss']:>10.4f} "
            f"{r['spread']:>6.1%}"
        )
    print(
        "per CPU-s: trained tokens per second of process CPU time (all threads), steady state; it moves less\n"
        "than wall-clock rates when other work shares the machine. spread: max/min − 1 of trained tokens/s\n"
        "over the repeats. padding: share of the positions computed that hold no token.\n"
    )
    print(
        "Ratios (sftkit / TRL, trained tokens per wall second | per CPU second), the median over repeats of\n"
        "each run against its partner of the same repeat (run minutes apart, so under the same load):"
    )
    for mine, theirs in PAIRS:
        if raw.get(mine) and raw.get(theirs):
            wall = paired_ratio(raw[mine], raw[theirs], "step_end_s")
            cpu = paired_ratio(raw[mine], raw[theirs], "step_end_cpu_s")
            print(f"  {mine:14} / {theirs:20} = {wall:.2f}× | {cpu:.2f}×")
    best_trl = max(
        (n for n in results if n.startswith("trl") and n != CHECK_ONLY), key=lambda n: results[n]["trained_per_s"]
    )
    print(f"  goals: packed ≥ 1.2× TRL's best ({best_trl}), ≥ 3× trl-padded\n")

    print("Trained-token counts (same tokenization, same masks):")
    padded_same = (
        raw["trl-padded"][0]["trained"] == raw["sftkit-padded"][0]["trained"] == facts["padded"]["trained_per_step"]
    )
    print(
        f"  padded, per step: sftkit {raw['sftkit-padded'][0]['trained']}\n"
        f"                    TRL    {raw['trl-padded'][0]['trained']} → {'identical' if padded_same else 'DIFFERENT'}"
    )
    if CHECK_ONLY in raw:
        same = raw[CHECK_ONLY][0]["trained"] == raw["sftkit-packed"][0]["trained"]
        print(f"  packed (TRL on sftkit's packs), per step: {'identical' if same else 'DIFFERENT'}")
    trl_epoch = raw["trl-bfd"][0]["epoch_trained"]
    print(
        f"  one epoch: sftkit {facts['packed']['trained_per_epoch']}, TRL bfd {trl_epoch} → "
        f"{'identical' if trl_epoch == facts['packed']['trained_per_epoch'] else 'DIFFERENT'}\n"
    )

    print("Loss agreement on identical batches (mean |sftkit − TRL| / TRL over the steps):")
    for mine, theirs in (("sftkit-padded", "trl-padded"), ("sftkit-packed", CHECK_ONLY)):
        if mine in results and theirs in results:
            a, b = results[mine]["loss"], results[theirs]["loss"]
            diffs = [abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)]
            print(f"  {mine} vs {theirs}: mean {statistics.mean(diffs):.2e}, max {max(diffs):.2e} (goal ≤ 2e-2)")
            print(f"    sftkit {' '.join(f'{x:.4f}' for x in a)}\n    TRL    {' '.join(f'{x:.4f}' for x in b)}")


def mfu_report(results: dict[str, dict], settings: Settings, span: float) -> None:
    """Model FLOPs utilisation, the 6 × N accounting, against the GPU's dense BF16 peak."""
    import torch

    name = torch.cuda.get_device_name()
    peaks = {
        "H200": 989.4e12,
        "H100 PCIe": 756e12,
        "H100 NVL": 835e12,
        "H100": 989.4e12,
        "A100": 312e12,
        "L40S": 362e12,
        "L4": 121e12,
    }
    peak = next((value for key, value in peaks.items() if key in name), None)
    linear = settings.layers * (
        2 * settings.hidden**2
        + 2 * settings.hidden * settings.hidden * settings.kv_heads // settings.heads
        + 3 * settings.hidden * settings.intermediate
    )
    path = linear + settings.hidden * settings.vocab  # every matmul a token passes through (embedding is a lookup)
    attention = 6 * 2 * settings.layers * settings.hidden * span / 2  # QKᵀ and AV over the example, causal half
    per_token = 6 * path + attention
    print(f"\nMFU on {name} (dense BF16 peak {peak / 1e12 if peak else float('nan'):.0f} TFLOPS):")
    print(
        f"  FLOPs/token = 6 × N_path + 6 × 2 × layers × hidden × span/2, span = Σ l² / Σ l = {span:.0f} "
        "(the keys a query attends within its own example; a dense mask computes more, which is not counted)"
    )
    print(
        f"  = 6 × {path / 1e9:.2f} G + "
        f"{attention / 1e9:.2f} G = {per_token / 1e9:.1f} GFLOP (N_path: all matmul weights on the token's path, "
        "LoRA's frozen weights included, as the 6N convention does, though LoRA skips their weight gradients; "
        "the adapters themselves, < 1% more, left out)"
    )
    for config, r in results.items():
        achieved = r["positions_per_s"] * per_token
        print(f"  {config:22} {achieved / 1e12:7.1f} TFLOPS  MFU {achieved / peak if peak else float('nan'):.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repeat of 3 steps: checks that everything runs")
    parser.add_argument("--gpu", action="store_true", help="Llama-3-8B-shaped, bf16, LoRA r=16, seq 4096 on CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3 CPU, 1 GPU)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (default 1: on a shared machine, idle OpenMP threads spin and "
        "make several-thread timings swing by up to 10×)",
    )
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--workdir", help="keep the model, data and results here (default: a temporary folder)")
    parser.add_argument("--json", help="also write every run's raw results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--pad-token-id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if not (TOKENIZER.exists() and GSM8K.exists() and SHAREGPT.exists()):
        raise SystemExit(f"needs {TOKENIZER}, {GSM8K} and {SHAREGPT}")
    import torch

    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: torch sees no CUDA device")
    settings = GPU_SETTINGS if args.gpu else Settings()
    args.repeats = args.repeats or (1 if args.gpu else 3)
    if args.quick:
        settings, args.repeats = replace(settings, steps=3, gsm8k_rows=100), 1
    if args.steps:
        settings = replace(settings, steps=args.steps)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sftkit-vs-trl-"))
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    print(f"Preparing the model and data in {workdir} …", flush=True)
    facts = prepare(settings, workdir)
    print(
        f"  {facts['padded']['examples']} examples, {facts['padded']['tokens']} tokens, "
        f"{facts['padded']['trained_per_epoch']} trained; {time.perf_counter() - began:.0f} s",
        flush=True,
    )

    order = [*CONFIGS] * args.repeats + [CHECK_ONLY]  # A B C D A B C D …, then the check-only run
    raw: dict[str, list[dict]] = {name: [] for name in [*CONFIGS, CHECK_ONLY]}
    for index, name in enumerate(order):
        result_file = workdir / f"result-{index}.json"
        command = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--settings",
            json.dumps(asdict(settings)),
            "--workdir",
            str(workdir),
            "--result",
            str(result_file),
            "--pad-token-id",
            str(facts["pad_token_id"]),
            "--device",
            "cuda" if args.gpu else "cpu",
            "--threads",
            str(args.threads),
        ]
        t0 = time.perf_counter()
        threads = str(args.threads)
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
        )
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        raw[name].append(json.loads(result_file.read_text()))
        run = raw[name][-1]
        print(
            f"  [{index + 1}/{len(order)}] {name:22} {time.perf_counter() - t0:5.0f} s  "
            f"{steady(run['trained'], run['step_end_s']):7.0f} trained tok/s  loss {run['loss'][-1]:.4f}",
            flush=True,
        )
    results = {name: summarize(name, runs, facts) for name, runs in raw.items() if runs}
    print_report(results, facts, settings, raw, args.threads)
    if args.gpu:
        mfu_report(results, settings, facts["packed"]["attention_span"])
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": asdict(settings), "facts": facts, "runs": raw}, indent=1))
    print(f"\nTotal {time.perf_counter() - began:.0f} s")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
