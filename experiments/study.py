"""What the study scripts share: reading their finished runs and writing mean ± sd over seeds."""

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
