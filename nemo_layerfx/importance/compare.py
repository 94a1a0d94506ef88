"""Agreement of layer-importance rankings across probe reports (Zhou et al.'s stability study)."""

from __future__ import annotations

import math

from nemo_layerfx.models import unit_kind


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (Pearson on average ranks); nan when either side is constant."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"rank correlation needs two equally long lists of >= 2 values, got {len(a)} and {len(b)}")
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")


def compare_reports(reports: list[dict], mode: str = "rerand", top_n: int = 2, labels: bool = False) -> dict:
    """Agreement of layer rankings across probe reports (runs, seeds, model sizes): Zhou's stability study.

    Pairwise Spearman correlation of the per-unit WER changes (reports over the same units) and the overlap of
    the ``top_n`` most ambient units (relative depth is used when unit counts differ), or with ``labels`` the
    Jaccard overlap of the units each report labelled ambient (e.g. by its confidence intervals: ``rule="ci"``).
    """
    if len(reports) < 2:
        raise ValueError("compare needs at least two probe reports")
    for i, r in enumerate(reports):
        if mode not in r.get("delta_wer", {}):
            raise ValueError(f"report {i} has no {mode!r} results (it has {sorted(r.get('delta_wer', {}))})")
    kinds = [unit_kind(r.get("units", [])) for r in reports]
    if len(set(kinds)) > 1:  # positions of blocks and of modules are not the same depths: a meaningless overlap
        raise ValueError("the reports rate different units: " + ", ".join(
            f"report {i} {k} ({', '.join(r['units'][:2])}, ...)" for i, (k, r) in enumerate(zip(kinds, reports)))
            + "; compare reports probed with the same --unit")
    pairs = []
    for i in range(len(reports)):
        for j in range(i + 1, len(reports)):
            a, b = reports[i], reports[j]
            da, db = a["delta_wer"][mode], b["delta_wer"][mode]
            if labels:
                amb_a = [a["units"].index(u) for u in a.get("ambient", {}).get(mode, [])]
                amb_b = [b["units"].index(u) for u in b.get("ambient", {}).get(mode, [])]
            else:
                amb_a = sorted(range(len(da)), key=lambda k: (da[k], k))[:top_n]
                amb_b = sorted(range(len(db)), key=lambda k: (db[k], k))[:top_n]
            same_units = a["units"] == b["units"]
            if same_units:
                sa, sb = set(amb_a), set(amb_b)
                rho = spearman(da, db)
            else:  # different depths: compare relative positions (layer index / layer count)
                rel = lambda idx, n: round(idx / max(n - 1, 1) * 4)  # noqa: E731  (quintiles of depth)
                sa, sb = {rel(k, len(da)) for k in amb_a}, {rel(k, len(db)) for k in amb_b}
                rho = float("nan")
            if labels:
                overlap = len(sa & sb) / len(sa | sb) if sa | sb else 1.0
            else:
                overlap = len(sa & sb) / top_n
            pairs.append({"a": i, "b": j, "same_units": same_units, "spearman": rho, "overlap": overlap,
                          f"top{top_n}_ambient_overlap": overlap,
                          "ambient_a": [a["units"][k] for k in amb_a], "ambient_b": [b["units"][k] for k in amb_b]})
    rhos = [p["spearman"] for p in pairs if not math.isnan(p["spearman"])]
    return {"mode": mode, "top_n": top_n, "labels": labels, "pairs": pairs,
            "mean_spearman": sum(rhos) / len(rhos) if rhos else float("nan"),
            "mean_overlap": sum(p["overlap"] for p in pairs) / len(pairs)}
