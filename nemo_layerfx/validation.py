"""The error a config class raises for one bad field: a ``ValueError`` that also says which field, so ``layerfx``
can name the flag that set it (the config's own check, one source of truth, worded for the command line)."""

from __future__ import annotations


class FieldError(ValueError):
    """A bad value of config field ``field``."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
