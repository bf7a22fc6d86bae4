"""Named eval sets: each gets its own metrics, and metric_for_best_model picks the one that decides
the best checkpoint and early stopping. A single unnamed eval_dataset keeps its eval_loss."""

from __future__ import annotations

import json
import random
import shutil

import pytest

import sftkit.train.loop as loop
from sftkit.config import ConfigError, validate_config
from tests.train_helpers import WORDS, tiny_config

BASE = {"model_name_or_path": "m", "datasets": [{"path": "train.jsonl"}]}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"eval_dataset": [{"path": "a.jsonl"}]}, "eval_dataset.0 has no label"),
        (
            {"eval_dataset": [{"path": "a.jsonl", "label": "x"}, {"path": "b.jsonl", "label": "x"}]},
            "label 'x' is used twice",
        ),
        (
            {"eval_dataset": [{"path": "a.jsonl", "label": "gsm8k"}], "metric_for_best_model": "eval_chat_loss"},
            "metric_for_best_model = 'eval_chat_loss' names no eval metric of this config; choose one of: "
            "eval_gsm8k_loss, eval_gsm8k_token_accuracy",
        ),
        ({"metric_for_best_model": "eval_loss"}, "metric_for_best_model = 'eval_loss' but there is no eval data"),
        ({"eval_dataset": {"path": "a.jsonl", "weight": 2}}, "weights mix training sources only"),
        (
            {"eval_dataset": [{"path": "a.jsonl", "lable": "x"}]},
            "unknown key 'eval_dataset.0.lable'; did you mean 'label'?",
        ),
        ({"eval_dataset": "a.jsonl"}, "eval_dataset = 'a.jsonl': give one entry"),
    ],
)
def test_bad_eval_set_configs_name_the_key(extra, message):
    with pytest.raises(ConfigError) as error:
        validate_config({**BASE, **extra})
    assert message in str(error.value)
    assert "DatasetSpec" not in str(error.value)  # no pydantic union branch names


def test_eval_metric_names_and_the_default_metric():
    single = validate_config({**BASE, "eval_dataset": {"path": "a.jsonl"}})
    assert [label for label, _ in single.eval_sets] == [""] and single.best_model_metric == "eval_loss"
    split = validate_config({**BASE, "eval_split_ratio": 0.1, "metric_for_best_model": "token_accuracy"})
    assert split.eval_sets == [("", None)] and split.best_model_metric == "eval_token_accuracy"
    named = validate_config(
        {**BASE, "eval_dataset": [{"path": "a.jsonl", "label": "gsm8k"}, {"path": "b.jsonl", "label": "chat"}]}
    )
    assert named.eval_metric_names == [
        "eval_gsm8k_loss",
        "eval_gsm8k_token_accuracy",
        "eval_chat_loss",
        "eval_chat_token_accuracy",
    ]
    assert named.best_model_metric == "eval_gsm8k_loss"


@pytest.mark.slow
def test_each_named_set_is_evaluated_alone_and_the_chosen_one_stops_the_run(tmp_path, tiny_model_dir):
    """`seen` is the training data itself, whose one fixed reply is memorised (its loss keeps falling);
    `unseen` has other replies (its loss soon rises). Stopping on eval_unseen_loss stops at the first
    eval without gain of that set, and its curve equals the eval_loss of the same run with `unseen` as
    the only, unnamed eval set."""
    rng = random.Random(0)

    def chats(path, rows: int, reply: str | None):
        with path.open("w") as handle:
            for _ in range(rows):
                handle.write(
                    json.dumps(
                        {
                            "messages": [
                                {"role": "user", "content": " ".join(rng.choices(WORDS, k=6))},
                                {"role": "assistant", "content": reply or " ".join(rng.choices(WORDS, k=8))},
                            ]
                        }
                    )
                    + "\n"
                )
        return path

    train = chats(tmp_path / "train.jsonl", 4, "hello how can help you today")
    shutil.copy(train, tmp_path / "seen.jsonl")
    chats(tmp_path / "unseen.jsonl", 6, None)
    common = dict(
        max_steps=16,
        eval_steps=2,
        early_stopping_patience=1,
        finetuning="full",
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_steps=100,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        max_new_tokens=1,
    )
    named = loop.train(
        tiny_config(
            tiny_model_dir,
            train,
            tmp_path / "named",
            metric_for_best_model="unseen_loss",
            eval_dataset=[
                {"path": str(tmp_path / "seen.jsonl"), "label": "seen"},
                {"path": str(tmp_path / "unseen.jsonl"), "label": "unseen"},
            ],
            **common,
        )
    )
    single = loop.train(
        tiny_config(
            tiny_model_dir, train, tmp_path / "single", eval_dataset={"path": str(tmp_path / "unseen.jsonl")}, **common
        )
    )

    def evals(name: str) -> list[dict]:
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [row for row in rows if any(key.startswith("eval_") for key in row)]

    named_evals, single_evals = evals("named"), evals("single")
    for row in named_evals:
        assert {
            "eval_seen_loss",
            "eval_seen_token_accuracy",
            "eval_unseen_loss",
            "eval_unseen_token_accuracy",
            "eval_seen_tokens",
            "eval_unseen_tokens",
        } <= row.keys() and "eval_loss" not in row
    unseen = [row["eval_unseen_loss"] for row in named_evals]
    stop = next(i for i in range(1, len(unseen)) if unseen[i] >= min(unseen[:i]))  # patience 1
    assert named.status == "early_stopped" and named.last_step == named_evals[stop]["step"] < 16
    best = min(range(stop + 1), key=lambda i: unseen[i])
    assert named.best_checkpoint == f"checkpoint-{named_evals[best]['step']}"
    run = json.loads((tmp_path / "named" / "run.json").read_text())
    assert run["metric_for_best_model"] == "eval_unseen_loss" and run["best_metric"] == unseen[best]
    seen = [row["eval_seen_loss"] for row in named_evals]
    assert seen[stop] < seen[stop - 1]  # the other set still improved: the choice of metric decided the stop

    assert single.status == "early_stopped" and single.last_step == named.last_step
    assert [row["eval_loss"] for row in single_evals] == unseen
