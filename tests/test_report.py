"""`sftkit report` on synthetic run directories: finished, still running, crashed, and not a run."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from sftkit.cli import app
from sftkit.report import build_report, read_run

PROMPTS = ["What is 12 plus 30?", "Write a haiku about <autumn> & rain."]
COMPLETIONS = {  # step -> (completion per prompt, ended)
    50: (["12 12 12 12 12 12 12 12 12 12 12 12 12 12", "rain rain rain rain rain rain rain rain"], False),
    100: (["12 plus 30 is 32.", "Leaves fall in the rain, autumn rain falls on the leaves"], False),
    200: (["12 plus 30 is 42.", "Red leaves drift and fall\nrain taps on the window glass\nautumn says goodbye"], True),
}


def write_synthetic_run(
    run_dir: Path, total_steps: int = 200, status: str = "finished", eval_sets: tuple[str, ...] = ("",)
) -> Path:
    """A run directory laid out as docs/run_directory.md says, with plausible curves; `eval_sets`:
    the labels of its eval sets ('' for one unnamed set)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "model_name_or_path": "meta-llama/Llama-3.2-1B",
        "finetuning": "lora",
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_target_modules": "all-linear",
        "learning_rate": 2e-4,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.05,
        "num_train_epochs": 3.0,
        "max_steps": -1,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4,
        "max_seq_length": 2048,
        "packing": True,
        "assistant_only_loss": True,
        "chat_template": "llama3",
        "bf16": True,
        "max_grad_norm": 1.0,
        "datasets": [{"path": "data/gsm8k.jsonl", "format": "auto"}],
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run_dir / "run.json").write_text(
        json.dumps(
            {
                "status": status,
                "model_name_or_path": config["model_name_or_path"],
                "finetuning": "lora",
                "world_size": 1,
                "effective_batch": 16,
                "steps_per_epoch": total_steps // 3,
                "total_steps": total_steps,
                "warmup_steps": 10,
                "trainable_params": 11_272_192,
                "total_params": 1_247_086_592,
                "trained_token_fraction": 0.41,
                "last_step": total_steps,
                "best_checkpoint": str(run_dir / "checkpoint-100"),
                "best_eval_loss": 1.02,
                "final_dir": str(run_dir / "adapter"),
                "started_at": "2026-11-24T10:00:00Z",
            }
        )
    )
    (run_dir / "data_stats.json").write_text(
        json.dumps(
            {
                "train_examples": 7473,
                "eval_examples": 200,
                "total_tokens": 1_538_112,
                "trained_tokens": 630_626,
                "trained_token_fraction": 0.41,
                "truncated_examples": 0,
                "skipped_rows": 0,
                "packing_efficiency": 0.97,
                "packed_sequences": 760,
                "example_tokens": {"min": 61, "median": 196.0, "p95": 350.0, "max": 611},
            }
        )
    )
    rows = []
    for step in range(5, total_steps + 1, 5):
        progress = step / total_steps
        lr = 2e-4 * min(1.0, step / 10) * 0.5 * (1 + math.cos(math.pi * progress))
        loss = 0.8 + 1.2 * math.exp(-step / 30) + 0.03 * math.sin(step)
        clipped = 3 if step <= 15 else int(step == 120)  # 10 of the first 200 steps
        rows.append(
            {
                "step": step,
                "epoch": 3 * progress,
                "loss": loss,
                "token_accuracy": 0.9 - loss / 4,
                "lr": lr,
                "grad_norm": 1.5 if step == 120 else 0.4 + 0.05 * math.cos(step),
                "clipped_steps": clipped,
                "clipped_fraction": clipped / 5,
                "trained_tokens": 4000,
                "tokens": 9800,
                "trained_tokens_per_s": 4100.0,
                "tokens_per_s": 10050.0 + 30 * math.sin(step),
                "tokens_per_s_per_device": 10050.0 + 30 * math.sin(step),
                "elapsed_s": step * 0.98,
                "memory_gb": 9.6,
            }
        )
        if step % 50 == 0:
            row = {"step": step, "epoch": 3 * progress}
            for index, label in enumerate(eval_sets):
                key = f"eval_{label}_" if label else "eval_"
                eval_loss = 1.4 - 0.4 * min(step, 100) / 100 + 0.001 * max(0, step - 100) + 0.2 * index  # best at 100
                row.update(
                    {key + "loss": eval_loss, key + "token_accuracy": 0.9 - eval_loss / 4, key + "tokens": 60000}
                )
            rows.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    samples = [
        {"step": step, "prompt": prompt, "completion": completion, "ended": ended}
        for step, (completions, ended) in COMPLETIONS.items()
        if step <= total_steps
        for prompt, completion in zip(PROMPTS, completions, strict=True)
    ]
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(sample) + "\n" for sample in samples))
    (run_dir / "diagnosis.jsonl").write_text(
        json.dumps(
            {
                "step": 120,
                "kind": "grad_norm_spike",
                "message": "grad norm 1.5 is 3.8x its running median 0.4",
                "evidence": {"grad_norm": 1.5, "running_median": 0.4, "example_ids": [311, 2904]},
                "advice": "look at these examples (bad labels, very long or odd rows)",
            }
        )
        + "\n"
    )
    for step, complete in ((100, True), (200, False)):
        checkpoint = run_dir / f"checkpoint-{step}"
        checkpoint.mkdir(exist_ok=True)
        if complete:
            (checkpoint / "manifest.json").write_text("{}")
    (run_dir / "adapter").mkdir(exist_ok=True)
    return run_dir


def report_text(run_dir: Path) -> tuple[str, str]:
    console = Console(record=True, width=140)
    path = build_report(run_dir, console=console)
    return path.read_text(encoding="utf-8"), console.export_text()


def test_report_of_a_finished_run(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run")
    with (run_dir / "samples.jsonl").open("a") as handle:
        handle.write(
            json.dumps({"step": 200, "prompt": "[INST] hi", "completion": "[/INST] [bold]x", "ended": True}) + "\n"
        )
    html, printed = report_text(run_dir)
    # loss, token accuracy, lr, grad norm, clipped steps, throughput, memory
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', html)) == 7
    assert not re.search(r'(src|href)="(https?:|//|file:)', html)  # self-contained
    assert "grad_norm_spike" in html and "look at these examples" in html
    assert "12 plus 30 is 42." in html and "Write a haiku about &lt;autumn&gt; &amp; rain." in html
    assert "checkpoint-100" in html and "best eval loss 1.02" in html and "incomplete: no manifest.json" in html
    assert "adapter/" in html and "final weights" in html
    assert "trained token fraction" in html and "41.0%" in html and "effective batch" in html
    assert "meta-llama/Llama-3.2-1B" in printed and "finished" in printed and "grad_norm_spike" in printed
    assert "12 plus 30 is 42." in printed and "report written to" in printed
    assert "[/INST] [bold]x" in printed  # user text is never rich markup
    assert "1 at step 100" in printed  # best eval loss 1 (1.4 - 0.4) at step 100


def test_report_shows_accuracy_throughput_per_device_and_clipped_share(tmp_path):
    html, printed = report_text(write_synthetic_run(tmp_path / "run"))
    for title in ("Token accuracy", "Clipped steps", "Throughput", "Gradient norm"):
        assert f'alt="{title}"' in html
    last = 0.9 - (0.8 + 1.2 * math.exp(-200 / 30) + 0.03 * math.sin(200)) / 4
    assert f"train {last:.1%} · eval 62.5%" in printed  # eval at 200: 0.9 - 1.1 / 4
    assert "steps clipped" in html and "10 / 200 (5.0%)" in printed
    assert "tokens/s per device (median)" in printed


def test_report_of_named_eval_sets_follows_metric_for_best_model(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", eval_sets=("gsm8k", "chat"))
    run = json.loads((run_dir / "run.json").read_text())
    run.update(metric_for_best_model="eval_chat_token_accuracy", best_metric=0.6)
    (run_dir / "run.json").write_text(json.dumps(run))
    record = read_run(run_dir)
    assert [row["step"] for row in record.eval_rows] == [50, 100, 150, 200]
    html, printed = report_text(run_dir)
    assert "best eval chat token accuracy" in printed and "0.6 at step 100" in printed  # 0.9 - 1.2 / 4
    assert "· eval chat 57.5%" in printed  # the last eval of that set: 0.9 - 1.3 / 4
    assert "best eval chat token accuracy 0.6" in html  # the best checkpoint's note


def test_report_of_a_running_run_with_a_cut_line_and_repeated_steps(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", total_steps=60, status="running")
    metrics = run_dir / "metrics.jsonl"
    # A resume from step 50 logged steps 55 and 60 again; the run is writing step 65 right now.
    metrics.write_text(
        metrics.read_text()
        + json.dumps({"step": 55, "loss": 0.123, "lr": 1e-4})
        + "\n"
        + '{"step": 65, "loss": 0.9, "l'
    )
    record = read_run(run_dir)
    assert [row["step"] for row in record.train_rows][-3:] == [50, 55, 60]
    assert [row["loss"] for row in record.train_rows if row["step"] == 55] == [0.123]
    assert record.notes == [
        "metrics.jsonl: skipped 1 unreadable line(s) (15); a line cut short by a crash or a run still writing"
    ]
    html, printed = report_text(run_dir)
    assert "running" in printed and "skipped 1 unreadable line" in html


def test_report_of_a_crashed_run_with_missing_files(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", total_steps=40)
    run = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**run, "status": "crashed", "last_step": 40}))
    for name in ("config.yaml", "data_stats.json", "samples.jsonl", "diagnosis.jsonl"):
        (run_dir / name).unlink()
    with (run_dir / "metrics.jsonl").open("a") as handle:  # the loop writes non-finite values as null
        handle.write(json.dumps({"step": 45, "loss": None, "lr": 2e-4, "grad_norm": None}) + "\n")
    html, printed = report_text(run_dir)
    assert "crashed" in printed and "config.yaml is missing" in printed and "data_stats.json is missing" in html
    assert "No samples were generated (yet)." in html and "No problems detected." in html


def test_a_folder_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        build_report(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"has no metrics\.jsonl"):
        build_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo')
    with pytest.raises(FileNotFoundError, match="no metric rows yet"):
        build_report(tmp_path)


def test_cli_report(tmp_path):
    runner = CliRunner()
    run_dir = write_synthetic_run(tmp_path / "run")
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert (run_dir / "report.html").is_file()
    result = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "error:" in result.output and "no such run directory" in result.output


def add_sources(run_dir: Path, weights: list[float] | None) -> None:
    """Give the synthetic run two training sources: gsm8k trains 300 tokens per row, chat 100 (none
    in the first row, so it has no loss there); chat's loss is 0.5 above gsm8k's."""
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    for index, row in enumerate(row for row in rows if "loss" in row):
        chat = 100 if index else 0
        row["source_trained_tokens"] = {"gsm8k": 300, "chat": chat}
        row["source_loss"] = {"gsm8k": row["loss"] - 0.1, **({"chat": row["loss"] + 0.5} if chat else {})}
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = json.loads((run_dir / "run.json").read_text())
    run.update(sources=["gsm8k", "chat"], source_weights=weights)
    (run_dir / "run.json").write_text(json.dumps(run))


def test_report_of_two_sources_plots_loss_per_source_and_the_realised_mixture_against_the_target(tmp_path):
    from sftkit.report import summary

    run_dir = write_synthetic_run(tmp_path / "run")
    add_sources(run_dir, weights=[3, 1])
    record = read_run(run_dir)
    steps, shares = summary.realised_mixture(record)
    assert steps == list(range(5, 201, 5))
    assert shares["gsm8k"][0] == 1.0 and shares["chat"][1] == pytest.approx(100 / 700)
    assert shares["chat"][-1] == pytest.approx(3900 / 15900)  # 39 rows of chat over 40 of gsm8k
    assert summary.target_shares(record) == {"gsm8k": 0.75, "chat": 0.25}
    html, printed = report_text(run_dir)
    assert 'alt="Loss per source"' in html and 'alt="Mixture of trained tokens"' in html
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 9
    last_chat = 0.8 + 1.2 * math.exp(-200 / 30) + 0.03 * math.sin(200) + 0.5
    assert f"24.5% of trained tokens (target 25.0%) · last loss {last_chat:.4g}" in printed
    assert "75.5% of trained tokens (target 75.0%)" in html

    add_sources(run_dir, weights=None)  # concatenated sources: the realised shares alone
    html, printed = report_text(run_dir)
    assert "24.5% of trained tokens · last loss" in printed and "(target" not in printed


def test_report_of_one_source_has_no_per_source_plots(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run")
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    for row in rows:
        if "loss" in row:
            row.update(source_trained_tokens={"gsm8k": 300}, source_loss={"gsm8k": row["loss"]})
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    html, printed = report_text(run_dir)
    assert "Loss per source" not in html and "Mixture" not in html and "Training sources" not in printed
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 7
