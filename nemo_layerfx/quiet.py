"""One place that keeps other libraries' info chatter off the console (NeMo, Lightning, Flower).

Our commands and training entry point print only lines that mean something (progress, results, errors); the
info logs stay available: ``-v`` / ``layerfx.verbose=true`` / ``LAYERFX_VERBOSE=1`` show them, and training also
writes NeMo's to the experiment folder (``nemo_layerfx.train.log_to_file``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os

# Lightning's packages set their loggers to INFO when imported, and the standalone pytorch_lightning (which other
# packages import) takes over Lightning's rank-zero messages: they are imported first, so that our levels stay.
LIGHTNING = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


def quiet_telemetry() -> None:
    """NeMo 3.0 imports NVIDIA's OneLogger telemetry, which warns on every import that it is disabled and collects
    nothing ("OneLogger: Setting error_handling_strategy…", "No exporters were provided…"): noise, not
    information. Set once, when the package is imported."""
    logging.getLogger("nv_one_logger").setLevel(logging.ERROR)


def quiet_console(verbose: bool = False, child_processes: bool = False) -> None:
    """Warnings and errors only on the console from NeMo (its stream handlers: a file handler keeps its level),
    Lightning and Flower. ``child_processes``: also for the processes this one starts (Flower's simulation actors
    read ``LAYERFX_QUIET_LOGS`` and call this too)."""
    if verbose or os.environ.get("LAYERFX_VERBOSE"):
        return
    if child_processes:
        os.environ["LAYERFX_QUIET_LOGS"] = "1"
    os.environ.setdefault("FLWR_LOG_LEVEL", "WARNING")  # Flower's console level, read when flwr is imported
    for handler in logging.getLogger("flwr").handlers:  # and if it already was
        handler.setLevel(logging.WARNING)
    for name in LIGHTNING:
        if importlib.util.find_spec(name.split(".")[0]) is not None:
            importlib.import_module(name)
    for name in ("lightning", *LIGHTNING):
        logging.getLogger(name).setLevel(logging.WARNING)
    from nemo.utils import logging as nemo_logging

    for name in ("stream_stdout", "stream_stderr"):
        handler = nemo_logging._handlers.get(name)
        if handler is not None:
            handler.setLevel(logging.WARNING)


class _DropMessages:
    def __init__(self, fragments: tuple[str, ...]):
        self.fragments = fragments

    def filter(self, record) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


@contextlib.contextmanager
def without_nemo_warnings(*fragments: str):
    """Drop NeMo log records containing any of ``fragments`` inside the block (all other records pass)."""
    logger, drop = logging.getLogger("nemo_logger"), _DropMessages(fragments)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
