"""Write the results the READMEs quote from the reports' JSON, so no figure is copied by hand.

README.md and experiments/README.md hold blocks between ``<!-- render:NAME -->`` and ``<!-- /render:NAME -->``; this
script fills them from ``experiments/results/<paper>/REPORT.json`` (the ``full`` budget's reports):

    python experiments/render.py           # rewrite the blocks
    python experiments/render.py --check   # exit 1 if a block differs from what the reports say (tests do this)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
PAPERS = {"zhou": "Zhou et al. 2021 (layer importance, federated dropout)",
          "tian": "Tian et al. 2021 (shared layers, sampled depth)",
          "kubo": "Kubo et al. 2024 (adaptive-dropout pruning)",
          "fernandez-lopez": "Fernandez-Lopez et al. 2025 (low rank)"}
DOCS = (REPO / "README.md", REPO / "experiments" / "README.md")
BLOCK = re.compile(r"(<!-- render:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /render:(?P=name) -->)", re.S)


def claims(paper: str) -> list[dict]:
    return json.loads((RESULTS / paper / "REPORT.json").read_text())["claims"]


def outcome(verdict: str) -> str:
    """The verdict's class: reproduced, refuted, inconclusive, or judged by another criterion."""
    for word in ("reproduced", "refuted", "inconclusive"):
        if verdict.startswith(word):
            return word
    return "other"


def summary(link_prefix: str) -> list[str]:
    """A row per paper: its report and how many claims came out which way."""
    out = ["| paper | report | reproduced | refuted | inconclusive | judged otherwise |", "|---|---|---|---|---|---|"]
    for paper, title in PAPERS.items():
        counts = {k: 0 for k in ("reproduced", "refuted", "inconclusive", "other")}
        for row in claims(paper):
            counts[outcome(row["verdict"])] += 1
        out.append(f"| {title} | [REPORT.md]({link_prefix}{paper}/REPORT.md) | "
                   + " | ".join(str(v) for v in counts.values()) + " |")
    return out


def verdicts(paper: str) -> list[str]:
    """Every claim of a paper's report with its verdict and criterion (the figures are in the report)."""
    out = ["| claim | criterion | verdict |", "|---|---|---|"]
    for row in claims(paper):
        out.append(f"| {row['claim']} | {row['criterion']} | {row['verdict']} |")
        out += [f"| ↳ also tried: {t['setting']} | | {t['verdict']} |" for t in row.get("also_tried", [])]
    return out


# LibriSpeech 960 h: 281,241 training utterances (12.3 s on average)
LIBRISPEECH = {"utterances": 281_241, "hours": 960.9}


def librispeech_cost(bench: Path = REPO / "benchmarks" / "results" / "encoder_step_cuda_large.json") -> list[str]:
    """What ``reproduce.py tian --budget full --size L`` would cost on LibriSpeech 960 h on one GPU, from the measured
    Conformer-L encoder step (the computation is spelled out in the text it returns)."""
    b = json.loads(bench.read_text())
    cfg, step = b["config"], b["median_s"]["layerfx_group_norm"]
    padded = (100 + 300 * cfg["batch"] / (cfg["batch"] + 1)) / 100  # E[longest of the batch] of U{1..4 s}, seconds
    mean = LIBRISPEECH["hours"] * 3600 / LIBRISPEECH["utterances"]
    layers, epochs, arms, seeds = 8, 12, 4, 3  # Tian's depth; the full budget: 12 epochs, 4 models, 3 seeds
    per_step = step / cfg["layers"] * layers * mean / padded
    steps = epochs * -(-LIBRISPEECH["utterances"] // cfg["batch"])
    hours = arms * seeds * steps * per_step / 3600
    return [f"Estimated cost, computed from measured step times: one step of our Conformer-L encoder (d_model "
            f"{cfg['d_model']}, {cfg['layers']} layers, forward and backward, batch {cfg['batch']} padded to about "
            f"{padded:.1f} s) took {step:.2f} s on an {b['device_name']} "
            f"([encoder_step_cuda_large.json](benchmarks/results/encoder_step_cuda_large.json)). Scaled to Tian's "
            f"{layers} layers and to LibriSpeech's {mean:.1f}-s average utterance (linear in length, so a lower "
            f"bound: attention grows faster), a step costs about {per_step:.2f} s; the full budget is {arms} models × "
            f"{seeds} seeds × {epochs} epochs of {steps // epochs:,} steps, about **{hours:.0f} GPU-hours** on one "
            f"such GPU for the encoder alone (the decoder, the loss, data loading and the sweeps come on top; the "
            f"sampled-depth models run fewer layers per step)."]


def blocks(doc: Path) -> dict[str, list[str]]:
    """What each block of ``doc`` should hold."""
    prefix = "experiments/results/" if doc.name == "README.md" and doc.parent == REPO else "results/"
    out = {"summary": summary(prefix), "librispeech-cost": librispeech_cost()}
    out.update({f"verdicts-{p}": verdicts(p) for p in PAPERS})
    return out


def render(doc: Path) -> str:
    text, want = doc.read_text(), blocks(doc)

    def fill(m: re.Match) -> str:
        if m["name"] not in want:
            raise ValueError(f"{doc}: unknown render block {m['name']!r}")
        return m.group(1) + "\n".join(want[m["name"]]) + "\n" + m.group(4)

    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only check; exit 1 if a block is out of date")
    args = p.parse_args(argv)
    stale = []
    for doc in DOCS:
        new = render(doc)
        if new != doc.read_text():
            stale.append(doc)
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        print(f"out of date: {', '.join(str(d.relative_to(REPO)) for d in stale)} (run python experiments/render.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
