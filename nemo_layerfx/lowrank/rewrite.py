"""Factorize a Conformer encoder's linears (from scratch or from trained weights) and merge them back.

Three entry points, PEFT-style (a config, a pass that rewrites named target modules, and a way back):

- the encoder option ``low_rank`` (registered by ``nemo_layerfx.lowrank``): a config trains LR-SMS from scratch;
- ``lowrank(model, config)``: a trained dense model -> a new model factorized by truncated SVD;
- ``merge(model)``: a low-rank model -> a new dense model with the same outputs (loadable the usual way).

Composes with: the importance probe (re-init from the snapshot; re-rand draws a fresh spectral init) and
parameter-shared layers (each shared set is factorized once). Refused, with a clear error: federated-dropout
``extract`` and pruning (they slice dense weights: merge first). A model with NeMo's stock ``ConformerEncoder`` is
adopted first (``nemo_layerfx.models.adopt_``: our encoder class, its own conv norm and every tensor kept), so its
config can carry ``low_rank``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from omegaconf import open_dict
from torch import nn

from nemo_layerfx.encoder import ENCODER_TARGET, layer_sets
from nemo_layerfx.options import EncoderOption
from nemo_layerfx.lowrank.config import GROUPS, LowRankConfig
from nemo_layerfx.lowrank.linear import LowRankLinear
from nemo_layerfx.models import (
    adopt_, check_output, clone_model, conformer_encoder, count_params, restore, save_nemo,
)
from nemo_layerfx.units import find_module, linears


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def factorize_(encoder: nn.Module, config: LowRankConfig, init: str | None = None,
               notes: list[str] | None = None) -> dict[str, int]:
    """In place: replace the targeted linears of every distinct layer with ``LowRankLinear`` (truncated SVD of the
    current weight, or Kaiming factors with ``init="kaiming"``); returns ``{"layers.b.<path>": rank}``.

    Block b of B counts distinct layer modules, so a parameter-shared encoder factorizes each shared set once.
    """
    init = init or config.init
    kinds = set(config.kinds())
    sets = layer_sets(encoder)
    ranks: dict[str, int] = {}
    skipped: list[str] = []
    for b, layer in enumerate(sets):
        for group in GROUPS:
            for path in linears(group):
                if path.rsplit(".", 1)[1] not in kinds:
                    continue
                module = find_module(layer, path)
                if module is None:  # e.g. linear_pos exists only with rel_pos attention
                    continue
                if isinstance(module, LowRankLinear):
                    raise ValueError(f"layers.{b}.{path} is already factorized (rank {module.rank}); merge the model "
                                     f"first (`layerfx merge`) to factorize it again")
                if not isinstance(module, (nn.Linear, nn.Conv1d)):
                    raise ValueError(f"layers.{b}.{path} is a {type(module).__name__}; only nn.Linear and kernel-1 "
                                     f"nn.Conv1d can be factorized: undo the wrapper first (adaptive-dropout gates: "
                                     f"`layerfx prune`, or nemo_layerfx.pruning.remove_gates)")
                m, n = module.weight.shape[0], module.weight[0].numel()
                r = config.rank(group, b, len(sets), m, n)
                if config.only_if_smaller and r * (m + n) >= m * n:
                    skipped.append(f"layers.{b}.{path} ({m}x{n}: rank {r} would hold {r * (m + n):,} parameters, "
                                   f"the dense weight {m * n:,})")
                    continue
                _replace(layer, path, LowRankLinear.from_dense(module, r, init=init))
                ranks[f"layers.{b}.{path}"] = r
    if not ranks and not skipped:
        raise ValueError(f"low_rank matched no linear in the encoder (targets {sorted(kinds)})")
    if skipped and notes is not None:
        notes.append(f"left dense, a factorization would save nothing: {skipped[0]}"
                     + (f", and {len(skipped) - 1} more" if len(skipped) > 1 else ""))
    return ranks


def apply_option(encoder: nn.Module, value: Any) -> None:
    """The ``low_rank`` encoder option: factorize the freshly built layers (spectral init from their own init)."""
    encoder.low_rank_ranks = factorize_(encoder, LowRankConfig.from_any(value))


OPTION = EncoderOption("low_rank", apply_option, order=20)  # the entry point nemo_layerfx.encoder_options


def low_rank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    """Every factorized linear of the model's encoder, by its path inside the encoder (shared ones once)."""
    enc = conformer_encoder(model)
    return {name: m for name, m in enc.named_modules() if isinstance(m, LowRankLinear)}


@dataclass
class RankReport:
    """Parameter counts before and after a ``lowrank`` or ``merge``, for printing and tests."""

    before: dict[str, int]
    after: dict[str, int]
    ranks: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        for part in ("encoder", "model"):
            b, a = self.before[part], self.after[part]
            out.append(f"{part} parameters: {b:,} -> {a:,} ({a / b:.3f}x)")
        if self.ranks:
            by_block: dict[str, list[str]] = {}
            for path, r in self.ranks.items():
                block, _, rest = path.partition(".")[2].partition(".")
                by_block.setdefault(block, []).append(f"{rest.rsplit('.', 1)[1]}={r}")
            out.append("ranks per block: " + "; ".join(f"{b}: {' '.join(v)}" for b, v in by_block.items()))
        return out + [f"note: {n}" for n in self.notes]


def _counts(model: nn.Module) -> dict[str, int]:
    return {"encoder": count_params(conformer_encoder(model)), "model": count_params(model)}


def lowrank(model: nn.Module, config: LowRankConfig | dict) -> tuple[nn.Module, RankReport]:
    """A new model whose targeted encoder linears are the truncated SVD of ``model``'s (``model`` is unchanged).

    The new model's ``cfg.encoder.low_rank`` records the config, so ``save_to`` / ``restore_from`` rebuild it.

    Example::

        small, report = lowrank(model, LowRankConfig(att=[0.1, 0.2], ffn=[0.2, 0.5]))
        print("\\n".join(report.lines()))
    """
    config = replace(LowRankConfig.from_any(config), only_if_smaller=True)
    enc = conformer_encoder(model)
    if any(isinstance(m, LowRankLinear) for m in enc.modules()):
        raise ValueError("the model already has factorized (low-rank) linears; `layerfx merge` it first")
    before = _counts(model)
    new = clone_model(model)
    notes: list[str] = []
    if adopt_(new):  # NeMo's stock encoder: ours, same norm and tensors, so that the config can carry low_rank
        notes.append(f"the encoder is now {ENCODER_TARGET} with the model's own conv norm "
                     f"({new.cfg.encoder.get('conv_norm_type')}); every tensor kept")
    ranks = factorize_(conformer_encoder(new), config, init="svd", notes=notes)
    with open_dict(new._cfg):
        new._cfg.encoder.low_rank = {**config.to_dict(), "init": "svd"}
    return new, RankReport(before, _counts(new), ranks, notes)


def merge(model: nn.Module) -> tuple[nn.Module, RankReport]:
    """A new dense model computing what the low-rank ``model`` computes (weights U Vᵀ); ``model`` is unchanged."""
    if not low_rank_modules(model):
        raise ValueError("nothing to merge: the model has no factorized (low-rank) linears")
    before = _counts(model)
    new = clone_model(model)
    enc = conformer_encoder(new)
    for name, module in list(low_rank_modules(new).items()):
        _replace(enc, name, module.merge())
    with open_dict(new._cfg):
        new._cfg.encoder.pop("low_rank", None)
    if hasattr(enc, "low_rank_ranks"):
        del enc.low_rank_ranks
    return new, RankReport(before, _counts(new))


def lowrank_file(src: str | os.PathLike, dst: str | os.PathLike, config: LowRankConfig | dict) -> RankReport:
    """``lowrank`` from one ``.nemo`` to another (written atomically; ``src`` is never modified)."""
    config = LowRankConfig.from_any(config)  # bad specs fail before the model is loaded
    check_output(src, dst)
    new, report = lowrank(restore(src), config)
    save_nemo(new, dst)
    return report


def merge_file(src: str | os.PathLike, dst: str | os.PathLike) -> RankReport:
    """``merge`` from one ``.nemo`` to another (written atomically; ``src`` is never modified)."""
    check_output(src, dst)
    new, report = merge(restore(src))
    save_nemo(new, dst)
    return report


__all__ = ["apply_option", "factorize_", "low_rank_modules", "lowrank", "lowrank_file", "merge",
           "merge_file", "RankReport"]
