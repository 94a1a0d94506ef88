"""Partial-variable training (Yang, Guliani et al., ICASSP 2022): clients train a chosen part of the model and keep
the rest frozen, and only the trained tensors travel, both ways.

Frozen tensors never change during a run, so a client takes them from the global ``.nemo`` it already holds; the
server sends each client only the trained tensors of its (federated-dropout) submodel and gets only those back.
What is frozen is named three ways, which add up:

    FreezeSpec(names=("front_end",))                         # the feature extractor and the subsampling
    FreezeSpec(modules=("conv",))                            # every encoder layer's conv module (and its norm)
    FreezeSpec(blocks={"report": "probe.json", "n": 2, "target": "ambient"})   # the 2 most ambient layers, whole
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from nemo_layerfx.fd.plan import targeted_layers
from nemo_layerfx.units import MODULES, resolve

FRONT_END = ("preprocessor.", "encoder.pre_encode.")  # what ``names: [front_end]`` means


@dataclass
class FreezeSpec:
    """What clients keep fixed (``FLConfig.freeze`` holds these fields).

    names: parameter-name prefixes (``encoder.pre_encode``, ``decoder``), or ``front_end`` (the preprocessor and the
        encoder's subsampling).
    modules: sub-modules of every encoder layer, with their pre-norms: ``ffn1``, ``attn``, ``conv``, ``ffn2``, or
        ``ffn`` (both feed-forward modules).
    blocks: whole encoder layers picked from a block-level probe report: ``{"report": path, "n": 2, "target":
        "ambient" | "critical", "mode": "rerand"}`` (the n most ambient or most critical, ranked as a dropout plan
        ranks them).
    """

    names: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    blocks: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.names, self.modules, self.blocks = tuple(self.names), tuple(self.modules), dict(self.blocks or {})
        for word in self.modules:
            if any(m not in MODULES for m in resolve(word)):
                raise ValueError(f"freeze.modules: unknown module {word!r}; choose from ffn, att, "
                                 f"{', '.join(MODULES)}")
        unknown = sorted(set(self.blocks) - {"report", "n", "target", "mode"})
        if unknown or (self.blocks and "report" not in self.blocks):
            raise ValueError(f"freeze.blocks={self.blocks}: give report, n and target (ambient or critical)"
                             + (f"; unknown key(s) {unknown}" if unknown else ""))

    def __bool__(self) -> bool:
        return bool(self.names or self.modules or self.blocks)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> FreezeSpec:
        unknown = sorted(set(d or {}) - {"names", "modules", "blocks"})
        if unknown:
            raise ValueError(f"unknown freeze key(s) {unknown}; known: names, modules, blocks")
        return cls(**(d or {}))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def prefixes(self, model: nn.Module) -> list[str]:
        """The parameter-name prefixes this spec freezes in ``model``."""
        from nemo_layerfx.models import conformer_encoder, read_report

        out = [p for n in self.names for p in (FRONT_END if n == "front_end" else (n.rstrip(".") + ".",))]
        enc = conformer_encoder(model)
        layers = range(len(enc.layers))
        for word in self.modules:
            out += [f"encoder.layers.{i}.{part}." for i in layers for m in resolve(word) for part in MODULES[m].parts]
        if self.blocks:
            b = self.blocks
            chosen = targeted_layers(b["report"], b.get("n", 1), b.get("target", "ambient"), b.get("mode", "rerand"),
                                     needed_by="freeze.blocks")
            ranked = len(read_report(b["report"])["units"])
            if ranked != len(enc.layers):
                raise ValueError(f"freeze.blocks: the report ranks {ranked} layers but the encoder has "
                                 f"n_layers={len(enc.layers)} (a report of another model?)")
            out += [f"encoder.layers.{i}." for i in sorted(chosen)]
        return out

    def frozen(self, model: nn.Module) -> set[str]:
        """The names of ``model``'s parameters this spec freezes; clear errors for a name that matches nothing, or
        for a spec that leaves nothing to train."""
        names = [n for n, _ in model.named_parameters()]
        frozen: set[str] = set()
        for prefix in self.prefixes(model):
            hit = {n for n in names if n.startswith(prefix)}
            if not hit and prefix not in FRONT_END:  # a model may have no trainable preprocessor
                raise ValueError(f"freeze: no parameter of the model starts with {prefix!r} (e.g. {names[0]!r})")
            frozen |= hit
        if frozen and len(frozen) == len(names):
            raise ValueError("freeze: that freezes every parameter; clients would have nothing to train")
        return frozen


def trained_names(model: nn.Module, spec: FreezeSpec) -> list[str]:
    """The parameters clients train under ``spec``, in ``model``'s order."""
    frozen = spec.frozen(model)
    return [n for n, _ in model.named_parameters() if n not in frozen]


def freeze_(model: nn.Module, spec: FreezeSpec) -> list[str]:
    """In place: ``requires_grad=False`` on what ``spec`` freezes; returns the names of the parameters left to train."""
    frozen = spec.frozen(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    return [n for n, _ in model.named_parameters() if n not in frozen]
