"""The config is checked at load time: every mistake names the file, the key, the value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sftkit.config import ConfigError, load_config, parse_cli_overrides, redacted, save_config, validate_config

MINIMAL = {"model_name_or_path": "meta-llama/Llama-2-7b-hf", "datasets": [{"path": "data/train.jsonl"}]}


def write_config(tmp_path: Path, **keys) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, **keys}), encoding="utf-8")
    return path


def load_error(path: Path, overrides: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_minimal_config_loads_with_documented_defaults(tmp_path):
    config = load_config(write_config(tmp_path))
    assert config.model_name_or_path == "meta-llama/Llama-2-7b-hf"
    assert config.datasets[0].path == "data/train.jsonl"
    assert config.datasets[0].format == "auto"
    assert (config.learning_rate, config.max_seq_length, config.finetuning) == (2e-4, 2048, "lora")


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("learning_rat", "learning_rate"),
        ("lora_rank", "lora_r"),
        ("gradient_accumulation", "gradient_accumulation_steps"),
    ],
)
def test_unknown_key_names_file_key_and_closest_valid_key(tmp_path, key, suggestion):
    path = write_config(tmp_path, **{key: 1})
    message = load_error(path)
    assert str(path) in message
    assert f"unknown key '{key}'" in message
    assert f"did you mean '{suggestion}'?" in message


def test_unknown_nested_key_suggests_the_dataset_field(tmp_path):
    path = write_config(tmp_path, datasets=[{"pth": "data/train.jsonl"}])
    message = load_error(path)
    assert "unknown key 'datasets.0.pth'" in message
    assert "did you mean 'path'?" in message


def test_unknown_key_far_from_any_field_points_to_the_reference(tmp_path):
    message = load_error(write_config(tmp_path, zzzz_qqqq=1))
    assert "unknown key 'zzzz_qqqq'" in message
    assert "did you mean" not in message


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("learning_rate", 5, "less than or equal to 1"),
        ("learning_rate", 0, "greater than 0"),
        ("lora_dropout", 1.0, "less than 1"),
        ("lora_r", 0, "greater than or equal to 1"),
        ("max_seq_length", 4, "greater than or equal to 8"),
        ("lr_scheduler_type", "cosin", "'cosine', 'linear', 'constant' or 'constant_with_warmup'"),
        ("lora_r", "sixteen", "valid integer"),
    ],
)
def test_bad_value_names_key_value_and_allowed_range(tmp_path, key, value, allowed):
    path = write_config(tmp_path, **{key: value})
    message = load_error(path)
    assert str(path) in message
    assert f"{key} = {value!r}" in message
    assert allowed in message


def test_missing_required_key_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("datasets:\n  - path: a.jsonl\n", encoding="utf-8")
    assert "missing required key 'model_name_or_path'" in load_error(path)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"bf16": True, "fp16": True}, "bf16 and fp16 are both on; choose one"),
        ({"warmup_ratio": 0.1, "warmup_steps": 10}, "warmup_ratio (0.1) and warmup_steps (10) are both set; keep one"),
        ({"max_steps": 0, "num_train_epochs": 0}, "max_steps and num_train_epochs are both zero"),
        (
            {"eval_dataset": {"path": "e.jsonl"}, "eval_split_ratio": 0.1},
            "eval_dataset and eval_split_ratio are both set",
        ),
    ],
)
def test_contradictions_are_rejected_at_load_time(tmp_path, keys, expected):
    path = write_config(tmp_path, **keys)
    message = load_error(path)
    assert str(path) in message
    assert expected in message


def test_max_steps_alone_is_enough_to_train(tmp_path):
    config = load_config(write_config(tmp_path, max_steps=10, num_train_epochs=0))
    assert (config.max_steps, config.num_train_epochs) == (10, 0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model_name_or_path: [unclosed\n", "not valid YAML"),
        ("- a\n- b\n", "the top level must be a mapping of keys to values, got list"),
    ],
)
def test_unreadable_config_file_is_explained(tmp_path, text, expected):
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    message = load_error(path)
    assert str(path) in message and expected in message


def test_missing_config_file(tmp_path):
    assert load_error(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: config file not found"


def test_parse_cli_overrides_reads_values_as_yaml_scalars():
    args = [
        "--learning_rate",
        "1e-4",
        "--datasets.0.path",
        "x.jsonl",
        "--bf16",
        "--lora-r=8",
        "--lora_target_modules",
        "[q_proj, v_proj]",
        "--num_train_epochs",
        "1.5",
    ]
    assert parse_cli_overrides(args) == {
        "learning_rate": "1e-4",  # YAML 1.1 reads 1e-4 as text; the float field converts it
        "datasets.0.path": "x.jsonl",
        "bf16": True,
        "lora_r": 8,
        "lora_target_modules": ["q_proj", "v_proj"],
        "num_train_epochs": 1.5,
    }


def test_parse_cli_overrides_rejects_a_bare_value():
    with pytest.raises(ConfigError, match="expected --key value, got 'oops'"):
        parse_cli_overrides(["oops"])


def test_cli_overrides_apply_on_top_of_the_file(tmp_path):
    path = write_config(
        tmp_path, learning_rate=3e-4, datasets=[{"path": "a.jsonl"}, {"path": "b.jsonl", "format": "alpaca"}]
    )
    config = load_config(
        path,
        parse_cli_overrides(
            ["--learning_rate", "1e-4", "--datasets.1.path", "x.jsonl", "--eval_dataset.path", "e.jsonl", "--bf16"]
        ),
    )
    assert config.learning_rate == 1e-4
    assert [d.path for d in config.datasets] == ["a.jsonl", "x.jsonl"]
    assert config.datasets[1].format == "alpaca"  # the rest of the entry is kept
    assert config.eval_dataset is not None and config.eval_dataset.path == "e.jsonl"
    assert config.bf16 is True
    assert yaml.safe_load(path.read_text())["learning_rate"] == 3e-4  # the file itself is not touched


def test_cli_override_is_validated_like_the_file(tmp_path):
    path = write_config(tmp_path)
    message = load_error(path, parse_cli_overrides(["--learning_rat", "1e-4"]))
    assert str(path) in message and "did you mean 'learning_rate'?" in message
    message = load_error(path, parse_cli_overrides(["--fp16", "--bf16"]))
    assert "bf16 and fp16 are both on" in message


def test_cli_override_index_out_of_range_names_the_flag(tmp_path):
    message = load_error(write_config(tmp_path), parse_cli_overrides(["--datasets.3.path", "x"]))
    assert "--datasets.3.path" in message and "'3' is not an index" in message


def test_numeric_looking_cli_value_for_a_text_key_is_kept_as_text(tmp_path):
    config = load_config(
        write_config(tmp_path), parse_cli_overrides(["--output_dir", "2024", "--datasets.0.path", "7"])
    )
    assert config.output_dir == "2024"
    assert config.datasets[0].path == "7"


HF_TOKEN = "hf_" + "aB3dE6gH9jK2mN5pQ8sT"
SNAPSHOT = (
    "/root/.cache/huggingface/hub/models--meta-llama--Llama-2-7b-hf/snapshots/"
    + "8cca527612d856d7d32bd94f8103728d614eb852"
)


def test_redacted_hides_tokens_and_keeps_model_paths():
    config = validate_config(
        {
            "model_name_or_path": SNAPSHOT,  # a hub-cache path holds a commit hash, not a secret
            "tokenizer_name_or_path": "meta-llama/Llama-2-7b-hf",  # key contains "token", but is a name
            "datasets": [
                {
                    "path": f"https://user:{HF_TOKEN}@example.com/data.jsonl",
                    "columns": {"api_key": "abc", "hub_token": "xyz", "prompt": "question"},
                }
            ],
            "output_dir": "runs/sft",
            "system_prompt": f"use key sk-{'Z' * 20} here",
            "max_new_tokens": 64,
        }
    )
    clean = redacted(config)
    assert clean["model_name_or_path"] == SNAPSHOT
    assert clean["tokenizer_name_or_path"] == "meta-llama/Llama-2-7b-hf"
    assert clean["datasets"][0]["path"] == "***redacted***"
    assert clean["datasets"][0]["columns"] == {
        "api_key": "***redacted***",
        "hub_token": "***redacted***",
        "prompt": "question",
    }
    assert clean["system_prompt"] == "***redacted***"
    assert clean["output_dir"] == "runs/sft"
    assert clean["max_new_tokens"] == 64
    assert config.datasets[0].path.endswith("data.jsonl")  # the live config keeps the real values


def test_saved_config_holds_no_token(tmp_path):
    config = validate_config({**MINIMAL, "resume_from_checkpoint": f"/ckpt/{HF_TOKEN}"})
    save_config(config, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert HF_TOKEN not in text
    assert yaml.safe_load(text)["model_name_or_path"] == "meta-llama/Llama-2-7b-hf"
