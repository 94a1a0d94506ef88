"""One command per paper: run (or reuse) every study behind its claims and write
``experiments/results/<paper>/REPORT.md``, a row per claim: what the paper says, what we measured, and whether that
reproduces, refutes or is inconclusive about it.

    python experiments/reproduce.py zhou|tian|kubo|fernandez-lopez [--budget small|full] [--device cpu|cuda] [--corpus data/commands]

Budgets: ``smoke`` (the tests: minutes, numbers mean nothing), ``small`` (one seed: 30–75 minutes on a 2-core CPU,
each paper's module says), ``full`` (what the README quotes: all seeds). Every run is kept on disk and reused, so a
stopped reproduction resumes where it stopped. A paper is a module ``repro/<name>.py`` with
``run(args) -> Path`` (the report it wrote).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAPERS = {"zhou": "repro.zhou", "tian": "repro.tian", "kubo": "repro.kubo", "fernandez-lopez": "repro.fernandez_lopez"}


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("paper", choices=sorted(PAPERS))
    p.add_argument("--budget", default="small", choices=["smoke", "small", "full"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--corpus", default="data/commands", help="a corpus made by layerfx make-corpus (made if missing)")
    p.add_argument("--out", default=str(HERE / "results"), help="results root; the report goes to <out>/<paper>/")
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    report = importlib.import_module(PAPERS[args.paper]).run(args)
    print(f"report: {report}")
    return report


if __name__ == "__main__":
    main()
