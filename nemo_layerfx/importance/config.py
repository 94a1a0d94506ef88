"""What the importance probe resets and how it labels layers: ``ProbeConfig`` (plain Python, importable without
NeMo or torch, so ``layerfx probe`` checks its flags with the same rules before loading a model)."""

from __future__ import annotations

from dataclasses import dataclass

from nemo_layerfx.validation import FieldError

MODES = ("reinit", "rerand")
RULES = ("relative", "ci", "top_n")
UNITS = ("block", "module")


@dataclass
class ProbeConfig:
    """What to reset and how to label layers."""

    modes: tuple[str, ...] = ("rerand",)  # reinit (needs an init snapshot) and/or rerand
    unit: str = "block"  # block: a whole Conformer layer; module: ffn1 / attn / conv / ffn2 with its pre-norm
    draws: int = 1  # re-rand draws averaged per unit
    seed: int = 0  # re-rand draw d of unit u uses the seed seed * 1000003 + u * 1009 + d
    rule: str = "relative"  # how units are labelled ambient: relative | ci | top_n (see ambient_units)
    ambient_rel_threshold: float = 0.10  # relative: ambient if WER <= baseline * (1 + threshold) (Zhou: no number)
    n_ambient: int | None = None  # top_n: the n units with the smallest WER change (setting it selects top_n)
    bootstrap: int = 1000  # paired bootstrap resamples of the utterances for every unit's interval (0: none)
    ci_level: float = 0.95  # interval level; rule ci: ambient if the interval's lower end is <= 0
    batch_size: int = 16
    max_utterances: int | None = None  # probe on the first N utterances (manifest sorted by duration)
    loss: bool = True  # also the model's loss per reset (one more decoder/joint pass per batch and reset)
    batch_variants: int = 1  # reset variants of one layer run through layers i+1.. as one batch (GPU: try 8)

    def __post_init__(self) -> None:
        self.modes = tuple(self.modes)
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise FieldError("modes", f"unknown probe mode(s) {bad or '(none)'}; choose from {', '.join(MODES)}")
        if self.unit not in UNITS:
            raise FieldError("unit", f"unknown unit {self.unit!r}; choose one of {', '.join(UNITS)}")
        if self.draws < 1:
            raise FieldError("draws", f"draws must be >= 1, got {self.draws}")
        if self.ambient_rel_threshold < 0:
            raise FieldError("ambient_rel_threshold", f"ambient_rel_threshold must be >= 0, got "
                                                      f"{self.ambient_rel_threshold}")
        if self.batch_size < 1:
            raise FieldError("batch_size", f"batch_size must be >= 1, got {self.batch_size}")
        if self.batch_variants < 1:
            raise FieldError("batch_variants", f"batch_variants must be >= 1, got {self.batch_variants}")
        if self.n_ambient is not None:
            self.rule = "top_n"
        if self.rule not in RULES:
            raise FieldError("rule", f"unknown ambient rule {self.rule!r}; choose from {', '.join(RULES)}")
        if self.rule == "top_n" and self.n_ambient is None:
            raise FieldError("n_ambient", "rule top_n needs n_ambient (how many units to label ambient)")
        if self.rule == "ci" and self.bootstrap < 1:
            raise FieldError("bootstrap", f"rule ci needs bootstrap >= 1 (resamples for the intervals), got "
                                          f"{self.bootstrap}")
        if self.bootstrap < 0:
            raise FieldError("bootstrap", f"bootstrap must be >= 0, got {self.bootstrap}")
        if not 0.0 < self.ci_level < 1.0:
            raise FieldError("ci_level", f"ci_level must be in (0, 1), got {self.ci_level}")
        if self.max_utterances is not None and self.max_utterances < 1:
            raise FieldError("max_utterances", f"max_utterances must be >= 1, got {self.max_utterances}")
