"""Federated dropout: carve dense, smaller Conformer submodels out of a NeMo model and map their updates back.

Plain PyTorch; no Flower needed. The unit map (``units.py``) says which slices make a unit; this module decides
how many units each layer keeps (``DropoutPlan``), which ones (``choose_units``, seeded), builds the submodel
(``extract``) and folds client updates back into the global model (``aggregate``, ``ServerOptimizer``).

    plan = DropoutPlan.targeted(report, n=2, rate=0.5, base_rate=0.1, target="ambient")   # Zhou's Amb-2
    sub, units = extract(model, plan, seed=7)           # a real EncDecCTCModelBPE (or RNNT, hybrid), smaller
    ...train sub with NeMo's loop...
    delta = aggregate(model.state_dict(), [(sub.state_dict(), units, n_examples)], rule="zero_fill")
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nemo_layerfx.units import KINDS, UNIT_MAP, check_sliceable, layer_tensor_index, n_units, unit_width

PLAN_KINDS = {"ffn": ("ffn1", "ffn2"), "head": ("head",), "conv": ("conv",)}
MAPPINGS = ("pcpr", "pr")
RULES = ("zero_fill", "coverage")
Units = dict[int, dict[str, torch.Tensor]]  # layer -> unit kind -> kept unit indices (sorted)


def _encoder(model: nn.Module) -> nn.Module:
    from nemo_layerfx.importance import conformer_encoder

    enc = conformer_encoder(model)
    check_sliceable(enc)
    return enc


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
        bad = [k for k in self.rates if k not in PLAN_KINDS]
        if bad or not self.rates:
            raise ValueError(f"unknown unit kind(s) {bad or '(none)'} in the plan; choose from {', '.join(PLAN_KINDS)}")
        lengths = {len(v) for v in self.rates.values()}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"every kind needs one rate per layer; got lengths {sorted(lengths)}")
        for kind, values in self.rates.items():
            for i, r in enumerate(values):
                if not 0.0 <= r < 1.0:
                    raise ValueError(f"{kind} rate for layers.{i} is {r}; rates are fractions dropped, in [0, 1)")
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
    def targeted(cls, report: Any, n: int, rate: float, base_rate: float = 0.0, target: str = "ambient",
                 kinds: tuple[str, ...] = ("ffn",), mode: str = "rerand", mapping: str = "pcpr") -> DropoutPlan:
        """``base_rate`` everywhere and ``rate`` on the n most ambient (Zhou's Amb-n) or critical (Crit-n) layers.

        report: a block-level probe report (``ProbeReport``, its dict, or a probe.json path); layers are ranked by
        their WER change under ``mode``.
        """
        if target not in ("ambient", "critical"):
            raise ValueError(f"target must be 'ambient' or 'critical', got {target!r}")
        r = _report_dict(report)
        if mode not in r.get("delta_wer", {}):
            raise ValueError(f"the report has no {mode!r} results (it has {sorted(r.get('delta_wer', {}))})")
        layers = _block_layers(r)
        delta = r["delta_wer"][mode]
        if not 1 <= n <= len(layers):
            raise ValueError(f"n={n}: the report ranks {len(layers)} layers; choose 1..{len(layers)}")
        order = sorted(range(len(delta)), key=lambda k: (delta[k], k), reverse=target == "critical")
        chosen = {layers[k] for k in order[:n]}
        per_layer = [rate if i in chosen else base_rate for i in range(len(layers))]
        label = f"{'Amb' if target == 'ambient' else 'Crit'}-{n} {rate:.0%}" + (f" | flat {base_rate:.0%}" if base_rate else "")
        return cls({k: list(per_layer) for k in kinds}, mapping, label=label)  # one rate per report layer

    def check(self, model: nn.Module) -> None:
        """Clear errors when the plan (or the report it came from) does not fit ``model``'s encoder."""
        enc = _encoder(model)
        n = len(enc.layers)
        if self.n_layers != n:
            raise ValueError(f"the plan has rates for {self.n_layers} layers but the encoder has n_layers={n} "
                             f"(layers.0 … layers.{n - 1}); a report or plan from a different model?")

    def keep(self, kind: str, layer: int, n: int) -> int:
        """Units of unit kind ``kind`` (ffn1, ffn2, head, conv) that layer ``layer`` keeps out of ``n``."""
        plan_kind = next(k for k, members in PLAN_KINDS.items() if kind in members)
        rate = self.rates.get(plan_kind, [0.0] * self.n_layers)[layer]
        return max(1, round(n * (1.0 - rate)))

    def to_dict(self) -> dict:
        return {"rates": self.rates, "mapping": self.mapping, "label": self.label}

    @classmethod
    def from_dict(cls, d: dict) -> DropoutPlan:
        return cls(rates=d["rates"], mapping=d.get("mapping", "pcpr"), label=d.get("label", ""))


def _report_dict(report: Any) -> dict:
    if isinstance(report, (str, Path)):
        path = Path(report)
        if not path.is_file():
            raise FileNotFoundError(f"no such probe report: {path}")
        return json.loads(path.read_text())
    return report if isinstance(report, dict) else asdict(report)


def _block_layers(report: dict) -> list[int]:
    units = report.get("units", [])
    if not units or any(u.count(".") != 1 for u in units):
        raise ValueError("a dropout plan needs a block-level probe report (units 'layers.i'); this one has "
                         f"{units[:3]}… (probe with unit='block')")
    return [int(u.split(".")[1]) for u in units]


def unit_seed(seed: int, server_round: int, client: int, mapping: str) -> int:
    """The seed of a client's units in a round: per client per round (pcpr) or shared by the round (pr)."""
    return seed * 1_000_003 + server_round * 10_007 + (client if mapping == "pcpr" else 0)


def choose_units(model: nn.Module, plan: DropoutPlan, seed: int) -> Units:
    """Which units each layer keeps: ``plan.keep`` of them, drawn uniformly under ``seed`` (CPU generator)."""
    enc = _encoder(model)
    plan.check(model)  # also catches a report from a model of another depth: one rate per report layer
    g = torch.Generator().manual_seed(int(seed))
    units: Units = {}
    for i, layer in enumerate(enc.layers):
        units[i] = {}
        for kind in KINDS:
            n = n_units(layer, kind)
            k = plan.keep(kind, i, n)
            units[i][kind] = torch.arange(n) if k == n else torch.randperm(n, generator=g)[:k].sort().values
    return units


def tensor_index(model: nn.Module, units: Units) -> dict[str, tuple[int, torch.Tensor]]:
    """state_dict key -> (dim, kept indices) for every sliced tensor of ``model`` (the full-size model)."""
    enc = _encoder(model)
    prefix = next(name for name, m in model.named_modules() if m is enc)
    out = {}
    for i, layer in enumerate(enc.layers):
        for kind in KINDS:
            for path, (dim, idx) in layer_tensor_index(layer, kind, units[i][kind]).items():
                out[f"{prefix}.layers.{i}.{path}"] = (dim, idx)
    return out


def slice_state(state: dict[str, torch.Tensor], index: dict[str, tuple[int, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The submodel's tensors: each indexed tensor sliced, the rest shared as they are (not copied)."""
    return {k: (v.index_select(index[k][0], index[k][1].to(v.device)) if k in index else v) for k, v in state.items()}


def submodel_widths(model: nn.Module, units: Units) -> dict[str, list]:
    """Encoder config entries (``ff_hidden``, ``layer_n_heads``, ``conv_channels``, ``conv_groups``) of the submodel."""
    enc = _encoder(model)
    widths: dict[str, list] = {"ff_hidden": [], "layer_n_heads": [], "conv_channels": [], "conv_groups": []}
    for i, layer in enumerate(enc.layers):
        u = units[i]
        widths["ff_hidden"].append([len(u["ffn1"]), len(u["ffn2"])])
        widths["layer_n_heads"].append(len(u["head"]))
        widths["conv_groups"].append(len(u["conv"]))
        widths["conv_channels"].append(len(u["conv"]) * unit_width(layer, "conv"))
    return widths


def extract(model: nn.Module, plan: DropoutPlan, seed: int = 0, units: Units | None = None):
    """A new, dense, smaller model of ``model``'s class with the plan's units kept, and its unit map.

    The submodel shares nothing with ``model`` (its own tensors), has the same class, preprocessor, decoder and
    d_model, an encoder config that states its per-layer widths (so ``save_to`` / ``restore_from`` rebuild it),
    and ``cfg.fd_submodel`` recording the plan and the kept units. ``model`` is not modified.

    Example::

        sub, units = extract(model, DropoutPlan.flat(16, 0.5, kinds=("ffn", "head", "conv")), seed=3)
        sub.save_to("client.nemo")
    """
    from omegaconf import open_dict

    enc = _encoder(model)
    units = units if units is not None else choose_units(model, plan, seed)
    widths = submodel_widths(model, units)
    sub_enc_cfg = copy.deepcopy(model.cfg.encoder)
    with open_dict(sub_enc_cfg):
        sub_enc_cfg.update(widths)
    new_encoder = type(enc).from_config_dict(sub_enc_cfg)
    sub = clone_model(model)
    enc_name = next(name for name, m in model.named_modules() if m is enc)
    setattr(sub, enc_name, new_encoder.to(next(enc.parameters()).device))
    sliced = slice_state(model.state_dict(), tensor_index(model, units))
    sub.load_state_dict({k: v.clone() for k, v in sliced.items()}, strict=True)
    with open_dict(sub._cfg):
        sub._cfg.encoder = sub_enc_cfg
        sub._cfg.fd_submodel = {"plan": plan.to_dict(), "seed": int(seed), "units": units_to_lists(units)}
    return sub, units


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy of a NeMo model without its trainer and data loaders (which cannot be copied, and belong to the
    original); the copy's ``training_step`` wrapper is rebuilt for the copy."""
    from nemo.utils import model_utils

    skip = ("_trainer", "_train_dl", "_validation_dl", "_test_dl", "training_step")
    saved = {k: model.__dict__.pop(k) for k in skip if k in model.__dict__}
    try:
        clone = copy.deepcopy(model)
    finally:
        model.__dict__.update(saved)
    clone._trainer, clone._train_dl, clone._validation_dl, clone._test_dl = None, None, None, None
    if "training_step" in saved:
        clone.training_step = model_utils.wrap_training_step(clone.training_step)
    return clone


def units_to_lists(units: Units) -> dict[str, dict[str, list[int]]]:
    """JSON-safe form of a unit map (for payloads, checkpoints and ``cfg.fd_submodel``)."""
    return {str(i): {k: v.tolist() for k, v in u.items()} for i, u in units.items()}


def units_from_lists(d: dict) -> Units:
    return {int(i): {k: torch.tensor(v, dtype=torch.long) for k, v in u.items()} for i, u in d.items()}


def plan_param_count(model: nn.Module, plan_or_units: DropoutPlan | Units) -> int:
    """The submodel's parameter count from arithmetic alone: the model's, minus each dropped unit's slices."""
    enc = _encoder(model)
    total = sum(p.numel() for p in model.parameters())
    params = dict(enc.named_parameters())
    for i, layer in enumerate(enc.layers):
        for kind in KINDS:
            n = n_units(layer, kind)
            kept = (plan_or_units.keep(kind, i, n) if isinstance(plan_or_units, DropoutPlan)
                    else len(plan_or_units[i][kind]))
            per_unit = 0
            for s in UNIT_MAP[kind]:
                p = params.get(f"layers.{i}.{s.path}")
                if p is None:
                    continue
                channels = {"channel": unit_width(layer, kind), "glu": 2 * unit_width(layer, kind), "unit": 1}[s.rule]
                per_unit += p.numel() // p.shape[s.dim] * channels
            total -= (n - kept) * per_unit
    return total


@torch.no_grad()
def mask_units_(model: nn.Module, units: Units) -> None:
    """In place: zero the outgoing weights of every dropped unit, so ``model`` computes what the submodel computes.

    The reference for the exactness tests: an FFN unit, head or conv group with zero outgoing weights adds nothing.
    """
    enc = _encoder(model)
    for i, layer in enumerate(enc.layers):
        for kind, out_path in (("ffn1", "feed_forward1.linear2.weight"), ("ffn2", "feed_forward2.linear2.weight"),
                               ("head", "self_attn.linear_out.weight"), ("conv", "conv.pointwise_conv2.weight")):
            n = n_units(layer, kind)
            dropped = torch.tensor(sorted(set(range(n)) - set(units[i][kind].tolist())), dtype=torch.long)
            if len(dropped):
                _, idx = layer_tensor_index(layer, kind, dropped)[out_path]
                layer.get_parameter(out_path).index_fill_(1, idx.to(layer.get_parameter(out_path).device), 0.0)


# --- the way back ------------------------------------------------------------------------------------------------
def expand(delta: dict[str, torch.Tensor], index: dict[str, tuple[int, torch.Tensor]],
           shapes: dict[str, torch.Size]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A submodel delta at full size (zeros where the client had no units) and where it had them (0/1 coverage)."""
    full, cover = {}, {}
    for k, shape in shapes.items():
        d = delta[k]
        if k in index:
            dim, idx = index[k]
            full[k] = torch.zeros(shape, dtype=d.dtype, device=d.device).index_copy_(dim, idx.to(d.device), d)
            cover[k] = torch.zeros(shape, dtype=d.dtype, device=d.device).index_fill_(dim, idx.to(d.device), 1.0)
        else:
            if d.shape != shape:
                raise ValueError(f"{k}: update has shape {tuple(d.shape)}, the global model {tuple(shape)}")
            full[k], cover[k] = d, torch.ones((), dtype=d.dtype, device=d.device)
    return full, cover


def aggregate(global_state: dict[str, torch.Tensor], results: list[tuple[dict[str, torch.Tensor], Units, float]],
              model: nn.Module, rule: str = "zero_fill") -> dict[str, torch.Tensor]:
    """The averaged full-size update from client submodels.

    results: (trained submodel state, its units, weight such as its example count) per client. Each client's delta
    is its trained state minus the global state sliced the same way, expanded back with zeros.
    ``zero_fill`` (Guliani/FP, the default): sum_k w_k * delta_k / sum_k w_k, so coordinates a client did not have
    count as a zero update. ``coverage`` (HeteroFL): each coordinate is divided by the weight of the clients that
    had it (no update where none had it). Both agree when every client had every unit.
    """
    if rule not in RULES:
        raise ValueError(f"unknown aggregation rule {rule!r}; choose zero_fill or coverage")
    if not results:
        raise ValueError("nothing to aggregate: no client results")
    keys = [k for k, v in global_state.items() if v.is_floating_point()]
    shapes = {k: global_state[k].shape for k in keys}
    total = {k: torch.zeros_like(global_state[k]) for k in keys}
    weight = {k: torch.zeros_like(global_state[k]) for k in keys}
    w_sum = 0.0
    for state, units, w in results:
        index = tensor_index(model, units)
        base = slice_state({k: global_state[k] for k in keys}, index)
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"client state lacks {len(missing)} tensors, e.g. {missing[0]}")
        for k in keys:
            if state[k].shape != base[k].shape:
                raise ValueError(f"{k}: client sent shape {tuple(state[k].shape)}, its submodel has "
                                 f"{tuple(base[k].shape)}")
        full, cover = expand({k: state[k].to(base[k]) - base[k] for k in keys}, index, shapes)
        for k in keys:
            total[k] += w * full[k]
            weight[k] += w * cover[k]
        w_sum += w
    if rule == "zero_fill":
        return {k: total[k] / w_sum for k in keys}
    return {k: torch.where(weight[k] > 0, total[k] / weight[k].clamp_min(1e-12), torch.zeros_like(total[k]))
            for k in keys}


@dataclass
class ServerOptimizer:
    """Applies the averaged update to the global model: FedAvg (w += lr * delta) or FedAdam (Reddi et al. 2021).

    FedAdam treats the averaged delta as a pseudo-gradient step: m = b1 m + (1-b1) d; v = b2 v + (1-b2) d^2;
    w += lr * m / (sqrt(v) + tau). Guliani trains SGD on clients and Adam on the server.
    """

    name: str = "fedavg"
    lr: float = 1.0
    betas: tuple[float, float] = (0.9, 0.99)
    tau: float = 1e-3  # Adam's epsilon; FedAdam uses a large one (adaptivity degree)
    state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in ("fedavg", "fedadam"):
            raise ValueError(f"unknown server optimizer {self.name!r}; choose fedavg or fedadam")
        if self.lr <= 0:
            raise ValueError(f"server lr must be > 0, got {self.lr}")

    @torch.no_grad()
    def step_(self, global_state: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> None:
        """In place: update ``global_state``'s floating tensors by ``delta``."""
        for k, d in delta.items():
            if self.name == "fedavg":
                global_state[k] += self.lr * d
                continue
            s = self.state.setdefault(k, {"m": torch.zeros_like(d), "v": torch.zeros_like(d)})
            s["m"].mul_(self.betas[0]).add_(d, alpha=1 - self.betas[0])
            s["v"].mul_(self.betas[1]).addcmul_(d, d, value=1 - self.betas[1])
            global_state[k] += self.lr * s["m"] / (s["v"].sqrt() + self.tau)
