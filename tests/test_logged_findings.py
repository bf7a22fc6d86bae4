"""Findings the report reads from what a run logged (clipping, a memorised source, a train/eval accuracy gap,
a task metric that disagrees with the loss), and the report's evaluation section from RUN_DIR/eval."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from sftkit.monitor.logged import (
    SourceFacts,
    clipped_steps,
    logged_findings,
    metric_loss_disagree,
    source_memorised,
    token_accuracy_gap,
)
from sftkit.report import build_report
from sftkit.report.read import read_run


def train_rows(steps: int = 40, clipped: int = 5, **extra) -> list[dict]:
    return [
        {
            "step": step,
            "loss": 2.0,
            "grad_norm": 2.0 + step / 100,
            "clipped_steps": clipped,
            "token_accuracy": 0.9,
            **extra,
        }
        for step in range(5, steps + 1, 5)
    ]


def test_clipped_steps_fires_when_most_steps_are_clipped_and_says_what_to_raise():
    finding = clipped_steps(train_rows(clipped=5), max_grad_norm=1.0, learning_rate=1e-3)
    assert finding is not None and finding.kind == "clipped_steps"
    assert finding.message.startswith("40 of 40 steps (100%) were clipped by max_grad_norm = 1")
    assert "raise max_grad_norm to about 2.4" in finding.advice and "lower learning_rate (now 0.001)" in finding.advice
    assert clipped_steps(train_rows(clipped=2), 1.0, 1e-3) is None  # 16 of 40: not most
    assert clipped_steps(train_rows(clipped=5), 0.0, 1e-3) is None  # clipping off


def test_a_repeated_source_whose_loss_collapses_is_memorised():
    rows = train_rows(source_loss={"gsm8k": 3.0, "sharegpt": 0.5})
    sources = [SourceFacts("gsm8k", 0.76), SourceFacts("sharegpt", 13.3)]
    finding = source_memorised(rows, sources)
    assert finding is not None
    assert "source 'sharegpt' is drawn 13.3x as often as it occurs" in finding.message
    assert "6.0x below the other sources' (3)" in finding.message
    assert source_memorised(rows, [SourceFacts("gsm8k", 0.76), SourceFacts("sharegpt", 1.5)]) is None  # not repeated
    even = train_rows(source_loss={"gsm8k": 3.0, "sharegpt": 2.5})
    assert source_memorised(even, sources) is None  # repeated, but no collapse


def test_train_token_accuracy_far_ahead_of_eval():
    evals = [
        {"step": 20, "eval_loss": 2.5, "eval_token_accuracy": 0.6},
        {"step": 40, "eval_loss": 2.6, "eval_token_accuracy": 0.62},
    ]
    finding = token_accuracy_gap(train_rows(), evals)
    assert (
        finding is not None
        and "train token accuracy 90.0% runs 28 points ahead of eval token accuracy 62.0%" in finding.message
    )
    assert token_accuracy_gap(train_rows(), [{"step": 40, "eval_loss": 2.0, "eval_token_accuracy": 0.85}]) is None


def test_task_metric_against_loss_per_named_set():
    evals = [
        {
            "step": 50,
            "eval_gsm8k_loss": 1.2,
            "eval_gsm8k_extract": 0.30,
            "eval_chat_loss": 2.0,
            "eval_chat_rouge": 20.0,
        },
        {
            "step": 100,
            "eval_gsm8k_loss": 1.0,
            "eval_gsm8k_extract": 0.22,
            "eval_chat_loss": 1.8,
            "eval_chat_rouge": 25.0,
        },
    ]
    findings = metric_loss_disagree(evals)
    assert len(findings) == 1  # chat: loss falls, rouge rises: they agree
    assert findings[0].message == (
        "eval_gsm8k_extract fell from its best, 0.3 at step 50, to 0.22 by step 100 while eval_gsm8k_loss kept "
        "improving (1.2 -> 1)"
    )
    assert "metric_for_best_model: eval_gsm8k_extract, which keeps step 50's" in findings[0].advice
    unnamed = [{"step": 10, "eval_loss": 1.0, "eval_exact": 0.5}, {"step": 20, "eval_loss": 1.3, "eval_exact": 0.7}]
    assert [f.evidence["metric_key"] for f in metric_loss_disagree(unnamed)] == [
        "eval_exact"
    ]  # loss worse, metric better
    assert (
        metric_loss_disagree(
            [
                {"step": 10, "eval_loss": 1.0, "eval_token_accuracy": 0.5},
                {"step": 20, "eval_loss": 0.9, "eval_token_accuracy": 0.4},
            ]
        )
        == []
    )


def test_a_metric_that_peaks_and_falls_while_the_loss_improves_is_found_though_it_ends_above_its_start():
    """The usual shape in fine-tuning: the metric starts near the base's, climbs, then falls back (answers that
    loop) while the loss goes on down. First eval against last sees both improve; from the peak they part."""
    losses, metric = [2.0, 1.5, 1.3, 1.2, 1.15, 1.1], [0.05, 0.30, 0.40, 0.28, 0.22, 0.20]
    rows = [
        {"step": 10 * (i + 1), "eval_loss": loss, "eval_exact": value}
        for i, (loss, value) in enumerate(zip(losses, metric, strict=True))
    ]
    (finding,) = metric_loss_disagree(rows)
    assert finding.message == (  # the median of the three evals after the peak against the peak
        "eval_exact fell from its best, 0.4 at step 30, to 0.22 by step 60 while eval_loss kept improving (1.3 -> 1.15)"
    )
    assert finding.evidence["best_step"] == 30
    # one noisy dip after the peak is not a trend: the median of the evals after it stays near the best
    noisy = [{**row, "eval_exact": value} for row, value in zip(rows, [0.05, 0.3, 0.4, 0.2, 0.39, 0.4], strict=True)]
    assert metric_loss_disagree(noisy) == []


def write_run(run_dir: Path, rows: list[dict], eval_dir: bool) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"max_grad_norm": 1.0, "learning_rate": 1e-3}))
    (run_dir / "run.json").write_text(json.dumps({"status": "finished", "sources": ["a", "b"]}))
    (run_dir / "data_stats.json").write_text(json.dumps({"sources": [{"rate": 0.8}, {"rate": 12.0}]}))
    if eval_dir:
        (run_dir / "eval").mkdir()
        summary = {
            "model": str(run_dir),
            "base_model": "base-model",
            "data": "test.jsonl",
            "examples": 2,
            "metrics": [
                {
                    "metric": "extract #### (\\S+)",
                    "higher_is_better": True,
                    "tuned": 0.5,
                    "base": 0.0,
                    "difference": 0.5,
                    "interval": [0.0, 1.0],
                    "wins": 1,
                    "losses": 0,
                },
            ],
        }
        (run_dir / "eval" / "summary.json").write_text(json.dumps(summary))
        predictions = [
            {
                "row": 1,
                "prompt": "2+2?",
                "reference": "#### 4",
                "base": {"prediction": "five", "scores": {"extract #### (\\S+)": 0.0}},
                "tuned": {"prediction": "#### 4", "scores": {"extract #### (\\S+)": 1.0}},
            },
            {
                "row": 2,
                "prompt": "3+3?",
                "reference": "#### 6",
                "base": {"prediction": "7", "scores": {"extract #### (\\S+)": 0.0}},
                "tuned": {"prediction": "#### 5", "scores": {"extract #### (\\S+)": 0.0}},
            },
        ]
        (run_dir / "eval" / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
    return run_dir


def test_report_shows_logged_findings_and_the_evaluation_section(tmp_path):
    rows = train_rows(source_loss={"a": 3.0, "b": 0.4})
    run_dir = write_run(tmp_path / "run", rows, eval_dir=True)
    record = read_run(run_dir)
    assert [f["kind"] for f in record.findings] == ["clipped_steps", "source_memorised"]
    html = build_report(run_dir).read_text()
    assert "No problems detected" not in html
    assert "<h2>Evaluation</h2>" in html and "+50.0 pts" in html and "[+0.0, +100.0] pts" in html
    assert "Where tuned beats base" in html and "#### 4" in html
    plain = build_report(write_run(tmp_path / "plain", train_rows(clipped=1), eval_dir=False)).read_text()
    assert "<h2>Evaluation</h2>" not in plain and "No problems detected" in plain
    assert logged_findings(train_rows(clipped=1), [], 1.0, 1e-3, []) == []
