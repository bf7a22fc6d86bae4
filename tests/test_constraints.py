"""constraints/min.txt, what `make test-min` installs, is exactly the lower bounds of pyproject.toml's
dependencies, and constraints/lock.txt pins a version inside every range: neither can drift from the ranges."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]


def dependencies() -> list[Requirement]:
    with open(ROOT / "pyproject.toml", "rb") as file:
        return [Requirement(line) for line in tomllib.load(file)["project"]["dependencies"]]


def pinned(name: str) -> dict[str, Version]:
    """{canonical name: version} of a constraints file's `name==version` lines."""
    lines = (ROOT / "constraints" / name).read_text().splitlines()
    pins = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(pin.name): Version(next(iter(pin.specifier)).version) for pin in pins}


def test_min_constraints_are_the_lower_bounds():
    lower = {}
    for requirement in dependencies():
        bounds = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        assert len(bounds) == 1, f"{requirement}: give one lower bound (>=), the oldest version the tests pass on"
        assert any(spec.operator == "<" for spec in requirement.specifier), f"{requirement}: give an upper bound"
        lower[canonicalize_name(requirement.name)] = Version(bounds[0])
    assert pinned("min.txt") == lower


def test_lock_pins_every_dependency_inside_its_range():
    lock = pinned("lock.txt")
    for requirement in dependencies():
        version = lock.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name} is not in constraints/lock.txt"
        assert requirement.specifier.contains(version), f"lock {requirement.name}=={version} outside {requirement}"
