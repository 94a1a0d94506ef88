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


VERDICT_RULE = (
    "**Verdict rule.** A row whose criterion is the *paired t-test* is *reproduced* (or *refuted*) when the mean "
    "per-seed difference has the paper's (or the opposite) sign and a two-sided paired t-test over the seeds rejects "
    "a zero mean at 95 % (|mean| / (sd / √n) > t₀.₉₇₅ with n − 1 degrees of freedom: 4.30 at n = 3, 2.78 at n = 5); "
    "otherwise *inconclusive*. Where the paper claims a size (\"a little\", \"11–12 %\"), the row also compares "
    "sizes: ours is *as the paper's* within a factor of two of it, else *smaller* or *larger*. Rows judged by "
    "anything else (an exact identity, a benchmark target, a count, a threshold of ours) name it in the criterion "
    "column. Settings run for a claim other than the row's are listed under *Also tried*, with their results; a "
    "setting chosen after seeing results says so. ± is the standard deviation over seeds.")
T_TEST = "paired t-test"
# t₀.₉₇₅ with df = 1..30 degrees of freedom (two-sided 95 %); tests/test_reproduce.py checks them against scipy
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired(by_arm: dict[str, dict[int, dict]], arm: str, ref: str,
           key: str = "test_wer") -> tuple[list[int], list[float]]:
    """The seeds both arms ran and, per seed, ``arm``'s ``key`` minus ``ref``'s (a within-seed paired difference)."""
    seeds = sorted(set(by_arm[arm]) & set(by_arm[ref]))
    return seeds, [by_arm[arm][s][key] - by_arm[ref][s][key] for s in seeds]


def split_sizes(corpus: str | Path) -> tuple[int, int]:
    """Utterances in the corpus's dev and test manifests (what a study's WERs are measured on)."""
    return tuple(sum(1 for line in (Path(corpus) / f"{split}_manifest.json").read_text().splitlines() if line.strip())
                 for split in ("dev", "test"))


def t_statistic(diffs: list[float]) -> float:
    """mean / (sd / √n) of per-seed paired differences (±inf when they agree exactly and are not all 0)."""
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    if sd == 0:
        return 0.0 if mean == 0 else float("inf") if mean > 0 else float("-inf")
    return mean / (sd / len(diffs) ** 0.5)


def significant(diffs: list[float]) -> bool:
    """A two-sided paired t-test at 95 % rejects a zero mean (n ≥ 2)."""
    n = len(diffs)
    return n >= 2 and abs(t_statistic(diffs)) > T975[min(n - 1, len(T975)) - 1]


def verdict(diffs: list[float], paper_sign: int, label: str) -> str:
    """The report's rule (``VERDICT_RULE``): reproduced / refuted by a paired t-test over seeds, else inconclusive."""
    n = len(diffs)
    if n < 2:
        return f"inconclusive ({n} seed)"
    if significant(diffs):
        return "reproduced" if statistics.mean(diffs) * paper_sign > 0 else "refuted"
    return f"inconclusive ({label})"


def size_word(ours: float, paper: float) -> str:
    """How our effect's size compares with the paper's (same units): within a factor of two is *as the paper's*."""
    ratio = abs(ours) / abs(paper) if paper else float("inf")
    return "as the paper's" if 0.5 <= ratio <= 2 else "smaller" if ratio < 0.5 else "larger"


def fmt(values: list[float], spec: str = "+.3f") -> str:
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {statistics.stdev(values):.3f} (n={len(values)})"


def claims_table(rows: list[dict]) -> list[str]:
    """The report's table, a row per claim (what the paper says, what we measured, by which criterion, the
    verdict), then every other setting tried for a claim (``also_tried``). Rows without a ``criterion`` are judged
    by the paired t-test, and it is written into them, so the JSON names every row's criterion."""
    for r in rows:
        r.setdefault("criterion", T_TEST)
        r.setdefault("also_tried", [])
    out = (["| claim | paper says | we measured | criterion | verdict |", "|---|---|---|---|---|"]
           + [f"| {r['claim']} | {r['paper']} | {r['measured']} | {r['criterion']} | **{r['verdict']}** |"
              for r in rows])
    tried = [(r, t) for r in rows for t in r["also_tried"]]
    if tried:
        out += ["", "### Also tried", "",
                "Other settings run for the claims above (the row shows the setting declared first, unless it says "
                "otherwise):", ""]
        out += [f"- *{r['claim']}* — {t['setting']}: {t['measured']} → **{t['verdict']}**"
                + (f" ({t['note']})" if t.get("note") else "") for r, t in tried]
    return out


def write_report(out: Path, budget: str, lines: list[str], data: dict) -> Path:
    """``REPORT.md`` for the full budget (``REPORT_<budget>.md`` otherwise) and its JSON (``data`` + the budget)."""
    name = "REPORT.md" if budget == "full" else f"REPORT_{budget}.md"
    out.mkdir(parents=True, exist_ok=True)
    if SETTING:
        lines = lines[:1] + ["", f"**Setting:** {SETTING} (the text below names the defaults where it differs)."] + lines[1:]
        data = {**data, "setting": SETTING}
    (out / name).write_text("\n".join(lines) + "\n")
    (out / name.replace(".md", ".json")).write_text(json.dumps({"budget": budget, **data}, indent=1) + "\n")
    return out / name


SETTING: str | None = None  # what reproduce.py was given beyond the defaults (data, model size); in every report


def corpus_view(train: str, dev: str, test: str, tokenizer: str, root: Path) -> Path:
    """A corpus folder made of the user's NeMo manifests and tokenizer, as the studies read a ``make-corpus`` one:
    ``{train,dev,test}_manifest.json`` (rows in their order, audio paths made absolute: a relative one is resolved
    against its manifest's folder, as NeMo does, and every file is checked), ``tokenizer/`` (a link) and a
    ``corpus_info.json`` naming the sources. Its folder name hashes the sources, so other data never reuses runs."""
    import hashlib

    from nemo_layerfx.evaluate import read_manifest

    sources = {"train": str(Path(train).resolve()), "dev": str(Path(dev).resolve()),
               "test": str(Path(test).resolve()), "tokenizer": str(Path(tokenizer).resolve())}
    if not (Path(tokenizer) / "tokenizer.model").is_file() and not (Path(tokenizer) / "vocab.txt").is_file():
        raise FileNotFoundError(f"--tokenizer {tokenizer}: no tokenizer.model (SentencePiece) or vocab.txt in it")
    out = Path(root) / ("data_" + hashlib.sha1(json.dumps(sources, sort_keys=True).encode()).hexdigest()[:10])
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        read_manifest(sources[split])  # every line and audio file checked, named if bad
        rows = [json.loads(line) for line in Path(sources[split]).read_text().splitlines() if line.strip()]
        base = Path(sources[split]).parent
        for r in rows:
            r["audio_filepath"] = str((base / r["audio_filepath"]).resolve())
        (out / f"{split}_manifest.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    link = out / "tokenizer"
    if not link.exists():
        link.symlink_to(sources["tokenizer"], target_is_directory=True)
    (out / "corpus_info.json").write_text(json.dumps({"sources": sources}, indent=2) + "\n")
    return out


def ensure_corpus(corpus: str) -> None:
    """Quiet NeMo's logging and synthesize the default offline corpus into ``corpus`` if it has none yet."""
    from nemo.utils import logging

    from nemo_layerfx.corpus import CorpusConfig, make_corpus

    logging.setLevel(logging.ERROR)
    if not (Path(corpus) / "corpus_info.json").is_file():
        make_corpus(CorpusConfig(out=corpus), progress=True)


def benchmark_results(name: str) -> dict | None:
    """``benchmarks/results/<name>.json`` (a benchmark's ratios, machine and versions), or None where it has not run."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None
