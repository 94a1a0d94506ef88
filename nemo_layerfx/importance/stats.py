"""How sure is a WER change? Paired bootstrap over utterances, and the spread over re-rand draws.

A reset's WER change is measured on the same utterances as the baseline, so the interval resamples utterances
(with replacement, the same resamples for every unit) and recomputes both WERs on each resample: the paired
bootstrap of corpus WER (word errors summed over utterances / reference words summed). With ~500 reference words
one word is 0.002 WER, so a 10 % relative threshold on a 0.07 baseline is about 3 words: labels need intervals.
"""

from __future__ import annotations

import numpy as np



def delta_interval(base: np.ndarray, words: np.ndarray, variant: np.ndarray, idx: np.ndarray,
                   level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the WER change (mean over draws of the variant's WER minus the baseline's).

    base, words: (n,) per-utterance errors and words; variant: (draws, n) errors after the reset; idx: resamples.
    """
    w = words[idx].sum(axis=1).clip(min=1)  # (rounds,)
    delta = (variant[:, idx].sum(axis=2).mean(axis=0) - base[idx].sum(axis=1)) / w
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(delta, [tail, 1.0 - tail])
    return float(lo), float(hi)


def draw_spread(base: np.ndarray, words: np.ndarray, variant: np.ndarray) -> float | None:
    """Standard deviation of the WER change over re-rand draws (None with one draw)."""
    if variant.shape[0] < 2:
        return None
    per_draw = (variant.sum(axis=1) - base.sum()) / max(int(words.sum()), 1)
    return float(np.std(per_draw, ddof=1))
