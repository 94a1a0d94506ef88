"""Make NeMo accept ``nemo_layerfx.*`` targets.

NeMo 3.0 refuses any ``_target_`` outside ``nemo.core.classes.common.ALLOWED_TARGET_PREFIXES`` (CVE-2025-23304
hardening), also when restoring a ``.nemo`` whose config names our classes. ``import nemo_layerfx`` adds our
prefix: at once when NeMo is already imported, otherwise right after NeMo's module loads (an import hook), so
importing a light part of the package does not import NeMo. ``register()`` does it at once; calling it again is
harmless.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Callable

from nemo_layerfx.quiet import quiet_telemetry

PREFIX = "nemo_layerfx."
NEMO_COMMON = "nemo.core.classes.common"
quiet_telemetry()


def _allow(common: ModuleType) -> None:
    if PREFIX not in common.ALLOWED_TARGET_PREFIXES:
        common.ALLOWED_TARGET_PREFIXES.append(PREFIX)


def register() -> None:
    """Append our prefix to NeMo's target allow-list and register the encoder's adapter class (idempotent)."""
    from nemo.core.classes import common

    _allow(common)
    from nemo_layerfx.encoder import register_adapter

    register_adapter()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback(module)`` once ``name`` has been executed (the first import of it), then steps aside."""

    def __init__(self, name: str, callback: Callable[[ModuleType], None]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # the spec comes from the other finders
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            self.callback(module)

        spec.loader.exec_module = exec_module
        return spec


def register_on_nemo_import() -> None:
    """Allow our targets now if NeMo's allow-list is loaded, else as soon as it is (once per process)."""
    if NEMO_COMMON in sys.modules:
        _allow(sys.modules[NEMO_COMMON])
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(NEMO_COMMON, _allow))


def is_registered() -> bool:
    from nemo.core.classes import common

    return PREFIX in common.ALLOWED_TARGET_PREFIXES
