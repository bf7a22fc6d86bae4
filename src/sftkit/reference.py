"""The README's config reference, generated from the schema so the two cannot drift.

`python -m sftkit.reference README.md` rewrites the block between the markers; a test fails when
the README is out of date.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from sftkit.config import DatasetSpec, SFTConfig

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    return f"`{value!r}`" if value not in (None, "") else "unset"


def _table(model: type[BaseModel]) -> list[str]:
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for name, field in model.model_fields.items():
        rows.append(f"| `{name}` | {_default(field)} | {(field.description or '').replace('|', '/')} |")
    return rows


def config_reference() -> str:
    lines = [
        BEGIN,
        "",
        *_table(SFTConfig),
        "",
        "Each entry of `datasets` (and `eval_dataset`):",
        "",
        *_table(DatasetSpec),
        "",
        END,
    ]
    return "\n".join(lines)


def update_readme(path: Path) -> bool:
    """Rewrite the reference block; True when the file changed."""
    text = path.read_text(encoding="utf-8")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    updated = text[:start] + config_reference() + text[end:]
    if updated != text:
        path.write_text(updated, encoding="utf-8")
    return updated != text


if __name__ == "__main__":  # pragma: no cover
    changed = update_readme(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
    print("README.md updated" if changed else "README.md already up to date")
