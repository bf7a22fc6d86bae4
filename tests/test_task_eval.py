"""Task metrics during training (eval_metric), and samples from held-back training rows when there is no eval set."""

from __future__ import annotations

import json

import pytest

from sftkit.config import ConfigError, eval_loss_key, greater_is_better
from sftkit.evaluate import EvalOptions, evaluate, parse_metrics
from sftkit.report import build_report
from sftkit.train.loop import train
from tests.train_helpers import tiny_config, write_chat_data


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def data(tmp_path):
    return write_chat_data(tmp_path / "train.jsonl", rows=40), write_chat_data(tmp_path / "qa.jsonl", rows=12, seed=1)


def task_config(tiny_model_dir, data, output_dir, **overrides):
    train_data, eval_data = data
    values = dict(
        eval_dataset=[{"path": str(eval_data), "label": "qa"}],
        eval_metric=["chrf", "contains"],
        eval_steps=2,
        eval_generation_examples=6,
        per_device_eval_batch_size=4,
        max_new_tokens=12,
        finetuning="full",
        learning_rate=1e-3,
    )
    return tiny_config(tiny_model_dir, train_data, output_dir, **{**values, **overrides})


def test_task_metrics_are_logged_beside_the_eval_loss_and_equal_sftkit_eval_of_the_model(
    tiny_model_dir, data, tmp_path
):
    """The figure logged at the last step is what `sftkit eval` gives the final model on the same rows."""
    run_dir = tmp_path / "run"
    train(task_config(tiny_model_dir, data, run_dir, eval_generation_steps=4))
    evals = [row for row in rows_of(run_dir / "metrics.jsonl") if "eval_qa_loss" in row]
    assert [row["step"] for row in evals] == [2, 4, 6, 8]
    assert [row["step"] for row in evals if "eval_qa_chrf" in row] == [4, 8]  # every eval_generation_steps
    last = evals[-1]
    assert last["eval_qa_chrf"] > 0  # random text still shares character n-grams with the reference
    result = evaluate(
        EvalOptions(
            str(run_dir),
            str(data[1]),
            parse_metrics(["chrf", "contains"]),
            limit=6,
            batch_size=4,
            max_new_tokens=12,
            out=tmp_path / "eval",
        )
    )
    figures = {metric.metric: metric.tuned for metric in result.metrics}
    assert last["eval_qa_chrf"] == pytest.approx(figures["chrf"], abs=1e-9)
    assert last["eval_qa_contains"] == pytest.approx(figures["contains"], abs=1e-9)
    html = build_report(run_dir).read_text()
    assert 'alt="Task metric"' in html  # the task metric's curve beside the eval loss


def test_a_task_metric_picks_the_best_checkpoint_at_the_evals_that_generate_it(tiny_model_dir, data, tmp_path):
    run_dir = tmp_path / "run"
    result = train(
        task_config(
            tiny_model_dir, data, run_dir, eval_generation_steps=4, save_steps=4, metric_for_best_model="eval_qa_chrf"
        )
    )
    generated = {
        row["step"]: row["eval_qa_chrf"] for row in rows_of(run_dir / "metrics.jsonl") if "eval_qa_chrf" in row
    }
    best_step = max(generated, key=lambda step: (generated[step], -step))  # the first of equals stays best
    assert result.best_checkpoint == f"checkpoint-{best_step}"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["best_metric"] == pytest.approx(generated[best_step])


def test_eval_metric_errors_name_the_key_and_the_fix(tiny_model_dir, data, tmp_path):
    with pytest.raises(ConfigError, match="no eval data"):
        tiny_config(tiny_model_dir, data[0], tmp_path / "run", eval_metric="exact")
    with pytest.raises(ConfigError, match="did you mean 'rouge'"):
        task_config(tiny_model_dir, data, tmp_path / "run", eval_metric=["rogue"])
    with pytest.raises(ConfigError, match=r"eval_metric: .*loss.* logged at every eval"):
        task_config(tiny_model_dir, data, tmp_path / "run", eval_metric=["loss"])
    with pytest.raises(ConfigError, match="no group"):
        task_config(tiny_model_dir, data, tmp_path / "run", eval_metric=["extract"], eval_extract="#### \\S+")
    with pytest.raises(ConfigError, match="eval_qa_chrf, eval_qa_contains"):  # the choices name generated metrics
        task_config(tiny_model_dir, data, tmp_path / "run", metric_for_best_model="eval_qa_exact")
    config = task_config(
        tiny_model_dir,
        data,
        tmp_path / "run",
        eval_metric=["extract"],
        eval_extract="#### (\\S+)",
        metric_for_best_model="eval_qa_extract",
    )
    assert config.best_model_metric == "eval_qa_extract"
    assert greater_is_better("eval_qa_extract") and eval_loss_key("eval_qa_extract") == "eval_qa_loss"
    assert eval_loss_key("eval_rouge") == "eval_loss"


def test_without_eval_data_held_back_training_rows_are_sampled_and_never_trained(tiny_model_dir, tmp_path):
    data = write_chat_data(tmp_path / "train.jsonl", rows=30)
    held = tmp_path / "held"
    train(tiny_config(tiny_model_dir, data, held, max_steps=2, sample_holdout=3, max_new_tokens=8))
    last_rows = [row["messages"] for row in rows_of(data)[-3:]]
    samples = rows_of(held / "samples.jsonl")
    assert [sample["prompt"] for sample in samples] == [messages[0]["content"] for messages in last_rows]
    # the monitor reads them: a model that never ends its replies (a random one) is told so
    assert not any(sample["ended"] for sample in samples)
    assert "no_end_of_turn" in [row["kind"] for row in rows_of(held / "diagnosis.jsonl")]
    every = tmp_path / "every"
    train(tiny_config(tiny_model_dir, data, every, max_steps=2, sample_holdout=0))
    assert not (every / "samples.jsonl").exists()
    trained = [json.loads((run / "data_stats.json").read_text())["train_examples"] for run in (held, every)]
    assert trained[1] - trained[0] == 3
