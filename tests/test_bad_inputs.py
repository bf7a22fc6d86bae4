"""The bad-input corpus: every mistake a user can make in their own files gives a clear error.

Each folder of tests/bad_inputs/ is one case, run through the real user path,
`sftkit data inspect config.yaml`, from inside a copy of the folder:

    config.yaml     the run config; `$TOKENIZER` is replaced by the tiny test tokenizer's folder
    data.*          the (bad) data file(s) the config points at, and any other input (.jinja, model folder)
    args.txt        optional: extra command-line arguments (`--key value` overrides)
    expected.txt    one substring per line that the printed error must contain: the file, the row,
                    line or key, and the fix
    expected.json   instead of expected.txt for a case that must succeed: a subset of `--json` output

A failing case means a user gets a traceback or an error that does not say where and what to do.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sftkit.cli import app

CASES = Path(__file__).parent / "bad_inputs"
ERROR_CASES = sorted(p for p in CASES.iterdir() if (p / "expected.txt").is_file())
OK_CASES = sorted(p for p in CASES.iterdir() if (p / "expected.json").is_file())


def _run_case(case: Path, tmp_path: Path, tokenizer_dir: Path, monkeypatch, *extra: str):
    work = shutil.copytree(case, tmp_path / case.name)
    config = work / "config.yaml"
    config.write_text(config.read_text(encoding="utf-8").replace("$TOKENIZER", str(tokenizer_dir)), encoding="utf-8")
    args_file = work / "args.txt"
    args = args_file.read_text(encoding="utf-8").split() if args_file.is_file() else []
    monkeypatch.chdir(work)  # data paths in the configs are relative, as a user writes them
    return CliRunner().invoke(app, ["data", "inspect", "config.yaml", *extra, *args])


def test_corpus_is_large_enough():
    assert len(ERROR_CASES) >= 28
    assert OK_CASES


@pytest.mark.parametrize("case", ERROR_CASES, ids=[p.name for p in ERROR_CASES])
def test_bad_input_gives_a_clear_error(case, tmp_path, tiny_tokenizer_dir, monkeypatch):
    result = _run_case(case, tmp_path, tiny_tokenizer_dir, monkeypatch)
    output = result.output
    assert result.exit_code == 2, (
        f"expected a user error (exit 2), got {result.exit_code}: {result.exception!r}\n{output}"
    )
    assert "Traceback" not in output
    assert "error:" in output
    missing = [s for s in (case / "expected.txt").read_text(encoding="utf-8").splitlines() if s and s not in output]
    assert not missing, f"the error does not mention {missing}:\n{output}"


@pytest.mark.parametrize("case", OK_CASES, ids=[p.name for p in OK_CASES])
def test_skipped_rows_are_counted_by_reason(case, tmp_path, tiny_tokenizer_dir, monkeypatch):
    result = _run_case(case, tmp_path, tiny_tokenizer_dir, monkeypatch, "--json")
    assert result.exit_code == 0, f"{result.exception!r}\n{result.output}"
    stats = json.loads(result.stdout[result.stdout.index("{") :])
    expected = json.loads((case / "expected.json").read_text(encoding="utf-8"))
    assert {key: stats[key] for key in expected} == expected


def test_training_path_asks_for_trust_remote_code_too():
    """`sftkit train` loads the model itself: its custom code (config.json auto_map) is refused the same way."""
    import torch

    from sftkit.model.load import ModelError, load_model

    with pytest.raises(ModelError, match=r"ships its own code.*`trust_remote_code: true`"):
        load_model(str(CASES / "trust_remote_code_needed" / "custom_model"), torch.float32)
