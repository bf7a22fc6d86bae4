"""`sftkit eval` on tiny models: metrics, the paired interval, batched generation against one at a time,
the reference loss against a plain forward, the files it writes, and the errors a user can fix."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from sftkit.config import ConfigError
from sftkit.data.formats import DataError
from sftkit.data.template import IGNORE_INDEX, TemplateError, _builtin
from sftkit.evaluate import EvalExample, EvalOptions, evaluate, load_eval_examples, parse_metric, parse_metrics
from sftkit.evaluate.generation import generate_batched, reference_losses
from sftkit.evaluate.interval import paired_bootstrap
from sftkit.evaluate.metrics import normalise_number, score
from sftkit.generate import load_trained
from sftkit.model.load import ModelError

GSM8K_STYLE = "#### (\\S+)"


def test_extract_normalises_numbers_and_takes_the_last_match():
    spec = parse_metric("extract", GSM8K_STYLE)
    reference = "She makes 9 * 2 = $18.\n#### 1,000"
    assert score(spec, "so #### 5 ... then\n#### 1000.0", reference) == 1.0
    assert score(spec, "#### 1000\n#### 999", reference) == 0.0  # the final answer counts
    assert score(spec, "no answer written", reference) == 0.0
    assert score(spec, "#### 18", "18") == 1.0  # a bare reference is its own answer
    assert [normalise_number(x) for x in ("1,000", "5.0", "$3.50", "-2", "7%")] == ["1000", "5", "3.5", "-2", "7"]


def test_exact_and_contains_compare_normalised_text():
    assert score(parse_metric("exact"), "  Paris. ", "paris") == 1.0
    assert score(parse_metric("exact"), "The answer is Paris", "Paris") == 0.0
    assert score(parse_metric("contains"), "The answer is  PARIS, of course", "Paris") == 1.0


@pytest.mark.skipif(importlib.util.find_spec("sacrebleu") is None, reason="sacrebleu not installed")
def test_library_metrics_match_their_libraries():
    import sacrebleu
    from rouge_score import rouge_scorer

    prediction, reference = "the cat sat on the mat today", "the cat sat on the mat"
    assert score(parse_metric("bleu"), prediction, reference) == sacrebleu.sentence_bleu(prediction, [reference]).score
    assert score(parse_metric("chrf"), prediction, reference) == sacrebleu.sentence_chrf(prediction, [reference]).score
    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, prediction)["rougeL"].fmeasure
    assert score(parse_metric("rouge"), prediction, reference) == pytest.approx(100 * rouge)


def test_metric_errors_name_the_metric_and_the_fix(monkeypatch):
    with pytest.raises(ConfigError, match=r"metric 'contain': unknown; .*did you mean 'contains'"):
        parse_metric("contain")
    with pytest.raises(ConfigError, match=r"the regex has no group; put the answer in parentheses"):
        parse_metric("extract", "#### \\S+")
    with pytest.raises(ConfigError, match=r"--extract '#### \(\\S\+': does not compile"):
        parse_metric("extract", "#### (\\S+")
    with pytest.raises(ConfigError, match="metric 'extract' needs a regex with one group"):
        parse_metric("extract")
    assert parse_metric("extract:#### (\\d+)").pattern == "#### (\\d+)"  # the config spelling
    assert parse_metrics([], GSM8K_STYLE) == [parse_metric("extract", GSM8K_STYLE)]
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sacrebleu" else find_spec(name, *a)
    )
    with pytest.raises(ConfigError, match=r"needs the sacrebleu package.*pip install 'sftkit\[eval\]'"):
        parse_metric("bleu")


def test_paired_interval_separates_a_real_gain_from_noise():
    assert paired_bootstrap([0.0] * 50, [1.0] * 50, [1.0] * 50) == (1.0, 1.0)
    assert paired_bootstrap([0.0, 1.0] * 25, [0.0, 1.0] * 25, [1.0] * 50) == (0.0, 0.0)  # same answers: no difference
    # tuned right on 3 more of 200 questions: not distinguishable from noise
    base = [1.0] * 10 + [0.0] * 190
    tuned = [1.0] * 13 + [0.0] * 187
    low, high = paired_bootstrap(base, tuned, [1.0] * 200)
    assert low <= 0 < 3 / 200 <= high
    # weights: a figure over tokens (loss) is sum(w * s) / sum(w), and so is the difference
    assert paired_bootstrap([2.0, 2.0], [1.0, 1.0], [5.0, 1.0]) == (-1.0, -1.0)


def _examples(count: int) -> list[EvalExample]:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "what", "is", "the", "answer"]
    return [
        EvalExample(i + 1, [{"role": "user", "content": " ".join(words[: 2 + (i * 5) % 11])}], " ".join(words[i % 4 :]))
        for i in range(count)
    ]


def test_batched_generation_equals_one_at_a_time(chat_model):
    """Left padding, the mask and position ids: every row of a padded batch generates what it would alone."""
    model, tokenizer, template = load_trained(chat_model)
    examples = _examples(7)  # prompts of 6 different lengths
    alone = generate_batched(model, tokenizer, template, examples, max_new_tokens=12, batch_size=1)
    batched = generate_batched(model, tokenizer, template, examples, max_new_tokens=12, batch_size=4)
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert [g.text for g in batched] == [g.text for g in alone]
    assert all(len(g.token_ids) > 0 for g in alone)


def test_reference_loss_is_the_loss_on_the_reply_tokens(chat_model):
    """Batched with padding, the reference loss equals a plain forward over the one example, masked to its
    last reply and end-of-turn (the earlier turns are context)."""
    from sftkit.data.template import tokenize_conversation

    model, tokenizer, template = load_trained(chat_model)
    examples = _examples(5)
    conversation = EvalExample(
        9,
        [
            {"role": "user", "content": "the quick fox"},
            {"role": "assistant", "content": "brown dog"},
            {"role": "user", "content": "what is the answer"},
        ],
        "the lazy dog",
    )
    results = reference_losses(model, tokenizer, template, [*examples, conversation], batch_size=3, max_length=512)
    tokenized = tokenize_conversation(conversation.messages, template, tokenizer)
    ids = torch.tensor([tokenized["input_ids"]])
    labels = torch.tensor(tokenized["labels"])
    trained = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    reply_start = max(i for i in trained if i - 1 not in trained)  # the last run of trained positions
    labels[:reply_start] = IGNORE_INDEX
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    expected = F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")
    assert results[-1].tokens == int((labels != IGNORE_INDEX).sum())
    assert results[-1].loss_sum == pytest.approx(float(expected), rel=1e-5)
    assert not results[-1].truncated
    short = reference_losses(
        model, tokenizer, template, [conversation], batch_size=1, max_length=results[-1].tokens + 2
    )
    assert short[0].truncated and short[0].tokens == results[-1].tokens  # context cut on the left, reply whole


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_eval_writes_summary_and_predictions_and_compares_with_the_base(tmp_path, chat_model, other_base):
    data = write_rows(
        tmp_path / "qa.jsonl",
        [{"question": f"what is {i} plus {i}", "answer": f"it is\n#### {2 * i}"} for i in range(6)],
    )
    options = EvalOptions(
        model=str(chat_model),
        data=str(data),
        metrics=parse_metrics(["extract", "contains", "loss"], GSM8K_STYLE),
        base=True,
        base_model=str(other_base),
        out=tmp_path / "eval",
        columns={"prompt": "question", "completion": "answer"},
        max_new_tokens=6,
        batch_size=4,
    )
    result = evaluate(options)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert summary["examples"] == len(rows) == 6
    assert [m["metric"] for m in summary["metrics"]] == ["extract #### (\\S+)", "contains", "loss"]
    assert summary["base_model"] == str(other_base)
    assert rows[0]["prompt"] == "what is 0 plus 0" and rows[0]["reference"] == "it is\n#### 0"
    assert set(rows[0]["tuned"]) == {"prediction", "ended", "scores"}
    loss = summary["metrics"][2]
    assert loss["difference"] == pytest.approx(loss["tuned"] - loss["base"])
    assert loss["interval"][0] <= loss["difference"] <= loss["interval"][1]
    # Scoring the model against itself: no difference, an interval of exactly zero.
    same = evaluate(EvalOptions(**{**options.__dict__, "base_model": str(chat_model), "out": None}))
    assert all(m.difference == 0 and m.interval == (0.0, 0.0) for m in same.metrics)
    assert [r["tuned"] for r in same.rows] == [r["base"] for r in same.rows] == [r["tuned"] for r in result.rows]


def test_eval_cli_prints_the_summary_as_json(tmp_path, chat_model):
    from sftkit.cli import app

    data = write_rows(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}],
    )
    result = CliRunner().invoke(
        app, ["eval", str(chat_model), "--data", str(data), "--metric", "exact", "--max-new-tokens", "4", "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (
        summary["examples"] == 1
        and summary["metrics"][0]["metric"] == "exact"
        and summary["metrics"][0]["base"] is None
    )
    bad = CliRunner().invoke(app, ["eval", str(chat_model), "--data", str(data), "--metric", "rogue"])
    assert bad.exit_code == 2 and "did you mean 'rouge'" in bad.output


def test_bad_eval_input_names_the_file_row_or_key(tmp_path, chat_model, tiny_model_dir):
    no_reply = write_rows(
        tmp_path / "open.jsonl",
        [
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"messages": [{"role": "user", "content": "c"}]},
        ],
    )
    with pytest.raises(
        DataError, match=r"open.jsonl: row 2: no assistant turn; every eval row needs a prompt and a reference"
    ):
        load_eval_examples(str(no_reply))
    missing = write_rows(tmp_path / "qa.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(
        DataError, match=r"qa.jsonl: row 2: prompt or completion is missing.*needs a prompt and a reference"
    ):
        load_eval_examples(str(missing))
    text = write_rows(tmp_path / "text.jsonl", [{"text": "just text"}])
    with pytest.raises(DataError, match="text rows have no reference"):
        load_eval_examples(str(text))
    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    (plain / "chat_template.jinja").write_text(_builtin("plain"), encoding="utf-8")
    with pytest.raises(TemplateError, match="messages data needs a chat template"):
        evaluate(EvalOptions(model=str(plain), data=str(no_reply), metrics=parse_metrics(["exact"]), limit=1))
    with pytest.raises(ModelError, match="does not name the base model it was trained from; give it with --base-model"):
        evaluate(
            EvalOptions(model=str(chat_model), data=str(no_reply), metrics=parse_metrics(["exact"]), limit=1, base=True)
        )
    with pytest.raises(ModelError, match=r"--base: the base model '.*/gone' cannot be loaded"):
        evaluate(
            EvalOptions(
                model=str(chat_model),
                data=str(no_reply),
                metrics=parse_metrics(["exact"]),
                limit=1,
                base=True,
                base_model=str(tmp_path / "gone"),
                max_new_tokens=2,
            )
        )
