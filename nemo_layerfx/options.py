"""Encoder options: config keys of ``GroupNormConformerEncoder`` that capability subpackages add (``low_rank``,
``depth_sampling``, ``adaptive_dropout``). Plain Python, importable without NeMo.

The package's ``__init__`` declares where each shipped option lives (``declare_encoder_option``), and the encoder
imports it when a config first names the key; so the core never imports a capability, importing a light module
does not import them all, and a config or ``.nemo`` naming an option rebuilds the same modules. Another package
can add its own option the same way, or register one directly (``register_encoder_option``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class EncoderOption:
    """An encoder config key: ``apply(encoder, value)`` runs after the layers are built, in ``order``; a ``None``
    value is not applied. ``training_only``: it changes how the model trains, not its parameters or what inference
    computes (stock NeMo can drop it)."""

    name: str
    apply: Callable[[Any, Any], None]
    order: int = 0
    training_only: bool = False


ENCODER_OPTIONS: dict[str, EncoderOption] = {}
DECLARED: dict[str, str] = {}  # option name -> "module:attribute" of its EncoderOption, imported on first use


def register_encoder_option(name: str, apply: Callable[[Any, Any], None], order: int = 0,
                            training_only: bool = False) -> None:
    """Make ``name`` a key of GroupNormConformerEncoder's config (idempotent for the same function)."""
    ENCODER_OPTIONS[name] = EncoderOption(name, apply, order, training_only)


def declare_encoder_option(name: str, where: str) -> None:
    """Say where option ``name``'s ``EncoderOption`` lives (``"package.module:ATTRIBUTE"``), to import it only when
    a config names the key."""
    DECLARED[name] = where


def encoder_option(name: str) -> EncoderOption | None:
    """The option ``name`` (registered, or declared and imported now), or None for any other key."""
    if name not in ENCODER_OPTIONS and name in DECLARED:
        module, _, attr = DECLARED[name].partition(":")
        ENCODER_OPTIONS[name] = getattr(importlib.import_module(module), attr)
    return ENCODER_OPTIONS.get(name)
