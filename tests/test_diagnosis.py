"""Each detector fires on a synthetic metric stream that shows its failure, once, and none fires on a
healthy run."""

from __future__ import annotations

import json
import math
import random

import pytest

from sftkit.monitor.diagnosis import Monitor, MonitorSettings, is_repetitive
from sftkit.train.schedule import lr_multiplier

PEAK_LR = 2e-4
TOTAL = 200
WARMUP = 10


def settings(precision: str = "bf16", trained_token_fraction: float = 0.4) -> MonitorSettings:
    return MonitorSettings(
        learning_rate=PEAK_LR,
        total_steps=TOTAL,
        warmup_steps=WARMUP,
        expected_lr=lambda step: PEAK_LR * lr_multiplier(step - 1, TOTAL, WARMUP, "cosine"),
        trained_token_fraction=trained_token_fraction,
        precision=precision,
    )


def healthy_loss(step: int, rng: random.Random) -> float:
    return 1.0 + math.exp(-step / 40) + rng.uniform(-0.08, 0.08)


GOOD_SAMPLES = [
    {"prompt": "What is 12 plus 30?", "completion": "12 plus 30 is 42.", "ended": True},
    {"prompt": "Say hello.", "completion": "Hello! How can I help you today?", "ended": True},
    {"prompt": "Name a colour.", "completion": "Blue, like the sky on a clear summer day.", "ended": False},
]


def run_steps(monitor: Monitor, steps: range, loss=None, grad_norm=None, lr=None, seed: int = 0) -> list:
    """Feed a healthy stream, with any of loss/grad_norm/lr replaced by a function of the step."""
    rng = random.Random(seed)
    found = []
    for step in steps:
        found += monitor.observe_step(
            step,
            loss(step) if loss else healthy_loss(step, rng),
            grad_norm(step) if grad_norm else 1.0 + rng.uniform(-0.3, 0.3),
            lr(step) if lr else monitor.settings.expected_lr(step),
            [step * 2, step * 2 + 1],
        )
    return found


def kinds(findings) -> list[str]:
    return [finding.kind for finding in findings]


def test_healthy_run_raises_nothing(tmp_path):
    path = tmp_path / "diagnosis.jsonl"
    monitor = Monitor(settings(), path)
    found = run_steps(monitor, range(1, TOTAL + 1))
    rng = random.Random(1)
    for step in range(20, TOTAL + 1, 20):
        train = healthy_loss(step, rng)
        found += monitor.observe_eval(step, train, train + 0.1, f"checkpoint-{step}")
        found += monitor.observe_samples(step, GOOD_SAMPLES)
    assert found == [] and monitor.findings == []
    assert not path.exists()


def test_non_finite_loss_fires_once_and_is_written(tmp_path):
    path = tmp_path / "diagnosis.jsonl"
    monitor = Monitor(settings(precision="fp16"), path)
    found = run_steps(monitor, range(1, 31), loss=lambda s: float("nan") if s >= 25 else 2.0 - s / 100)
    assert kinds(found) == ["non_finite"]
    assert found[0].step == 25 and found[0].evidence["example_ids"] == [50, 51]
    assert "bf16" in found[0].advice
    rows = [json.loads(line, parse_constant=pytest.fail) for line in path.read_text().splitlines()]  # strict JSON
    assert [(row["step"], row["kind"]) for row in rows] == [(25, "non_finite")]
    assert rows[0]["evidence"]["loss"] == "nan"
    assert set(rows[0]) == {"step", "kind", "message", "evidence", "advice"}


def test_non_finite_grad_norm_fires_except_under_fp16_loss_scaling():
    monitor = Monitor(settings(), None)
    found = run_steps(monitor, range(1, 8), grad_norm=lambda s: math.inf if s == 7 else 1.0)
    assert kinds(found) == ["non_finite"] and "bf16" not in found[0].advice
    # fp16: the loss scaler overflows the gradients on purpose while it calibrates, and skips those steps
    fp16 = Monitor(settings(precision="fp16"), None)
    assert run_steps(fp16, range(1, 8), grad_norm=lambda s: math.inf if s < 4 else 1.0) == []


def test_flat_loss_with_low_lr_blames_the_learning_rate():
    monitor = Monitor(settings(), None)
    rng = random.Random(0)
    found = run_steps(monitor, range(1, 60), loss=lambda s: 2.0 + rng.uniform(-0.02, 0.02))
    assert kinds(found) == ["loss_flat"]
    assert found[0].step == 2 * settings().flat_window  # as soon as the start and recent windows are apart
    assert "learning rate" in found[0].advice


def test_flat_loss_with_almost_no_trained_tokens_blames_the_mask():
    monitor = Monitor(settings(trained_token_fraction=0.01), None)
    found = run_steps(monitor, range(1, 60), loss=lambda s: 0.0)
    assert kinds(found) == ["loss_flat"]  # a loss that is 0 from the start is not memorisation
    assert found[0].evidence["trained_token_fraction"] == 0.01 and "mask" in found[0].advice


def test_train_loss_near_zero_early_names_the_best_checkpoint():
    monitor = Monitor(settings(), None)
    monitor.observe_eval(20, 1.0, 1.2, "checkpoint-20")
    found = run_steps(monitor, range(1, 60), loss=lambda s: max(2.0 - s / 20, 0.001))
    assert kinds(found) == ["train_loss_near_zero"]
    assert found[0].step == 41 and "checkpoint-20" in found[0].advice


def test_eval_loss_rising_while_train_loss_falls_is_overfitting():
    monitor = Monitor(settings(), None)
    evals = [(20, 1.5, 1.6), (40, 1.2, 1.4), (60, 0.9, 1.45), (80, 0.6, 1.6)]
    found = []
    for step, train, evaluation in evals:
        found += monitor.observe_eval(step, train, evaluation, "checkpoint-40" if step <= 40 else None)
    assert kinds(found) == ["overfitting"] and found[0].step == 80
    assert found[0].evidence["best_step"] == 40 and found[0].evidence["best_checkpoint"] == "checkpoint-40"
    assert "checkpoint-40" in found[0].advice


def test_eval_noise_is_not_overfitting():
    monitor = Monitor(settings(), None)
    found = []
    for step, train, evaluation in [(20, 1.5, 1.6), (40, 1.2, 1.4), (60, 1.1, 1.41), (80, 1.0, 1.39)]:
        found += monitor.observe_eval(step, train, evaluation, None)
    assert found == []


@pytest.mark.parametrize(
    ("kind", "loss", "grad_norm"),
    [
        ("loss_spike", lambda s: 6.0 if s == 50 else None, None),
        ("grad_norm_spike", None, lambda s: 40.0 if s == 50 else 1.0),
    ],
)
def test_spike_names_step_and_batch(kind, loss, grad_norm):
    monitor = Monitor(settings(), None)
    rng = random.Random(0)
    loss_fn = (lambda s: loss(s) or healthy_loss(s, rng)) if loss else None
    found = run_steps(monitor, range(1, 60), loss=loss_fn, grad_norm=grad_norm)
    assert kinds(found) == [kind]
    assert found[0].step == 50 and found[0].evidence["example_ids"] == [100, 101]


def test_spikes_during_warmup_are_ignored():
    monitor = Monitor(settings(), None)
    assert run_steps(monitor, range(1, WARMUP + 1), grad_norm=lambda s: 50.0 if s == WARMUP else 1.0) == []


def test_lr_not_following_the_schedule_fires():
    monitor = Monitor(settings(), None)
    # A scheduler stepped once per micro-batch (GA 4) runs through warmup four times too fast.
    found = run_steps(monitor, range(1, 30), lr=lambda s: PEAK_LR * lr_multiplier(4 * s - 1, TOTAL, WARMUP, "cosine"))
    assert kinds(found) == ["lr_mismatch"] and found[0].step == 1
    assert found[0].evidence["expected_lr"] == pytest.approx(PEAK_LR / (WARMUP + 1))


def test_samples_that_never_end_fire_after_the_model_has_settled():
    monitor = Monitor(settings(), None)
    endless = [dict(sample, ended=False) for sample in GOOD_SAMPLES]
    assert monitor.observe_samples(10, endless) == []  # too early to expect the format
    found = monitor.observe_samples(60, endless)
    assert kinds(found) == ["no_end_of_turn"]
    assert monitor.observe_samples(80, endless) == []  # warned once


def test_repeating_samples_fire():
    monitor = Monitor(settings(), None)
    looping = [
        dict(GOOD_SAMPLES[0], completion="the answer is the answer is " * 6),
        dict(GOOD_SAMPLES[1], completion="!" * 60),
        GOOD_SAMPLES[2],
    ]
    assert kinds(monitor.observe_samples(100, looping)) == ["repetition"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12 plus 30 is 42.", False),
        ("The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun by the river.", False),
        ("I am a bot. I am a bot. I am a bot. I am a bot. I am a bot.", True),
        ("abcabcabcabcabcabcabcabcabcabcabcabcabcabc", True),
    ],
)
def test_is_repetitive(text, expected):
    assert is_repetitive(text) is expected


def test_a_resumed_run_does_not_warn_again(tmp_path):
    path = tmp_path / "diagnosis.jsonl"
    first = Monitor(settings(), path)
    run_steps(first, range(1, 3), grad_norm=lambda s: math.nan)
    path.write_text(path.read_text() + '{"step": 9, "kind": "cut sh')  # a crash mid-write
    resumed = Monitor(settings(), path)
    assert kinds(resumed.findings) == ["non_finite"]
    assert run_steps(resumed, range(3, 5), grad_norm=lambda s: math.nan) == []


# ------------------------------------------------------------------------ end to end: the real loop, induced failures


def train_quietly(config):
    from io import StringIO

    from rich.console import Console

    from sftkit.train.loop import train

    return train(config, console=Console(file=StringIO(), width=200))


def diagnosis_rows(output_dir) -> list[dict]:
    path = output_dir / "diagnosis.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    from tests.train_helpers import write_chat_data

    return write_chat_data(tmp_path_factory.mktemp("diagnosis_data") / "chat.jsonl")


@pytest.mark.slow
def test_e2e_overflowing_model_reports_non_finite_loss(tmp_path, tiny_model_dir, chat_data):
    # learning_rate is capped at 1.0 by the config and Adam's steps are bounded, so an LR too high does not
    # reliably overflow fp32 on a tiny model; an inf weight overflows as fp16 activations would.
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from sftkit.train.loop import TrainingError
    from tests.train_helpers import tiny_config

    model_dir = tmp_path / "overflowing"
    shutil.copytree(tiny_model_dir, model_dir)
    weights = load_file(model_dir / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = torch.inf
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TrainingError, match="not finite"):
        train_quietly(tiny_config(model_dir, chat_data, tmp_path / "run", max_steps=4))
    rows = diagnosis_rows(tmp_path / "run")
    assert [(row["step"], row["kind"]) for row in rows] == [(1, "non_finite")]
    assert rows[0]["evidence"]["example_ids"]  # the batch, to look at


@pytest.mark.slow
def test_e2e_learning_rate_too_low_reports_flat_loss(tmp_path, tiny_model_dir, chat_data):
    from tests.train_helpers import tiny_config

    train_quietly(
        tiny_config(tiny_model_dir, chat_data, tmp_path / "run", learning_rate=1e-8, max_steps=10, warmup_steps=0)
    )
    rows = diagnosis_rows(tmp_path / "run")
    assert [row["kind"] for row in rows] == ["loss_flat"]
    assert "learning rate" in rows[0]["advice"] and rows[0]["evidence"]["trained_token_fraction"] > 0.05


@pytest.mark.slow
def test_e2e_three_examples_overfit_and_the_report_names_the_best_checkpoint(tmp_path, tiny_model_dir, chat_data):
    from sftkit.report import build_report
    from tests.train_helpers import tiny_config

    lines = chat_data.read_text().splitlines(keepends=True)
    (tmp_path / "three.jsonl").write_text("".join(lines[:3]))
    (tmp_path / "eval.jsonl").write_text("".join(lines[10:20]))
    # Full fine-tuning at a constant, high LR memorises 3 examples within 40 steps; eval loss turns up.
    output_dir = tmp_path / "run"
    train_quietly(
        tiny_config(
            tiny_model_dir,
            tmp_path / "three.jsonl",
            output_dir,
            finetuning="full",
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            max_steps=40,
            packing=False,
            per_device_train_batch_size=3,
            gradient_accumulation_steps=1,
            lora_dropout=0.0,
            eval_dataset={"path": str(tmp_path / "eval.jsonl")},
            eval_steps=5,
            save_steps=5,
            sample_steps=20,
            max_new_tokens=8,
        )
    )
    overfitting = [row for row in diagnosis_rows(output_dir) if row["kind"] == "overfitting"]
    assert len(overfitting) == 1
    best = overfitting[0]["evidence"]["best_checkpoint"]
    assert best == f"checkpoint-{overfitting[0]['evidence']['best_step']}" and best in overfitting[0]["advice"]
    html = build_report(output_dir).read_text()
    assert "overfitting" in html and best in html and html.count("data:image/png;base64,") == 7  # all panels
