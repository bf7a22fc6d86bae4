"""End-to-end runs of `train`: what a run writes, and how it stops when it must."""

from __future__ import annotations

import json

import pytest
import torch

import sftkit.train.loop as loop
import sftkit.train.step as step_module
from tests.train_helpers import tiny_config, write_chat_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("run")
    data = write_chat_data(root / "chat.jsonl", rows=40)
    config = tiny_config(
        tiny_model_dir,
        data,
        root / "out",
        max_steps=6,
        eval_split_ratio=0.2,
        eval_steps=3,
        save_steps=2,
        save_total_limit=2,
        sample_steps=3,
        max_new_tokens=8,
        report_to="tensorboard",
    )
    return loop.train(config), root / "out"


def test_run_directory_holds_what_the_docs_promise(finished_run):
    result, out = finished_run
    assert result.status == "finished" and result.last_step == 6
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in eval_rows] == [3, 6]
    for key in (
        "epoch",
        "lr",
        "grad_norm",
        "trained_tokens",
        "tokens",
        "trained_tokens_per_s",
        "tokens_per_s",
        "elapsed_s",
        "memory_gb",
    ):
        assert key in train_rows[0]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["effective_batch"] == 4 and run["total_steps"] == 6
    assert (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {3, 6}
    template = (out / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template


def test_checkpoints_are_pruned_but_the_best_is_kept(finished_run):
    result, out = finished_run
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert len(kept) <= 3  # limit 2, plus the best when it is older
    assert result.best_checkpoint in kept
    for name in kept:
        assert (out / name / "manifest.json").is_file()
        assert (out / name / "chat_template.jinja").read_text() == (out / "chat_template.jinja").read_text()
    assert not list(out.glob(".tmp-checkpoint-*"))


def test_final_adapter_loads_with_peft_and_carries_the_template(finished_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = finished_run
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, out / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    assert tokenizer.chat_template == (out / "chat_template.jinja").read_text()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 7]])).logits).all()


def test_full_finetuning_saves_a_loadable_model(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    data = write_chat_data(tmp_path / "chat.jsonl", rows=12)
    result = loop.train(
        tiny_config(tiny_model_dir, data, tmp_path / "out", finetuning="full", max_steps=2, learning_rate=1e-3)
    )
    assert result.final_dir == tmp_path / "out" / "model"
    trained = AutoModelForCausalLM.from_pretrained(result.final_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = any(
        not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), base.state_dict().values(), strict=True)
    )
    assert changed


def _nan_on_step(monkeypatch, bad_steps: set[int]):
    real = step_module.accumulate_gradients
    calls = {"n": 0}

    def fake(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in bad_steps else loss

    monkeypatch.setattr(step_module, "accumulate_gradients", fake)


def test_non_finite_loss_stops_with_advice(tmp_path, tiny_model_dir, monkeypatch):
    data = write_chat_data(tmp_path / "chat.jsonl", rows=12)
    _nan_on_step(monkeypatch, {2})
    with pytest.raises(loop.TrainingError, match=r"not finite.*lower learning_rate"):
        loop.train(tiny_config(tiny_model_dir, data, tmp_path / "out", max_steps=4))
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["status"] == "crashed" and run["last_step"] == 1


def test_non_finite_step_is_skipped_when_allowed(tmp_path, tiny_model_dir, monkeypatch):
    data = write_chat_data(tmp_path / "chat.jsonl", rows=12)
    _nan_on_step(monkeypatch, {2})
    result = loop.train(tiny_config(tiny_model_dir, data, tmp_path / "out", max_steps=4, max_bad_steps=1))
    assert result.status == "finished" and result.last_step == 4


def test_early_stopping_names_the_best_checkpoint(tmp_path, tiny_model_dir):
    data = write_chat_data(tmp_path / "chat.jsonl", rows=6)
    # a huge LR on three examples: eval loss gets worse, so patience 1 stops the run early
    result = loop.train(
        tiny_config(
            tiny_model_dir,
            data,
            tmp_path / "out",
            max_steps=40,
            eval_split_ratio=0.34,
            eval_steps=2,
            early_stopping_patience=1,
            learning_rate=0.5,
            save_steps=100,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=1,
        )
    )
    assert result.status == "early_stopped" and result.last_step < 40
    assert result.best_checkpoint and (tmp_path / "out" / result.best_checkpoint / "manifest.json").is_file()


def test_samples_do_not_disturb_training(tmp_path, tiny_model_dir):
    """Generating samples mid-run (which draws from no training RNG and switches to eval mode and
    back) leaves the loss curve and the weights exactly as without samples, dropout included."""
    from tests.train_helpers import final_weights, logged_losses, max_weight_difference

    data = write_chat_data(tmp_path / "chat.jsonl", rows=24)
    quiet = loop.train(tiny_config(tiny_model_dir, data, tmp_path / "quiet", max_steps=6, lora_dropout=0.2))
    sampled = loop.train(
        tiny_config(
            tiny_model_dir,
            data,
            tmp_path / "sampled",
            max_steps=6,
            lora_dropout=0.2,
            sample_prompts=["hello how can", "what is the answer"],
            sample_steps=2,
            max_new_tokens=6,
        )
    )
    assert quiet.status == sampled.status == "finished"
    assert len((tmp_path / "sampled" / "samples.jsonl").read_text().splitlines()) == 6  # steps 2, 4, 6
    assert logged_losses(tmp_path / "quiet") == logged_losses(tmp_path / "sampled")
    assert max_weight_difference(final_weights(tmp_path / "quiet"), final_weights(tmp_path / "sampled")) == 0.0
