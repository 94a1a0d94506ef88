"""The way back: client submodel updates mapped to full size through their unit maps, averaged, and applied."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from nemo_layerfx.surgery import Units, tensor_index, slice_state

RULES = ("zero_fill", "coverage")


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
              model: nn.Module, rule: str = "zero_fill", keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The averaged full-size update from client submodels.

    results: (trained submodel state, its units, weight such as its example count) per client. Each client's delta
    is its trained state minus the global state sliced the same way, expanded back with zeros.
    ``zero_fill`` (Guliani/FP, the default): sum_k w_k * delta_k / sum_k w_k, so coordinates a client did not have
    count as a zero update. ``coverage`` (HeteroFL): each coordinate is divided by the weight of the clients that
    had it (no update where none had it). Both agree when every client had every unit.
    keys: the tensors clients trained (partial-variable training, ``fd.partial``); the update covers only those.
    Default: every floating tensor.
    """
    if rule not in RULES:
        raise ValueError(f"unknown aggregation rule {rule!r}; choose zero_fill or coverage")
    if not results:
        raise ValueError("nothing to aggregate: no client results")
    keys = [k for k, v in global_state.items() if v.is_floating_point()] if keys is None else list(keys)
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
