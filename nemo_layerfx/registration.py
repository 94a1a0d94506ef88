"""Make NeMo accept ``nemo_layerfx.*`` targets.

NeMo 3.0 refuses any ``_target_`` outside ``nemo.core.classes.common.ALLOWED_TARGET_PREFIXES`` (CVE-2025-23304
hardening), also when restoring a ``.nemo`` whose config names our classes. ``import nemo_layerfx`` calls
``register()`` once; calling it again is harmless.
"""

from __future__ import annotations

import logging

PREFIX = "nemo_layerfx."
# NeMo 3.0 imports NVIDIA's OneLogger telemetry, which warns on every import that it is disabled and collects
# nothing ("OneLogger: Setting error_handling_strategy…", "No exporters were provided…"): noise, not information.
logging.getLogger("nv_one_logger").setLevel(logging.ERROR)


def register() -> None:
    """Append our prefix to NeMo's target allow-list and register the encoder's adapter class (idempotent)."""
    from nemo.core.classes import common

    if PREFIX not in common.ALLOWED_TARGET_PREFIXES:
        common.ALLOWED_TARGET_PREFIXES.append(PREFIX)

    from nemo.core.classes.mixins import adapter_mixins

    from nemo_layerfx.encoder import GroupNormConformerEncoder, GroupNormConformerEncoderAdapter

    if adapter_mixins.get_registered_adapter(GroupNormConformerEncoder) is None:
        adapter_mixins.register_adapter(
            base_class=GroupNormConformerEncoder, adapter_class=GroupNormConformerEncoderAdapter
        )


def is_registered() -> bool:
    from nemo.core.classes import common

    return PREFIX in common.ALLOWED_TARGET_PREFIXES
