"""Lazy package attributes (PEP 562): a package says what it exports and from which module, and imports that module
on first use. So a light module (a config class, the unit map) can be imported without NeMo, and ``layerfx``'s
parser can call the config classes' own validation before anything heavy loads.

A public name may be spelled like a submodule (``nemo_layerfx.importance.probe`` the function, ``probe.py`` the
module): as with eager re-exports, the public name wins; ``from nemo_layerfx.importance.probe import X`` still
reads the module."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any, Callable


class _LazyPackage(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # the import system binds a submodule to its parent: for a name the package exports, the export wins
        if (isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.{name}"
                and name in self.__dict__.get("_lazy_exports", ())):
            return
        super().__setattr__(name, value)


def attach(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` for ``package``: ``exports`` maps a public name to the module
    (absolute name) that defines it."""
    module = sys.modules[package]
    module.__class__ = _LazyPackage
    module.__dict__["_lazy_exports"] = dict(exports)

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        module.__dict__[name] = value  # found directly from now on
        return value

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(module.__dict__))

    return __getattr__, __dir__, sorted(exports)
