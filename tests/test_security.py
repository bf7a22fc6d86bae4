"""What a user relies on to run sftkit safely: no model code runs unless asked, no pickle is loaded,
weights are written as safetensors, and no token or key reaches a run directory or the logs."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import sftkit
import sftkit.model.load as load
import sftkit.train.loop as loop
import sftkit.train.run_model as run_model
from sftkit.config import SFTConfig
from tests.train_helpers import tiny_config, write_chat_data

PACKAGE = Path(sftkit.__file__).parent
RUNNER = Path(__file__).with_name("run_train.py")

# Fake secrets of the shapes real ones have; none of them is valid anywhere.
SECRETS = {
    "HF_TOKEN": "hf_" + "Zq8fakeTokenNotReal0123456789abcd",
    "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567",
    "system_prompt": "sk-" + "proj-FAKEkey0000notARealOpenAIkey42",
    "dataset name": "hf_" + "AnotherFakeToken9876543210zyxw",
}


# --------------------------------------------------------------------------- remote code


def test_trust_remote_code_is_off_unless_asked(tmp_path):
    assert SFTConfig.model_fields["trust_remote_code"].default is False
    assert tiny_config(tmp_path, tmp_path / "d.jsonl", tmp_path / "out").trust_remote_code is False


@pytest.mark.parametrize("trust", [False, True])
def test_training_passes_trust_remote_code_to_every_load(trust, tmp_path, tiny_model_dir, monkeypatch):
    seen: list[tuple[str, object]] = []

    class Recording:
        def __init__(self, real):
            self.real = real

        def from_pretrained(self, *args, **kwargs):
            seen.append((self.real.__name__, kwargs.get("trust_remote_code", "not passed")))
            return self.real.from_pretrained(*args, **kwargs)

    for name in ("AutoTokenizer", "AutoConfig", "AutoModelForCausalLM"):
        monkeypatch.setattr(load, name, Recording(getattr(load, name)))

    class Loaded(Exception):
        pass

    def stop(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(run_model, "apply_adapters", stop)  # everything is loaded by then
    data = write_chat_data(tmp_path / "chat.jsonl", rows=8)
    with pytest.raises(Loaded):
        loop.train(tiny_config(tiny_model_dir, data, tmp_path / "run", trust_remote_code=trust))
    assert {name for name, _ in seen} == {"AutoTokenizer", "AutoConfig", "AutoModelForCausalLM"}
    assert all(value is trust for _, value in seen), seen


def package_calls(attribute: str) -> list[tuple[Path, ast.Call]]:
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attribute:
                calls.append((path, node))
    return calls


def test_no_source_turns_remote_code_on():
    for path, call in package_calls("from_pretrained"):
        for keyword in call.keywords:
            if keyword.arg == "trust_remote_code":
                assert not (isinstance(keyword.value, ast.Constant) and keyword.value.value is True), (
                    f"{path}:{call.lineno}: trust_remote_code=True"
                )


# --------------------------------------------------------------------------- pickle


def test_every_torch_load_in_the_package_is_weights_only():
    loads = [
        (path, call)
        for path, call in package_calls("load")
        if isinstance(call.func.value, ast.Name) and call.func.value.id == "torch"
    ]
    assert loads, "expected at least the optimizer's torch.load"
    for path, call in loads:
        weights_only = {k.arg: k.value for k in call.keywords}.get("weights_only")
        assert isinstance(weights_only, ast.Constant) and weights_only.value is True, (
            f"{path.relative_to(PACKAGE.parent)}:{call.lineno}: torch.load without weights_only=True"
        )
    text = "\n".join(p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py"))
    assert not re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M)


# --------------------------------------------------------------------------- a real run, scanned


@pytest.fixture(scope="module")
def run_with_secrets(tmp_path_factory, tiny_model_dir) -> tuple[Path, subprocess.CompletedProcess]:
    """`sftkit train` in a child process with tokens in its environment and a key in its config."""
    folder = tmp_path_factory.mktemp("secrets")
    data = write_chat_data(folder / "chat.jsonl", rows=24)
    config = tiny_config(
        tiny_model_dir,
        data,
        folder / "run",
        max_steps=2,
        save_steps=1,
        report_to="tensorboard",
        eval_split_ratio=0.25,
        sample_steps=1,
        max_new_tokens=4,
        system_prompt=f"You are the support bot. Internal key: {SECRETS['system_prompt']}",
    )
    raw = config.model_dump(mode="json")
    raw["datasets"][0]["name"] = SECRETS["dataset name"]  # unused for a local file, yet part of the config
    config_path = folder / "run.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "HF_TOKEN": SECRETS["HF_TOKEN"], "WANDB_API_KEY": SECRETS["WANDB_API_KEY"]}
    finished = subprocess.run(
        [sys.executable, str(RUNNER), str(config_path)], capture_output=True, text=True, env=env, timeout=600
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    return folder / "run", finished


@pytest.mark.slow
def test_no_secret_reaches_the_run_directory_or_the_logs(run_with_secrets):
    output_dir, finished = run_with_secrets
    files = [p for p in output_dir.rglob("*") if p.is_file()]
    kinds = {p.parent.name if p.parent != output_dir else p.name for p in files}
    assert {
        "config.yaml",
        "run.json",
        "metrics.jsonl",
        "samples.jsonl",
        "tensorboard",
        "adapter",
        "checkpoint-1",
        "checkpoint-2",
    } <= kinds, kinds  # the scan covers every kind of file a run writes
    leaks = [
        f"{where} in {path.relative_to(output_dir)}"
        for path in files
        for where, secret in SECRETS.items()
        if secret.encode() in path.read_bytes()
    ]
    leaks += [
        f"{where} in {stream}"
        for stream in ("stdout", "stderr")
        for where, secret in SECRETS.items()
        if secret in getattr(finished, stream)
    ]
    assert not leaks, leaks
    # the redacted config still says where a value was
    assert yaml.safe_load((output_dir / "config.yaml").read_text())["system_prompt"] == "***redacted***"


@pytest.mark.slow
def test_weights_are_safetensors_and_optimizer_state_loads_without_pickle(run_with_secrets):
    output_dir, _ = run_with_secrets
    pickled = [p for p in output_dir.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")]
    assert pickled and all(p.name == "optimizer.pt" and p.parent.name.startswith("checkpoint-") for p in pickled), (
        pickled
    )
    for path in pickled:
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert set(state) == {"state", "param_groups"}
    assert (output_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert all((c / "adapter_model.safetensors").is_file() for c in output_dir.glob("checkpoint-*"))
