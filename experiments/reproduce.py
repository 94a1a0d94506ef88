"""One command per paper: run (or reuse) every study behind its claims and write a report, a row per claim: what
the paper says, what we measured, and whether that reproduces, refutes or is inconclusive about it.

    python experiments/reproduce.py zhou|tian|kubo|fernandez-lopez [--budget smoke|small|full] [--corpus DIR]
    python experiments/reproduce.py tian --train train.json --dev dev.json --test test.json --tokenizer tok/ --size M

Budgets: ``smoke`` (the tests: minutes, the numbers mean nothing), ``small`` (one seed: 30-75 minutes on a 2-core
CPU with the tiny preset, each paper's module says), ``full`` (every seed: what the reports in
experiments/results quote, several hours on a 2-core CPU). Every run is kept on disk and reused, so a stopped
reproduction resumes where it stopped.

Data: the offline corpus (``--corpus``, made if missing), or your own NeMo manifests and tokenizer (``--train``,
``--dev``, ``--test``, ``--tokenizer``; Zhou's Table 3 also needs a ``speaker`` field, its clients). Model size:
the tiny preset's width (d_model 144) or NeMo's Conformer S / M / L (d_model 176 / 256 / 512, kernel 31); the depth
is each paper's. Results go to experiments/results for the defaults, else to a folder of their own under runs/
(``--out`` to choose), so runs on other data or sizes never mix with the committed ones.

Devices: ``--devices N`` trains every run on N devices with DDP (N processes on a CPU), each device taking 1/N of
the global batch; the other ranks are started by Lightning running this command again, and all ranks go through
the same runs in the same order.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAPERS = {"zhou": "repro.zhou", "tian": "repro.tian", "kubo": "repro.kubo", "fernandez-lopez": "repro.fernandez_lopez"}
SIZES = {  # NeMo's Conformer-CTC sizes (conformer_ctc_bpe.yaml): width, heads, front-end channels, conv kernel
    "tiny": [],
    "S": ["model.encoder.d_model=176", "model.encoder.n_heads=4", "model.encoder.subsampling_conv_channels=176",
          "model.encoder.conv_kernel_size=31"],
    "M": ["model.encoder.d_model=256", "model.encoder.n_heads=4", "model.encoder.subsampling_conv_channels=256",
          "model.encoder.conv_kernel_size=31"],
    "L": ["model.encoder.d_model=512", "model.encoder.n_heads=8", "model.encoder.subsampling_conv_channels=512",
          "model.encoder.conv_kernel_size=31"],
}
DATA = ("train", "dev", "test", "tokenizer")
# the runs behind each paper's full report, under experiments/results ({seed}: a seed's runs only)
RUNS = {"zhou": ("zhou/full/runs/*_seed{seed}/done.json", "runs/fd_L8*_seed{seed}/result.json"),
        "tian": ("runs/layer_reduction_L8/*_seed{seed}/result.json",),
        "kubo": ("runs/adaptive_dropout_L8/*_seed{seed}/result.json",
                 "runs/adaptive_dropout_L8_e18/dense_seed{seed}/result.json",
                 "runs/adaptive_dropout_L8_e18_k0.85_c16/*_seed{seed}/result.json"),
        "fernandez-lopez": ("runs/lowrank_L8/*_seed{seed}/result.json",)}


def measured_costs(results: Path = HERE / "results") -> list[str]:
    """What each budget's committed runs took to train, summed from their result files (the help's epilog)."""
    import json

    lines = ["measured cost of the committed full-budget runs (training time summed over runs; 2 CPU cores, often "
             "with other work beside them, so an idle machine is faster); small trains about the seed-0 share:"]
    for paper, patterns in RUNS.items():
        cost = {}
        for budget, seed in (("small", "0"), ("full", "*")):
            files = {f for pat in patterns for f in results.glob(pat.format(seed=seed))}
            seconds = [json.loads(f.read_text()) for f in files]
            seconds = [r.get("seconds", r.get("train_seconds", 0.0)) for r in seconds]
            cost[budget] = f"{len(files)} runs, {sum(seconds) / 3600:.1f} h" if files else "not run here"
        lines.append(f"  {paper:<16} seed 0: {cost['small']}; all seeds: {cost['full']}")
    lines.append("  smoke (any paper): a few minutes; the tests run it. A report regenerates from the runs on disk "
                 "in under a minute.")
    return lines


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reproduce.py", description=__doc__, epilog="\n".join(measured_costs()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paper", choices=sorted(PAPERS))
    p.add_argument("--budget", default="small", choices=["smoke", "small", "full"],
                   help="smoke: the tests' (minutes, the numbers mean nothing); small: one seed; full: every seed, "
                        "what the committed reports are (costs below)")
    p.add_argument("--corpus", default="data/commands", help="a corpus made by layerfx make-corpus (made if missing)")
    for split in DATA:
        p.add_argument(f"--{split}", default=None,
                       help=f"your own {'tokenizer folder' if split == 'tokenizer' else split + ' NeMo manifest'} "
                            "(give all four instead of --corpus)")
    p.add_argument("--size", default="tiny", choices=list(SIZES), help="model width: the tiny preset or NeMo's S/M/L")
    p.add_argument("--accelerator", "--device", dest="device", default="cpu", choices=["cpu", "cuda", "gpu"],
                   help="where the models train")
    p.add_argument("--devices", type=int, default=1,
                   help="train every run on N devices (DDP; N processes on a CPU) at the preset's global batch: "
                        "each device takes batch / N (N must divide it)")
    p.add_argument("--out", default=None, help="results root (default: experiments/results for the offline corpus "
                                               "and the tiny size, else runs/reproduce/<size>_<data>)")
    return p


def device_overrides(devices: int) -> list[str]:
    """Config overrides that train each run on ``devices`` devices at the preset's global batch (DDP).

    Lightning starts the other ranks by running this command again; every rank goes through the same runs in the
    same order (what is on disk decides which runs are left, and the ranks start together at the first fit), the
    trainings are collective, and the work after a fit (sweeps, probes, reports) runs on every rank with the same
    weights and writes the same files."""
    if devices < 1:
        raise SystemExit(f"reproduce.py: error: --devices {devices}: must be >= 1")
    if devices == 1:
        return []
    from nemo_layerfx.train import compose_config

    batch = int(compose_config("conformer_gn_tiny").model.train_ds.batch_size)
    if batch % devices:
        raise SystemExit(f"reproduce.py: error: --devices {devices} must divide the global batch {batch} (each "
                         f"device takes an equal share)")
    return [f"trainer.devices={devices}", "trainer.strategy=ddp", f"model.train_ds.batch_size={batch // devices}"]


def main(argv: list[str] | None = None) -> Path:
    args = parser().parse_args(argv)
    given = [s for s in DATA if getattr(args, s)]
    if given and len(given) < len(DATA):
        raise SystemExit(f"reproduce.py: error: your own data needs all of --train, --dev, --test, --tokenizer "
                         f"(missing: {', '.join('--' + s for s in DATA if s not in given)})")
    sys.path.insert(0, str(HERE))
    import study

    custom = bool(given) or args.size != "tiny" or args.devices > 1  # the committed results are 1-device runs
    root = Path(args.out) if args.out else (HERE / "results" if not custom else None)
    if given:
        args.corpus = str(study.corpus_view(args.train, args.dev, args.test, args.tokenizer,
                                            root or Path("runs/reproduce")))
    if root is None:
        root = Path("runs/reproduce") / (f"{args.size}_{Path(args.corpus).name}"
                                          + (f"_{args.devices}dev" if args.devices > 1 else ""))
    args.out = str(root)
    if custom:
        study.SETTING = (f"model size {args.size}" + (f" ({', '.join(o.split('.')[-1] for o in SIZES[args.size])})"
                                                       if SIZES[args.size] else "")
                         + (f"; data: {args.train}, {args.dev}, {args.test}, tokenizer {args.tokenizer}" if given
                            else f"; data: {args.corpus}"))
    if args.size != "tiny" and args.paper == "kubo":
        raise SystemExit("reproduce.py: error: --size: Kubo's baselines (Shallow, Narrow, NarrowFFN, NoMacaron) are "
                         "presets of the tiny width; only --size tiny is supported for kubo")
    # every study the paper's module trains takes these after its budget's own overrides (smoke keeps its own
    # shrunken model: the tests' budget)
    args.model_overrides = (SIZES[args.size] if args.budget != "smoke" else []) + device_overrides(args.devices)
    if args.devices > 1:
        study.SETTING = (study.SETTING + "; " if study.SETTING else "") + f"{args.devices} devices (DDP) per run"
    report = importlib.import_module(PAPERS[args.paper]).run(args)
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":  # one line, not N
        print(f"report: {report}")
    return report


if __name__ == "__main__":
    main()
