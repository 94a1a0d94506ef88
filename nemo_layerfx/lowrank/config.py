"""Which linears of a Conformer are trained as U·Vᵀ, and at which rank (Fernandez-Lopez et al. 2025, §4).

The rank of a linear W (m x n) in block b is r_b = α_b · min(m, n), rounded half up, at least 1 (methods.md
§4(d).1), optionally rounded up to a multiple of ``multiple_of``. α_b comes from the group's spec:

- a number α: every block (the paper's "uniform");
- a pair [α_i, α_f]: the linear ramp α_b = b (α_f − α_i) / B + α_i over blocks b = 0..B−1 (LR-SMS: the first block
  gets α_i, the last α_i + (B−1)/B (α_f − α_i); this convention reproduces the paper's parameter counts);
- ``{alphas: [α_0, ..., α_{B-1}]}``: explicit α per block (e.g. ``alphas_from_report``: ordered by a probe);
- ``{ranks: [r_0, ..., r_{B-1}]}``: explicit ranks per block;
- null: the group stays full rank (not factorized).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from nemo_layerfx.units import linears
from nemo_layerfx.validation import FieldError

INITS = ("svd", "kaiming")

GROUPS = ("att", "ffn", "conv")  # config keys: the attention module, both FFNs, the conv module (units.resolve)
# target kind (the last name of a layer path) -> group
TARGET_KINDS: dict[str, str] = {path.rsplit(".", 1)[1]: group for group in GROUPS for path in linears(group)}


@dataclass
class LowRankConfig:
    """The ``low_rank`` section of the encoder config (all optional; only groups with a spec are factorized).

    att: rank spec of the attention projections linear_q/k/v/out/pos (e.g. [0.1, 0.2], the paper's LR-SMS).
    ffn: rank spec of both macaron FFNs' linear1/linear2 (e.g. [0.2, 0.5]).
    conv: rank spec of the conv module's pointwise convs (full rank in the paper; off by default).
    targets: restrict to these kinds (linear_q, linear_k, linear_v, linear_out, linear_pos, linear1, linear2,
        pointwise_conv1, pointwise_conv2); default: every kind of each group that has a spec.
    init: ``svd`` (spectral init from the module's own dense initializer, the paper) or ``kaiming`` (factors drawn
        directly, the paper's ablation). Ignored when factorizing a trained model (truncated SVD of its weights).
    multiple_of: round every rank up to a multiple of this (8 suits tensor cores); 1 keeps the paper's rounding.
    only_if_smaller: leave a linear dense when its factors would not hold fewer parameters (r (m + n) >= m n; e.g.
        α = 0.5 of a square one). ``lowrank`` (a trained model) sets it: a factorization that saves nothing is
        skipped, with a note; training from scratch keeps the paper's rule (every targeted linear factorized).
    """

    att: Any = None
    ffn: Any = None
    conv: Any = None
    targets: list[str] | None = None
    init: str = "svd"
    multiple_of: int = 1
    only_if_smaller: bool = False

    def __post_init__(self) -> None:
        if all(getattr(self, g) is None for g in GROUPS):
            raise ValueError("low_rank needs a rank spec for at least one of att, ffn, conv "
                             "(e.g. low_rank: {att: [0.1, 0.2], ffn: [0.2, 0.5]})")
        for group in GROUPS:
            setattr(self, group, check_spec(group, getattr(self, group)))
        if self.targets is not None:
            self.targets = [str(t) for t in self.targets]
            bad = [t for t in self.targets if t not in TARGET_KINDS]
            if bad or not self.targets:
                raise ValueError(f"unknown low_rank target kind(s) {bad or '(none)'}; choose from "
                                 f"{', '.join(TARGET_KINDS)}")
            unset = [t for t in self.targets if getattr(self, TARGET_KINDS[t]) is None]
            if unset:
                raise ValueError(f"low_rank targets {unset} belong to group(s) without a rank spec "
                                 f"({', '.join(sorted({TARGET_KINDS[t] for t in unset}))}); give that group a spec")
        if self.init not in INITS:
            raise ValueError(f"unknown low_rank init {self.init!r}; choose svd or kaiming")
        if int(self.multiple_of) < 1:
            raise FieldError("multiple_of", f"low_rank multiple_of must be >= 1, got {self.multiple_of}")
        self.multiple_of = int(self.multiple_of)

    @classmethod
    def from_any(cls, value: Any) -> LowRankConfig:
        """From a LowRankConfig, a dict or an OmegaConf node (as Hydra passes the encoder's ``low_rank``)."""
        if isinstance(value, cls):
            return value
        from omegaconf import DictConfig, OmegaConf

        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value, resolve=True)
        if not isinstance(value, dict):
            raise ValueError(f"low_rank must be a mapping such as {{att: [0.1, 0.2], ffn: [0.2, 0.5]}}, got {value!r}")
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown low_rank field(s) {unknown}; fields: {', '.join(cls.__dataclass_fields__)}")
        return cls(**value)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and not (k == "only_if_smaller" and not v)}

    def kinds(self) -> list[str]:
        """The target kinds this config factorizes."""
        if self.targets is not None:
            return list(self.targets)
        return [k for k, g in TARGET_KINDS.items() if getattr(self, g) is not None]

    def alphas(self, group: str, n_blocks: int) -> list[float] | None:
        """Per-block α of a group (None for explicit ranks or a full-rank group)."""
        return block_alphas(getattr(self, group), n_blocks)

    def rank(self, group: str, block: int, n_blocks: int, m: int, n: int) -> int:
        """The rank of an m x n linear of ``group`` in block ``block`` of ``n_blocks``."""
        spec = getattr(self, group)
        if isinstance(spec, dict) and "ranks" in spec:
            ranks = spec["ranks"]
            if len(ranks) != n_blocks:
                raise ValueError(f"low_rank.{group}.ranks has {len(ranks)} entries but the encoder has {n_blocks} "
                                 f"blocks; give one rank per block")
            r = int(ranks[block])
            if r > min(m, n):
                raise ValueError(f"low_rank.{group}.ranks[{block}] = {r} exceeds min(m, n) = {min(m, n)} of a "
                                 f"{m}x{n} linear")
            return r
        return rank_for(block_alphas(spec, n_blocks)[block], m, n, self.multiple_of)


def check_spec(group: str, spec: Any) -> Any:
    """A group's rank spec, checked and normalized (a FieldError naming the group otherwise)."""
    if spec is None:
        return None
    if isinstance(spec, dict):
        if set(spec) not in ({"ranks"}, {"alphas"}):
            raise FieldError(group, f"low_rank.{group}: a mapping spec must be {{ranks: [r_0, ...]}} or "
                             f"{{alphas: [α_0, ...]}}, got keys {sorted(spec)}")
        if "alphas" in spec:
            alphas = list(spec["alphas"])
            bad = [a for a in alphas if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a <= 1]
            if bad or not alphas:
                raise FieldError(group, f"low_rank.{group}.alphas must be numbers in (0, 1], one per block; "
                                 f"got {bad or alphas}")
            return {"alphas": [float(a) for a in alphas]}
        ranks = list(spec["ranks"])
        bad = [r for r in ranks if not isinstance(r, int) or isinstance(r, bool) or r < 1]
        if bad or not ranks:
            raise FieldError(group, f"low_rank.{group}.ranks must be integers >= 1, one per block; got {bad or ranks}")
        return {"ranks": ranks}
    values = [spec] if isinstance(spec, (int, float)) and not isinstance(spec, bool) else spec
    if not isinstance(values, (list, tuple)) or len(values) not in (1, 2):
        raise FieldError(group, f"low_rank.{group} must be a number α, a pair [α_i, α_f] or {{ranks: [...]}}, got "
                                f"{spec!r} (a ramp has exactly two values; per-block ranks go in {{ranks: [...]}})")
    for a in values:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 < float(a) <= 1.0:
            raise FieldError(group, f"low_rank.{group}: α = {a!r} is outside (0, 1]; α is the rank as a fraction of "
                             f"min(m, n)")
    return float(values[0]) if len(values) == 1 else [float(v) for v in values]


def block_alphas(spec: Any, n_blocks: int) -> list[float] | None:
    """α_b for b = 0..B−1: uniform, the linear ramp b (α_f − α_i) / B + α_i, or explicit; None for explicit ranks
    or no spec."""
    if spec is None or (isinstance(spec, dict) and "ranks" in spec):
        return None
    if isinstance(spec, dict):
        if len(spec["alphas"]) != n_blocks:
            raise ValueError(f"low_rank alphas has {len(spec['alphas'])} entries but the encoder has {n_blocks} "
                             f"blocks; give one α per block")
        return list(spec["alphas"])
    if isinstance(spec, (int, float)):
        return [float(spec)] * n_blocks
    a_i, a_f = spec
    return [b * (a_f - a_i) / n_blocks + a_i for b in range(n_blocks)]


def rank_for(alpha: float, m: int, n: int, multiple_of: int = 1) -> int:
    """max(1, round_half_up(α · min(m, n))), then up to a multiple of ``multiple_of`` (never above min(m, n))."""
    full = min(m, n)
    r = max(1, math.floor(alpha * full + 0.5))
    if multiple_of > 1:
        r = min(full, math.ceil(r / multiple_of) * multiple_of)
    return r


def parse_spec(text: str | None) -> Any:
    """A command-line spec: ``0.25`` (uniform), ``0.1,0.2`` (ramp) or ``r:8,8,16,...`` (explicit ranks)."""
    if text is None or text == "":
        return None
    try:
        if text.startswith("r:"):
            return {"ranks": [int(v) for v in text[2:].split(",")]}
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"cannot read the rank spec {text!r}: use 0.25 (uniform α), 0.1,0.2 (ramp) or "
                         f"r:8,8,16 (one rank per block)") from None
    return values[0] if len(values) == 1 else values
