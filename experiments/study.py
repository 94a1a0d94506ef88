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


VERDICT_RULE = ("A verdict is *reproduced* or *refuted* only when the effect has the paper's (or the opposite) sign "
                "in every seed and its mean exceeds twice its standard error; otherwise *inconclusive*. ± is the "
                "standard deviation over seeds.")


def paired(by_arm: dict[str, dict[int, dict]], arm: str, ref: str,
           key: str = "test_wer") -> tuple[list[int], list[float]]:
    """The seeds both arms ran and, per seed, ``arm``'s ``key`` minus ``ref``'s (a within-seed paired difference)."""
    seeds = sorted(set(by_arm[arm]) & set(by_arm[ref]))
    return seeds, [by_arm[arm][s][key] - by_arm[ref][s][key] for s in seeds]


def split_sizes(corpus: str | Path) -> tuple[int, int]:
    """Utterances in the corpus's dev and test manifests (what a study's WERs are measured on)."""
    return tuple(sum(1 for line in (Path(corpus) / f"{split}_manifest.json").read_text().splitlines() if line.strip())
                 for split in ("dev", "test"))


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


def claims_table(rows: list[dict]) -> list[str]:
    """The report's table: a row per claim (what the paper says, what we measured, the verdict)."""
    return (["| claim | paper says | we measured | verdict |", "|---|---|---|---|"]
            + [f"| {r['claim']} | {r['paper']} | {r['measured']} | **{r['verdict']}** |" for r in rows])


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
