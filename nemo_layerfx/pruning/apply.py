"""Put adaptive-dropout gates into a Conformer encoder, read their decisions, and take them out again.

Each gated layer gets a ``adaptive_dropout`` ModuleDict (the gates: ffn1, ffn2, qk, v, conv) and its gated
modules are wrapped (``GatedInput`` / ``GatedOutput``); the encoder gets the shared ``adaptive_dropout_schedule``.
"""

from __future__ import annotations

import torch
from omegaconf import open_dict
from torch import nn

from nemo_layerfx.encoder import EncoderExtension, layer_sets
from nemo_layerfx.options import EncoderOption
from nemo_layerfx.models import adopt_, clone_model, conformer_encoder
from nemo_layerfx.pruning.config import AdaptiveDropoutConfig
from nemo_layerfx.pruning.gates import GatedInput, GatedOutput, GateSchedule, RetentionGate
from nemo_layerfx.surgery import Units
from nemo_layerfx.units import (
    PRUNE_KINDS, UnitKind, check_sliceable, find_module, n_units, resolve, unit_kind, unit_width,
)

def _wrap(layer: nn.Module, path: str, wrapper) -> None:
    parent, _, name = path.rpartition(".")
    owner = layer.get_submodule(parent)
    setattr(owner, name, wrapper(getattr(owner, name)))


def add_gates_(encoder: nn.Module, config: AdaptiveDropoutConfig) -> None:
    """In place: gate every layer's units at ``config.locations``; β′ = 0, so every gate starts at c₀ (no dropout)."""
    if getattr(encoder, "adaptive_dropout_schedule", None) is not None:
        raise ValueError("the encoder already has adaptive_dropout gates")
    # unshared, dense layers (not factorized: merge a low-rank model first), and a GroupNorm conv module where conv
    # groups are gated: what prune can slice
    check_sliceable(encoder, conv_units="conv" in config.locations)
    schedule = GateSchedule(config)
    encoder.adaptive_dropout_schedule = schedule
    encoder.add_extension("adaptive_dropout", GateDraws())
    kinds = [k for location in config.locations for k in resolve(location)]
    for layer in layer_sets(encoder):
        layer.adaptive_dropout = nn.ModuleDict(
            {k: RetentionGate(n_units(layer, k), unit_width(layer, k), schedule) for k in kinds})
        for k, gate in layer.adaptive_dropout.items():
            _gate_(layer, unit_kind(k), gate)


def _gate_(layer: nn.Module, kind: UnitKind, gate: RetentionGate) -> None:
    """Wrap the modules the unit map names as ``kind``'s gate sites (a site the layer lacks is skipped: e.g.
    linear_pos without rel_pos attention)."""
    sites = [path for path in kind.gate_at if find_module(layer, path) is not None]
    for j, path in enumerate(sites):
        if kind.gate_input:
            _wrap(layer, path, lambda m: GatedInput(m, gate, dim=kind.gate_dim))
        else:  # one mask for every site of a forward: the first draws it, the others reuse it
            pair = None if len(sites) == 1 else ("draw" if j == 0 else "reuse")
            _wrap(layer, path, lambda m: GatedOutput(m, gate, pair))


class GateDraws(EncoderExtension):
    """The encoder's hook: every gate's training mask drawn in one go before a training forward, and forgotten
    after it (an eval forward uses the deterministic masks β ≥ c(t))."""

    def before_forward(self, encoder: nn.Module) -> None:
        if encoder.training:
            encoder.adaptive_dropout_schedule.draw(_gates(encoder))

    def after_forward(self, encoder: nn.Module) -> None:
        encoder.adaptive_dropout_schedule.clear(_gates(encoder))


def _gates(encoder: nn.Module) -> list[RetentionGate]:
    return [g for layer in layer_sets(encoder) for g in layer.adaptive_dropout.values()]


def apply_option(encoder: nn.Module, value) -> None:
    """The ``adaptive_dropout`` encoder option."""
    add_gates_(encoder, AdaptiveDropoutConfig.from_any(value))


OPTION = EncoderOption("adaptive_dropout", apply_option, order=40)  # an entry point


def gated_encoder(model: nn.Module) -> nn.Module:
    enc = conformer_encoder(model)
    if getattr(enc, "adaptive_dropout_schedule", None) is None:
        raise ValueError("the model has no adaptive_dropout gates (train one with "
                         "model.encoder.adaptive_dropout, or add them with nemo_layerfx.pruning.add_gates)")
    return enc


def gates_of(model: nn.Module) -> list[dict[str, RetentionGate]]:
    """Per layer: unit kind -> its gate."""
    return [dict(layer.adaptive_dropout.items()) for layer in gated_encoder(model).layers]


def kept_units(model: nn.Module) -> tuple[Units, list[str]]:
    """Per layer and kind, the units whose β ≥ c∞ (all units of ungated kinds), keeping at least ``min_units`` of
    each (the largest β); returns the units and a note for every layer where ``min_units`` overrode the gates."""
    enc = gated_encoder(model)
    cfg = enc.adaptive_dropout_schedule.config
    units: Units = {}
    notes: list[str] = []
    with torch.no_grad():
        for i, layer in enumerate(enc.layers):
            units[i] = {}
            for kind in PRUNE_KINDS:
                gate = layer.adaptive_dropout[kind] if kind in layer.adaptive_dropout else None
                if gate is None:
                    units[i][kind] = torch.arange(n_units(layer, kind))
                    continue
                beta = gate.beta().detach().cpu()
                keep = torch.nonzero(beta >= cfg.c_inf).flatten()
                if len(keep) < min(cfg.min_units, gate.n):
                    keep = beta.topk(min(cfg.min_units, gate.n)).indices.sort().values
                    notes.append(f"layers.{i}.{kind}: every unit is below c_inf; kept the {len(keep)} with the "
                                 f"largest β (min_units={cfg.min_units})")
                units[i][kind] = keep
    return units, notes


def strip_gates_(encoder: nn.Module) -> None:
    """In place: every wrapper replaced by its base layer; gates and schedule removed."""
    for name, module in list(encoder.named_modules()):
        if isinstance(module, (GatedInput, GatedOutput)):
            parent, _, attr = name.rpartition(".")
            setattr(encoder.get_submodule(parent), attr, module.base_layer)
    for layer in layer_sets(encoder):
        if "adaptive_dropout" in layer._modules:
            del layer._modules["adaptive_dropout"]
    if "adaptive_dropout_schedule" in encoder._modules:
        del encoder._modules["adaptive_dropout_schedule"]
    encoder.remove_extension("adaptive_dropout")


def remove_gates(model: nn.Module) -> nn.Module:
    """A new model without gates (the wrapped layers as they are, every unit kept); ``model`` is unchanged."""
    gated_encoder(model)
    new = clone_model(model)
    strip_gates_(conformer_encoder(new))
    with open_dict(new._cfg):
        new._cfg.encoder.pop("adaptive_dropout", None)
    return new


def add_gates(model: nn.Module, config: AdaptiveDropoutConfig | dict) -> nn.Module:
    """A new model with gates on its encoder (to fine-tune a trained dense model with adaptive dropout); its
    config records them, so ``save_to`` / ``restore_from`` rebuild the gated model. ``model`` is unchanged."""
    config = AdaptiveDropoutConfig.from_any(config)
    new = clone_model(model)
    adopt_(new)  # NeMo's stock encoder: ours with its own norm and tensors, whose config carries the gates
    add_gates_(conformer_encoder(new), config)
    with open_dict(new._cfg):
        new._cfg.encoder.adaptive_dropout = config.to_dict()
    return new
