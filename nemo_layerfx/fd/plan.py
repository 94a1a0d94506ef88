"""Federated-dropout plans: how many units of each kind every layer keeps, and which (seeded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nemo_layerfx.models import block_layers, read_report
from nemo_layerfx.surgery import Units, sliceable_encoder
from nemo_layerfx.units import FD_KINDS, n_units, resolve

RATE_KEYS = ("ffn", "head", "conv")  # config words: ffn is both FFNs' hidden units (units.resolve)
MAPPINGS = ("pcpr", "pr")


@dataclass
class DropoutPlan:
    """Per-layer dropout rates per unit kind, and how units are drawn.

    rates: kind -> one rate per encoder layer, the fraction of units dropped (in [0, 1)). Kinds: ``ffn`` (the hidden
        units of both macaron FFNs, Guliani's choice), ``head`` (attention heads), ``conv`` (GroupNorm groups of the
        conv module). A layer keeps ``max(1, round(n * (1 - rate)))`` units of each kind.
    mapping: ``pcpr`` draws units per client per round (Guliani's best); ``pr`` gives all clients of a round the
        same units (simpler, anonymous). The caller turns this into seeds (``unit_seed``).
    """

    rates: dict[str, list[float]]
    mapping: str = "pcpr"
    label: str = ""  # e.g. "Amb-2 50% | flat 10%": for reports and plots

    def __post_init__(self) -> None:
        self.rates = {k: [float(r) for r in v] for k, v in self.rates.items()}
        bad = [k for k in self.rates if k not in RATE_KEYS]
        if bad or not self.rates:
            raise ValueError(f"unknown unit kind(s) {bad or '(none)'} in the plan; choose from {', '.join(RATE_KEYS)}")
        lengths = {len(v) for v in self.rates.values()}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"every kind needs one rate per layer; got lengths {sorted(lengths)}")
        for kind, values in self.rates.items():
            for i, r in enumerate(values):
                check_rate(r, f"{kind} rate for layers.{i}")
        if self.mapping not in MAPPINGS:
            raise ValueError(f"unknown mapping {self.mapping!r}; choose pcpr (per client per round) or pr (per round)")

    @property
    def n_layers(self) -> int:
        return len(next(iter(self.rates.values())))

    @classmethod
    def flat(cls, n_layers: int, rate: float, kinds: tuple[str, ...] = ("ffn",), mapping: str = "pcpr") -> DropoutPlan:
        """The same rate on every layer (Caldas, Guliani's "Flat x%")."""
        return cls({k: [rate] * n_layers for k in kinds}, mapping, label=f"Flat {rate:.0%}")

    @classmethod
    def targeted(cls, report: Any, n: int | str, rate: float, base_rate: float = 0.0, target: str = "ambient",
                 kinds: tuple[str, ...] = ("ffn",), mode: str = "rerand", mapping: str = "pcpr") -> DropoutPlan:
        """``base_rate`` everywhere and ``rate`` on the n most ambient (Zhou's Amb-n) or critical (Crit-n) layers.

        report: a block-level probe report (``ProbeReport``, its dict, or a probe.json path); layers are ranked by
        their WER change under ``mode``, the same numbers the probe's table prints. ``n="labels"`` takes n from the
        report itself: the number of layers it labelled ambient (by its rule, e.g. ``ci``: not significantly worse
        than the baseline), so the plan targets exactly those (Amb) or as many of the most critical (Crit).
        """
        chosen, n, layers = _targeted(report, n, target, mode, "a dropout plan")
        per_layer = [rate if i in chosen else base_rate for i in range(len(layers))]
        label = f"{'Amb' if target == 'ambient' else 'Crit'}-{n} {rate:.0%}"
        label += f" | flat {base_rate:.0%}" if base_rate else ""
        return cls({k: list(per_layer) for k in kinds}, mapping, label=label)  # one rate per report layer

    def check(self, model: nn.Module) -> None:
        """Clear errors when the plan (or the report it came from) does not fit ``model``'s encoder."""
        enc = sliceable_encoder(model)
        n = len(enc.layers)
        if self.n_layers != n:
            raise ValueError(f"the plan has rates for {self.n_layers} layers but the encoder has n_layers={n} "
                             f"(layers.0 … layers.{n - 1}); a report or plan from a different model?")

    def keep(self, kind: str, layer: int, n: int) -> int:
        """Units of unit kind ``kind`` (ffn1, ffn2, head, conv) that layer ``layer`` keeps out of ``n``."""
        rates = next((v for k, v in self.rates.items() if kind in resolve(k)), None)
        rate = 0.0 if rates is None else rates[layer]
        return max(1, round(n * (1.0 - rate)))

    def to_dict(self) -> dict:
        return {"rates": self.rates, "mapping": self.mapping, "label": self.label}

    @classmethod
    def from_dict(cls, d: dict) -> DropoutPlan:
        return cls(rates=d["rates"], mapping=d.get("mapping", "pcpr"), label=d.get("label", ""))


def targeted_layers(report: Any, n: int | str, target: str = "ambient", mode: str = "rerand",
                    needed_by: str = "a dropout plan") -> set[int]:
    """The n most ambient (smallest WER change under ``mode``) or most critical layers of a block-level probe
    report; ``n="labels"``: as many as the report labelled ambient."""
    return _targeted(report, n, target, mode, needed_by)[0]


def _targeted(report: Any, n: int | str, target: str, mode: str, needed_by: str) -> tuple[set[int], int, list[int]]:
    if target not in ("ambient", "critical"):
        raise ValueError(f"target must be 'ambient' or 'critical', got {target!r}")
    r = read_report(report)
    if mode not in r.get("delta_wer", {}):
        raise ValueError(f"the report has no {mode!r} results (it has {sorted(r.get('delta_wer', {}))})")
    layers = block_layers(r, needed_by)
    delta = r["delta_wer"][mode]
    if n == "labels":
        n = len(r.get("ambient", {}).get(mode, []))
        if n == 0:
            raise ValueError(f"n='labels': the report labels no layer ambient under {mode!r} (rule "
                             f"{r.get('config', {}).get('rule', 'relative')}); give n as a number")
    if not isinstance(n, int) or not 1 <= n <= len(layers):
        raise ValueError(f"n={n}: the report ranks {len(layers)} layers; choose 1..{len(layers)}")
    order = sorted(range(len(delta)), key=lambda k: (delta[k], k), reverse=target == "critical")
    return {layers[k] for k in order[:n]}, n, layers


def check_rate(rate: float, what: str = "rate") -> None:
    """A dropout rate is the fraction of a kind's units dropped: in [0, 1) (1 would drop them all)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{what} is {rate}; a dropout rate is the fraction of units dropped, in [0, 1)")


def unit_seed(seed: int, server_round: int, client: int, mapping: str) -> int:
    """The seed of a client's units in a round: per client per round (pcpr) or shared by the round (pr)."""
    return seed * 1_000_003 + server_round * 10_007 + (client if mapping == "pcpr" else 0)


def choose_units(model: nn.Module, plan: DropoutPlan, seed: int) -> Units:
    """Which units each layer keeps: ``plan.keep`` of them, drawn uniformly under ``seed`` (CPU generator)."""
    enc = sliceable_encoder(model)
    plan.check(model)  # also catches a report from a model of another depth: one rate per report layer
    g = torch.Generator().manual_seed(int(seed))
    units: Units = {}
    for i, layer in enumerate(enc.layers):
        units[i] = {}
        for kind in FD_KINDS:
            n = n_units(layer, kind)
            k = plan.keep(kind, i, n)
            units[i][kind] = torch.arange(n) if k == n else torch.randperm(n, generator=g)[:k].sort().values
    return units
