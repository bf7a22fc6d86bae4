"""sftkit: supervised fine-tuning of causal language models, correct by construction.

The Python API (see `sftkit.api`), loaded on first use so that `import sftkit` stays fast:

    sftkit.train(config_or_path, **overrides) -> RunResult
    sftkit.plan(...)  sftkit.inspect_data(...)  sftkit.generate(...)  sftkit.export(...)
    sftkit.merge(...)  sftkit.report(...)  sftkit.evaluate(...)  sftkit.load(...) -> SFTConfig
    sftkit.SftkitError: the base of the errors a user can fix

`train`, `plan`, `generate`, `export` and `evaluate` are also the names of subpackages. Python binds a subpackage
to its parent's attribute when it is first imported, which would replace the function; so on this
package those names always give the API function, and the function object passes any other attribute
on to the subpackage (`import sftkit.train.loop as loop` still works).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import types
from typing import TYPE_CHECKING, Any

from sftkit.errors import SftkitError

__version__ = "0.1.0"

if TYPE_CHECKING:
    from sftkit.api import (
        USER_ERRORS,
        DataInspection,
        evaluate,
        export,
        generate,
        inspect_data,
        load,
        merge,
        plan,
        report,
        train,
    )

API = ("train", "plan", "inspect_data", "generate", "export", "evaluate", "merge", "report", "load")
LAZY = {*API, "USER_ERRORS", "DataInspection"}
__all__ = [
    "USER_ERRORS",
    "DataInspection",
    "SftkitError",
    "evaluate",
    "export",
    "generate",
    "inspect_data",
    "load",
    "merge",
    "plan",
    "report",
    "train",
]


class _ApiFunction:
    """An API function that also answers for the same-named subpackage's attributes."""

    def __init__(self, name: str) -> None:
        function = getattr(importlib.import_module("sftkit.api"), name)
        object.__setattr__(self, "_function", function)
        object.__setattr__(self, "_module_name", f"sftkit.{name}")
        for attribute in ("__doc__", "__name__", "__qualname__", "__wrapped__"):
            object.__setattr__(self, attribute, getattr(function, attribute, function))
        object.__setattr__(self, "__signature__", inspect.signature(function))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function(*args, **kwargs)

    def _module(self) -> types.ModuleType:
        return importlib.import_module(self._module_name)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._module(), attribute)

    def __setattr__(self, attribute: str, value: Any) -> None:  # monkeypatching reaches the module
        setattr(self._module(), attribute, value)

    def __delattr__(self, attribute: str) -> None:
        delattr(self._module(), attribute)

    def __repr__(self) -> str:
        return f"<sftkit API function {self.__name__}>"


class _Package(types.ModuleType):
    """This package, keeping the API functions bound when a same-named subpackage gets imported."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in API and isinstance(value, types.ModuleType):
            return  # the import system binding `sftkit.train` etc.: the module stays in sys.modules
        super().__setattr__(name, value)


def __getattr__(name: str) -> Any:
    if name not in LAZY:
        raise AttributeError(f"module 'sftkit' has no attribute {name!r}")
    if name in API and importlib.util.find_spec(f"sftkit.{name}") is not None:
        value: Any = _ApiFunction(name)
    else:
        value = getattr(importlib.import_module("sftkit.api"), name)
    types.ModuleType.__setattr__(sys.modules[__name__], name, value)
    return value


sys.modules[__name__].__class__ = _Package
