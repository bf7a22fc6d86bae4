"""The Python API: the README's notebook example runs as written; the API names stay the functions while the
same-named subpackages are imported; overrides and errors behave as on the command line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import sftkit
from sftkit.config import ConfigError
from tests.train_helpers import tiny_config, write_chat_data

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md has no `<!-- api-example -->` python block"
    return match.group(1)


@pytest.mark.slow
def test_readme_example_runs(capsys):
    namespace: dict = {}
    exec(compile(readme_example(), "README.md:api-example", "exec"), namespace)
    result, served = namespace["result"], namespace["served"]
    assert result.status == "finished" and result.last_step == 4 and result.final_dir.is_dir()
    assert (served.path / "config.json").is_file() and (served.path / "chat_template.jinja").is_file()
    scores = namespace["scores"]  # tuned and base scored on the same 8 rows, each metric with its interval
    assert [m.metric for m in scores.metrics] == ["exact", "loss"] and scores.examples == 8
    assert all(m.base is not None and m.interval is not None for m in scores.metrics)
    assert (result.output_dir / "eval" / "summary.json").is_file()
    out = capsys.readouterr().out
    assert "error: tokenizer: its pre-tokenizer (Split + ByteLevel) matches none llama.cpp knows" in out


def test_api_names_are_the_functions_and_subpackages_still_import():
    import sftkit.export
    import sftkit.generate
    import sftkit.plan
    import sftkit.train.loop as loop
    from sftkit import api

    for name in ("train", "plan", "generate", "export", "evaluate", "merge", "report"):
        assert callable(getattr(sftkit, name)) and getattr(sftkit, name).__wrapped__ is getattr(api, name)
    assert loop.train.__module__ == "sftkit.train.loop"
    assert sftkit.export.QUANTS is sys.modules["sftkit.export"].QUANTS  # attributes reach the subpackage
    assert sftkit.inspect_data is api.inspect_data and sftkit.load is api.load


def test_import_sftkit_loads_no_torch():
    code = "import sys, sftkit; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_overrides_and_typed_errors(tmp_path, tiny_model_dir):
    config = tiny_config(tiny_model_dir, write_chat_data(tmp_path / "d.jsonl", rows=4), tmp_path / "run")
    assert sftkit.load(config, max_steps=3, **{"datasets.0.split": "train"}).max_steps == 3
    assert sftkit.load(config).max_steps == config.max_steps  # the given config is not changed
    with pytest.raises(ConfigError, match="learning_rat") as caught:
        sftkit.load(config, learning_rat=1.0)
    assert isinstance(caught.value, sftkit.SftkitError)
    with pytest.raises(ConfigError, match="config file not found"):
        sftkit.train(tmp_path / "missing.yaml")
