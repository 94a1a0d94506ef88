"""Stability of layer importance across seeds and model depths (Zhou et al.'s stability study, at small scale).

Trains the tiny GroupNorm preset at each depth in ``--layers`` with each seed in ``--seeds`` (the
LayerImportanceCallback snapshots step 0 and probes at fit end, re-init and re-rand per block), probes each
trained model once more per module, then compares the rankings with ``compare_reports``: within a depth across
seeds (Spearman of the per-unit WER changes, overlap of the n most ambient), and across depths by relative
position. Reports already in ``--out`` are kept and included, so depths can be run in separate calls.

    python experiments/stability.py --corpus data/commands --layers 4 8 --seeds 0 1 2 --out experiments/results
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import nemo_layerfx
from nemo.utils import logging
from nemo_layerfx.callbacks import LayerImportanceCallback
from nemo_layerfx.importance import ProbeConfig, compare_reports, probe
from nemo_layerfx.train import compose_config, train


def run_one(args: argparse.Namespace, layers: int, seed: int, out: Path) -> None:
    run = out / "runs" / f"L{layers}_seed{seed}"
    cb = LayerImportanceCallback(out_dir=str(run), at_fit_end=True, modes=["reinit", "rerand"], draws=args.draws,
                                 batch_variants=args.batch_variants, seed=seed)
    cfg = compose_config("conformer_gn_tiny", [
        f"corpus_dir={args.corpus}", f"model.encoder.n_layers={layers}", f"layerfx.seed={seed}",
        f"trainer.max_epochs={args.epochs}", f"trainer.accelerator={args.accelerator}",
        f"exp_manager.exp_dir={run / 'exp'}", "exp_manager.create_checkpoint_callback=false",
        f"model.train_ds.num_workers={args.workers}", f"model.validation_ds.num_workers={args.workers}"])
    t0 = time.perf_counter()
    model = train(cfg, extra_callbacks=[cb])
    block = json.loads(next(run.glob("probe_step*.json")).read_text())
    module = probe(model, Path(args.corpus) / "dev_manifest.json",
                   ProbeConfig(modes=("reinit", "rerand"), unit="module", draws=args.draws, seed=seed,
                               batch_variants=args.batch_variants), init=cb.snapshot)
    (run / "block.json").write_text(json.dumps(block, indent=2) + "\n")
    module.to_json(run / "module.json")
    print(f"L{layers} seed {seed}: dev WER {block['baseline_wer']:.3f}, {time.perf_counter() - t0:.0f} s", flush=True)


def summarize(out: Path, top_n: int) -> str:
    runs = sorted((out / "runs").glob("L*_seed*"), key=lambda p: (int(p.name[1:].split("_")[0]), p.name))
    reports = {p.name: {u: json.loads((p / f"{u}.json").read_text()) for u in ("block", "module")}
               for p in runs if (p / "module.json").is_file()}
    depths = sorted({int(n[1:].split("_")[0]) for n in reports})
    lines = ["# Layer-importance stability (GroupNorm tiny preset, offline command corpus)", "",
             f"nemo_layerfx {nemo_layerfx.__version__}, torch {torch.__version__}, {platform.machine()}"
             + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", CPU"), "",
             "## Runs (dev WER and per-block WER change, re-rand / re-init)", "",
             "| run | dev WER | re-rand ΔWER per block | re-init ΔWER per block | most ambient module (re-rand) |",
             "|---|---|---|---|---|"]
    for name, r in reports.items():
        b, m = r["block"], r["module"]
        fmt = lambda xs: " ".join(f"{x:+.3f}" for x in xs)  # noqa: E731
        amb = min(range(len(m["units"])), key=lambda k: m["delta_wer"]["rerand"][k])
        lines.append(f"| {name} | {b['baseline_wer']:.3f} | {fmt(b['delta_wer']['rerand'])} | "
                     f"{fmt(b['delta_wer']['reinit'])} | {m['units'][amb]} |")
    summary: dict = {}
    lines += ["", "## Agreement across seeds (same depth)", "",
              "| depth | unit | mode | mean Spearman | mean top-2 ambient overlap | pairs |", "|---|---|---|---|---|---|"]
    for depth in depths:
        group = [r for n, r in reports.items() if n.startswith(f"L{depth}_")]
        if len(group) < 2:
            continue
        for unit in ("block", "module"):
            for mode in ("rerand", "reinit"):
                c = compare_reports([g[unit] for g in group], mode=mode, top_n=top_n)
                summary[f"L{depth}/{unit}/{mode}"] = c
                lines.append(f"| {depth} | {unit} | {mode} | {c['mean_spearman']:.2f} | {c['mean_overlap']:.2f} | "
                             f"{len(c['pairs'])} |")
    if len(depths) > 1:
        lines += ["", "## Agreement across depths (relative position of the ambient blocks)", "",
                  "| mode | mean top-2 ambient overlap (by depth quintile) |", "|---|---|"]
        for mode in ("rerand", "reinit"):
            c = compare_reports([r["block"] for r in reports.values()], mode=mode, top_n=top_n)
            cross = [p for p in c["pairs"] if not p["same_units"]]
            value = sum(p[f"top{top_n}_ambient_overlap"] for p in cross) / len(cross)
            summary[f"cross_depth/{mode}"] = {"pairs": cross, "mean_overlap": value}
            lines.append(f"| {mode} | {value:.2f} |")
    (out / "stability.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = "\n".join(lines) + "\n"
    (out / "stability.md").write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True)
    p.add_argument("--layers", nargs="+", type=int, default=[4, 8])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--batch-variants", type=int, default=1)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--top-n", type=int, default=2)
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    logging.setLevel(logging.ERROR)
    out = Path(args.out)
    if not args.summary_only:
        for layers in args.layers:
            for seed in args.seeds:
                run_one(args, layers, seed, out)
    print(summarize(out, args.top_n))


if __name__ == "__main__":
    main()
