"""The README's promises stay true: its config reference is the schema's, its commands exist."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from sftkit.cli import app
from sftkit.reference import config_reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_config_reference_matches_schema():
    assert config_reference() in README.read_text(encoding="utf-8"), (
        "README config reference is stale: run `python -m sftkit.reference README.md`"
    )


def test_every_cli_command_in_readme_exists():
    runner = CliRunner()
    for command in ("train", "plan", "report", "generate", "merge", "export", "eval", "demo", "data inspect"):
        assert f"sftkit {command}" in README.read_text(encoding="utf-8") or command == "demo"
        result = runner.invoke(app, [*command.split(), "--help"])
        assert result.exit_code == 0, (command, result.output)


def test_examples_are_valid_configs():
    from sftkit.config import load_config

    for path in (README.parent / "examples").glob("*.yaml"):
        load_config(path)
