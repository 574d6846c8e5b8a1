"""Old import paths that keep working for one release after the modules moved into subpackages.

Each old path (``attnprobe.sinks``, ``prune.wanda``, ...) is registered in ``sys.modules`` as a thin
module that forwards every attribute to the module's new home and warns with a
:class:`DeprecationWarning` naming the new path. The new module is imported only when an attribute is
first asked for, so the aliases cost nothing at import time.

Registering the alias up front (rather than a finder that loads it on demand) matters where an old
module shares its name with a public function (``attnprobe.record``, ``prune.apply``): a fresh import
would rebind the package attribute to the module and hide the function.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings
from collections.abc import Mapping

__all__ = ["MovedModule", "alias_moved_modules"]

_MISSING = object()


class MovedModule(types.ModuleType):
    """A module object standing at an old import path; attributes come from ``new`` with a warning."""

    def __init__(self, old: str, new: str) -> None:
        super().__init__(old, f"Moved to {new}; this alias goes in the next release.")
        self.__dict__["_new_path"] = new
        # ``python -m <old path>`` asks for the module's spec: give the new module's (see __getattr__).
        del self.__dict__["__spec__"]

    def __getattr__(self, name: str):
        if name == "__spec__":  # the new file under the old name, which runpy's loader check wants
            origin = importlib.util.find_spec(self.__dict__["_new_path"]).origin
            return importlib.util.spec_from_file_location(self.__name__, origin)
        if name.startswith("__") and name != "__all__":
            raise AttributeError(name)
        new = self.__dict__["_new_path"]
        value = getattr(importlib.import_module(new), name)  # tools probing for names they lack: no warning
        warnings.warn(
            f"{self.__name__} moved to {new}: import from {new} instead "
            "(the old path is removed in the next release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return value

    def __setattr__(self, name: str, value) -> None:
        # Patching the old path (a test's monkeypatch, a user's override) reaches the real module; the
        # value it replaced is kept so that deleting the patch restores it.
        target = importlib.import_module(self.__dict__["_new_path"])
        self.__dict__.setdefault("_replaced", {}).setdefault(name, getattr(target, name, _MISSING))
        setattr(target, name, value)

    def __delattr__(self, name: str) -> None:
        target = importlib.import_module(self.__dict__["_new_path"])
        replaced = self.__dict__.get("_replaced", {})
        if name not in replaced:
            delattr(target, name)
        elif (old := replaced.pop(name)) is _MISSING:
            delattr(target, name)
        else:
            setattr(target, name, old)

    def __dir__(self) -> list[str]:
        return dir(importlib.import_module(self.__dict__["_new_path"]))


def alias_moved_modules(package: types.ModuleType, moves: Mapping[str, str]) -> None:
    """Register ``package.<old>`` → ``<new>`` aliases for every entry of ``moves`` (old leaf → new path).

    A package attribute that already exists (a public function of the same name) is left as it is.
    """
    for leaf, new in moves.items():
        old = f"{package.__name__}.{leaf}"
        alias = sys.modules.setdefault(old, MovedModule(old, new))
        if not hasattr(package, leaf):
            setattr(package, leaf, alias)
