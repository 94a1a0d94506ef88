"""A linear map trained in factorized form, y = U (Vᵀ x) + b (Fernandez-Lopez et al. 2025, "Full-Rank No More").

Shapes: x (..., n) for a linear, (B, n, T) for a kernel-1 Conv1d; U (m, r); Vᵀ (r, n); b (m,). Cost O(r (m + n))
instead of O(m n): fewer parameters and FLOPs when r < m n / (m + n).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nemo_layerfx.encoder.conv import pointwise
from nemo_layerfx.lowrank.config import INITS



def spectral_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """U = Û_r √Σ_r and Vᵀ = √Σ_r V̂ᵀ_r from the truncated SVD of ``weight`` (m, n), in float64 for accuracy.

    At rank min(m, n) the product U Vᵀ equals ``weight``; below it, it is the best rank-r approximation.
    """
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(weight.dtype), (root[:, None] * vh[:rank]).to(weight.dtype)


class LowRankLinear(nn.Module):
    """``nn.Linear`` (or a kernel-1 ``nn.Conv1d`` with ``pointwise=True``) as U·Vᵀ plus the original bias.

    Args:
        in_features: n. out_features: m. rank: r, 1 <= r <= min(m, n).
        bias: keep a bias on the output side (no bias on the inner Vᵀ projection).
        reset: draw an initialization now (``from_dense`` passes False and fills the factors itself).
        init: ``svd`` draws the dense weight from nn.Linear's own initializer and factorizes it (spectral
            initialization, the paper's choice); ``kaiming`` draws U and Vᵀ directly (the paper's ablation).
        pointwise: act on (B, n, T) like ``nn.Conv1d(n, m, 1)`` (the Conformer conv module's pointwise convs).

    ``reset_parameters`` draws a new initialization the same way, so the importance probe's re-randomization
    works on low-rank layers as on dense ones. ``merge()`` returns the dense module with the same outputs.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, init: str = "svd",
                 pointwise: bool = False, reset: bool = True):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown low-rank init {init!r}; choose svd or kaiming")
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} of a {out_features}x{in_features} linear must be in "
                             f"1..{min(in_features, out_features)}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.init, self.pointwise = init, pointwise
        self.U = nn.Parameter(torch.empty(out_features, rank))
        self.Vt = nn.Parameter(torch.empty(rank, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        if reset:  # from_dense fills the tensors itself: no draw, so the caller's random stream is unchanged
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)  # its own initializer
        if self.init == "svd":
            u, vt = spectral_factors(dense.weight, self.rank)
            self.U.copy_(u)
            self.Vt.copy_(vt)
        else:
            nn.init.kaiming_uniform_(self.U, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.Vt, a=math.sqrt(5))
        if self.bias is not None:
            self.bias.copy_(dense.bias)

    @classmethod
    def from_dense(cls, module: nn.Linear | nn.Conv1d, rank: int, init: str = "svd") -> LowRankLinear:
        """Factorize an existing dense layer: truncated SVD of its weight (``init="svd"``, the best rank-r
        approximation; for a freshly built layer this is spectral initialization) or fresh Kaiming factors."""
        pointwise = isinstance(module, nn.Conv1d)
        if pointwise and (module.kernel_size != (1,) or module.groups != 1):
            raise ValueError(f"only kernel-1, groups-1 Conv1d can be factorized, got {module}")
        weight = module.weight.reshape(module.weight.shape[0], -1)  # (m, n)
        layer = cls(weight.shape[1], weight.shape[0], rank, bias=module.bias is not None, init=init,
                    pointwise=pointwise, reset=False)
        layer.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            if init == "svd":
                u, vt = spectral_factors(weight, rank)
                layer.U.copy_(u)
                layer.Vt.copy_(vt)
            else:
                nn.init.kaiming_uniform_(layer.U, a=math.sqrt(5))
                nn.init.kaiming_uniform_(layer.Vt, a=math.sqrt(5))
            if module.bias is not None:
                layer.bias.copy_(module.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pointwise:  # (B, n, T) -> (B, r, T) -> (B, m, T)
            return pointwise(pointwise(x, self.Vt.unsqueeze(-1), None), self.U.unsqueeze(-1), self.bias)
        return F.linear(F.linear(x, self.Vt), self.U, self.bias)  # (..., n) -> (..., r) -> (..., m)

    @torch.no_grad()
    def merge(self) -> nn.Linear | nn.Conv1d:
        """The dense module computing the same map (weight U Vᵀ, same bias); a new module, ``self`` is unchanged."""
        weight = (self.U.double() @ self.Vt.double()).to(self.U.dtype)
        bias = self.bias is not None
        if self.pointwise:
            dense = nn.Conv1d(self.in_features, self.out_features, 1, bias=bias)
            weight = weight.unsqueeze(-1)
        else:
            dense = nn.Linear(self.in_features, self.out_features, bias=bias)
        dense.to(device=self.U.device, dtype=self.U.dtype)
        dense.weight.copy_(weight)
        if bias:
            dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        kind = "pointwise conv" if self.pointwise else "linear"
        return (f"{kind} in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, init={self.init}")


def factorized_params(m: int, n: int, rank: int) -> int:
    """Weight parameters of an m x n map at rank r: r (m + n) (the bias is the same as the dense layer's)."""
    return rank * (m + n)
