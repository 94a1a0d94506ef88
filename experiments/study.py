"""What the study scripts share: reading their finished runs, writing mean ± sd over seeds, and the verdict rule
of the ``reproduce.py`` reports."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def mean_sd(values: list[float], fmt: str = ".3f") -> str:
    """One value as is; several as mean ± standard deviation."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def finished_runs(runs: Path, arms) -> tuple[dict[str, dict[int, dict]], list[int]]:
    """Every ``<arm>_seed<k>/result.json`` under ``runs``: arm -> seed -> result, and the seeds seen."""
    results = [json.loads(p.read_text()) for p in sorted(runs.glob("*_seed*/result.json"))]
    by_arm = {a: {r["seed"]: r for r in results if r["arm"] == a} for a in arms}
    return by_arm, sorted({r["seed"] for r in results})


def verdict(diffs: list[float], paper_sign: int, label: str) -> str:
    """reproduced / refuted (the sign in every seed and a mean beyond twice its standard error) or inconclusive."""
    n = len(diffs)
    if n < 2:
        return f"inconclusive ({n} seed)"
    mean, se = statistics.mean(diffs), statistics.stdev(diffs) / n ** 0.5
    same = all(d * paper_sign > 0 for d in diffs)
    opposite = all(d * paper_sign < 0 for d in diffs)
    if same and abs(mean) > 2 * se:
        return "reproduced"
    if opposite and abs(mean) > 2 * se:
        return "refuted"
    return f"inconclusive ({label})"


def fmt(values: list[float], spec: str = "+.3f") -> str:
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {statistics.stdev(values):.3f} (n={len(values)})"
