"""The ``adaptive_dropout`` section of the encoder config (Kubo, Cai, Bacchiani 2024), and its schedule.

Every prunable unit d has a learnable retention logit β_d = √(γ/α)·β′_d + c(t): a unit-wise dropout mask
m_d = H(β_d + ε), ε ~ Logistic(0, 1), hard in the forward pass, with the gradient of σ(β_d + ε) in the backward
pass. The moving target c(t) falls linearly from c₀ to c∞ over K steps, then stays:
c(t) = max((t/K)·c∞ + (1 − t/K)·c₀, c∞). The regularizer R(β; t) = α Σ_d (β_d − c(t))² equals γ‖β′‖² under the
reparametrization, so a coupled L2 of weight γ on β′ is exactly R. After training, units with β_d < c∞ are removed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

LOCATIONS = ("ffn", "qk", "v", "conv")
REGULARIZERS = ("auto", "weight_decay", "loss")
# NeMo optimizer names whose weight_decay is a coupled L2 (added to the gradient); everything else (adamw, ...) is
# treated as decoupled, so R goes through the loss instead.
COUPLED_OPTIMIZERS = ("sgd", "adam", "adamax", "adagrad", "adadelta", "rmsprop")


@dataclass
class AdaptiveDropoutConfig:
    """Where the gates go and how they are trained (defaults: the paper's, except K, which depends on the run).

    locations: ffn (hidden units of both macaron FFNs, after the activation), qk (query/key dimensions per head:
        pruning one removes the Q, K and linear_pos rows and the pos_bias_u/v entries), v (value dimensions per
        head: V rows and linear_out columns), conv (GroupNorm groups of the conv module, gated after the norm and
        Swish: see ``gates.py`` for why not per channel at the GLU output).
    c0, c_inf: the moving target's start and end (c₀ = 10, c∞ = −2); c∞ is also the pruning threshold.
    steps: K, the optimizer steps over which c(t) falls (the paper: 100k; small runs need far fewer).
    alpha, gamma: R's weight α = 1e-7 and the L2 weight γ = 1e-5 of the reparametrization β = √(γ/α)β′ + c(t).
    regularizer: ``weight_decay`` (coupled L2 of weight 2γ on β′ in its own optimizer group: SGD, Adam, ...),
        ``loss`` (R's gradient added to β′'s, β′ excluded from the optimizer's decay: any optimizer, e.g. AdamW),
        or ``auto`` (weight_decay for a coupled optimizer, loss otherwise).
    min_units: ``prune`` keeps at least this many units of each kind in every layer (the largest β) and says so.
    settle_after_k: not in the paper. From step K on (c(t) = c∞) training uses the eval mask 1[β ≥ c∞] instead of
        sampling, and β′ stops changing (no gradient, no regularizer), so the remaining steps fine-tune exactly the
        subnetwork ``prune`` will keep. Kubo trains for 100k+ steps, long enough that the sampled masks agree with
        the eval mask; in a short run the units just above c∞ are kept at eval but were active only about
        σ(c∞) = 12 % of the time in training, and the eval model is far worse than the training loss says.
    """

    locations: list[str] = field(default_factory=lambda: list(LOCATIONS))
    c0: float = 10.0
    c_inf: float = -2.0
    steps: int = 100_000
    alpha: float = 1e-7
    gamma: float = 1e-5
    regularizer: str = "auto"
    min_units: int = 1
    settle_after_k: bool = False

    def __post_init__(self) -> None:
        self.locations = [str(x) for x in self.locations]
        bad = [x for x in self.locations if x not in LOCATIONS]
        if bad or not self.locations:
            raise ValueError(f"unknown adaptive_dropout location(s) {bad or '(none)'}; choose from "
                             f"{', '.join(LOCATIONS)}")
        if int(self.steps) < 1:
            raise ValueError(f"adaptive_dropout.steps (K) must be >= 1, got {self.steps}")
        if not self.c0 > self.c_inf:
            raise ValueError(f"adaptive_dropout needs c0 > c_inf (the target falls from c0 to c_inf), got "
                             f"c0={self.c0}, c_inf={self.c_inf}")
        if self.alpha <= 0 or self.gamma <= 0:
            raise ValueError(f"adaptive_dropout alpha and gamma must be > 0, got alpha={self.alpha}, "
                             f"gamma={self.gamma}")
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"unknown adaptive_dropout regularizer {self.regularizer!r}; choose from "
                             f"{', '.join(REGULARIZERS)}")
        if int(self.min_units) < 1:
            raise ValueError(f"adaptive_dropout.min_units must be >= 1, got {self.min_units}")
        if not isinstance(self.settle_after_k, bool):
            raise ValueError(f"adaptive_dropout.settle_after_k must be true or false, got {self.settle_after_k!r}")
        self.steps, self.min_units = int(self.steps), int(self.min_units)
        self.c0, self.c_inf, self.alpha, self.gamma = float(self.c0), float(self.c_inf), float(self.alpha), \
            float(self.gamma)

    @classmethod
    def from_any(cls, value: Any) -> AdaptiveDropoutConfig:
        if isinstance(value, cls):
            return value
        from omegaconf import DictConfig, OmegaConf

        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value, resolve=True)
        if value is True:
            value = {}
        if not isinstance(value, dict):
            raise ValueError(f"adaptive_dropout must be a mapping such as {{locations: [ffn, qk, v, conv], steps: "
                             f"2000}}, got {value!r}")
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown adaptive_dropout field(s) {unknown}; fields: "
                             f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**value)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def scale(self) -> float:
        """√(γ/α): β = scale·β′ + c(t) (10 with the paper's values)."""
        return (self.gamma / self.alpha) ** 0.5

    def target(self, step: int) -> float:
        """c(t) = max((t/K)·c∞ + (1 − t/K)·c₀, c∞)."""
        t = step / self.steps
        return max(t * self.c_inf + (1.0 - t) * self.c0, self.c_inf)

    def settled(self, step: int) -> bool:
        """Whether training at ``step`` uses the eval mask (``settle_after_k`` and c(t) has reached c∞)."""
        return self.settle_after_k and step >= self.steps

    def mode(self, optimizer_name: str | None) -> str:
        """``weight_decay`` or ``loss`` for the optimizer NeMo builds from ``optim.name``."""
        if self.regularizer != "auto":
            return self.regularizer
        return "weight_decay" if str(optimizer_name or "").lower() in COUPLED_OPTIMIZERS else "loss"
