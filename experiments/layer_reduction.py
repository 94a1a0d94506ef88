"""Tian et al.'s layer-reduction claims at small scale: shared (PSS) vs unshared layers, fixed depth 8 vs depth
sampled from U(2, 8), supervised CTC on the offline corpus, over seeds.

Four models per seed, same data, steps and seed: unshared fixed 8, shared fixed 8, shared U(2, 8), unshared
U(2, 8). For each: parameters, training time per epoch, WER and loss at every inference depth 1..8 in one pass
(``depth_sweep``, on dev + test) and the layer-consistency curves (L2 distance and cosine similarity of consecutive
layers' outputs). Claims checked: PSS costs a little WER; with PSS + U(2, 8) the WER stays flat across inference
depths 5-8 while the other models degrade when cut; sampled depth trains in about 40 % less time. Finished runs
are kept (``result.json``) and skipped, so a stopped study resumes; ``--summarize`` rewrites the tables only.

    python experiments/layer_reduction.py --corpus data/commands --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch
from nemo.utils import logging

import nemo_layerfx
from study import finished_runs, mean_sd
from nemo_layerfx.depth import depth_sweep
from nemo_layerfx.models import count_params
from nemo_layerfx.train import compose_config, train

ARMS = {  # name -> (share_layers, sampled depth)
    "unshared fixed": (None, False),
    "shared fixed": (1, False),
    "shared U(2,8)": (1, True),
    "unshared U(2,8)": (None, True),
}


def slug(arm: str) -> str:
    return arm.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "-")


def eval_manifest(corpus: Path, out: Path) -> Path:
    """dev + test of the corpus as one manifest (more words per WER: about 1,200)."""
    path = out / "dev_test_manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for split in ("dev", "test"):
        for line in (corpus / f"{split}_manifest.json").read_text().splitlines():
            r = json.loads(line)
            r["audio_filepath"] = str((corpus / r["audio_filepath"]).resolve())
            rows.append(json.dumps(r))
    path.write_text("\n".join(rows) + "\n")
    return path


def runs_dir(args: argparse.Namespace, out: Path) -> Path:
    """Where the study's runs live; ``args.tag`` (if any) keeps a smaller model's runs apart."""
    return out / "runs" / f"layer_reduction_L{args.layers}{getattr(args, 'tag', '')}"


def run_arm(args: argparse.Namespace, arm: str, seed: int, out: Path, manifest: Path,
            extra: Sequence[str] = ()) -> dict:
    """Train one arm (``extra``: more config overrides, e.g. a smaller model), sweep its depths; kept on disk."""
    run = runs_dir(args, out) / f"{slug(arm)}_seed{seed}"
    if (run / "result.json").is_file():
        return json.loads((run / "result.json").read_text())
    run.mkdir(parents=True, exist_ok=True)
    share, sampled = ARMS[arm]
    over = [f"corpus_dir={args.corpus}", f"model.encoder.n_layers={args.layers}", f"layerfx.seed={seed}",
            f"trainer.max_epochs={args.epochs}", f"trainer.accelerator={getattr(args, 'device', 'cpu')}",
            "layerfx.report_wer=false",
            f"exp_manager.exp_dir={run / 'exp'}", "exp_manager.create_checkpoint_callback=false"]
    if share is not None:
        over.append(f"+model.encoder.share_layers={share}")
    if sampled:
        over += [f"+model.encoder.depth_sampling={{low: 2, high: {args.layers}, seed: {seed}}}",
                 "+trainer.callbacks=[{_target_: nemo_layerfx.depth.DepthSampling}]"]
    over += list(extra)
    t0 = time.perf_counter()
    model = train(compose_config("conformer_gn_tiny", over))
    seconds = time.perf_counter() - t0
    sweep = depth_sweep(model, manifest)
    sweep.to_json(run / "depth_sweep.json")
    enc = model.encoder
    result = {"arm": arm, "seed": seed, "epochs": args.epochs, "params": count_params(model),
              "encoder_params": count_params(enc), "train_seconds": seconds, "steps": int(model.trainer.global_step),
              "wer": sweep.wer, "loss": sweep.loss, "l2": sweep.l2, "cosine": sweep.cosine}
    (run / "result.json").write_text(json.dumps(result) + "\n")
    print(f"{arm} seed {seed}: WER by depth {' '.join(f'{w:.3f}' for w in sweep.wer)}, {seconds:.0f} s", flush=True)
    return result


def summarize(args: argparse.Namespace, out: Path) -> str:
    by_arm, seeds = finished_runs(runs_dir(args, out), ARMS)
    n = args.layers
    lines = [f"# Layer reduction ({n} layers, supervised CTC, offline command corpus)", "",
             f"nemo_layerfx {nemo_layerfx.__version__}, torch {torch.__version__}, {platform.machine()} CPU; tiny "
             f"GroupNorm Conformer-CTC preset (d_model 144) at {n} layers, {args.epochs} epochs, seeds {seeds}; WER "
             "on dev + test (236 utterances) at every inference depth from one sweep. ± is the standard deviation "
             "over seeds. Training times are wall-clock on a shared 2-core machine (see "
             "benchmarks/results/layer_reduction_cpu.md for interleaved step-time ratios).", "",
             "| model | parameters | train s / epoch | " + " | ".join(f"WER @{m}" for m in range(1, n + 1)) + " |",
             "|---|---|---|" + "---|" * n]
    for arm, rs in by_arm.items():
        if not rs:
            continue
        rs = list(rs.values())
        lines.append(f"| {arm} | {rs[0]['params']:,} | "
                     f"{statistics.mean(r['train_seconds'] / r['epochs'] for r in rs):.0f} | "
                     + " | ".join(mean_sd([r["wer"][m] for r in rs]) for m in range(n)) + " |")
    lines += ["", "Paired within seed:", "", "| comparison | mean ± sd | per seed |", "|---|---|---|"]

    def paired(name, f):
        common = sorted(set.intersection(*[set(by_arm[a]) for a in ARMS if by_arm[a]])) if seeds else []
        if not common:
            return
        d = [f(s) for s in common]
        lines.append(f"| {name} | {mean_sd(d)} | {' '.join(f'{x:+.3f}' for x in d)} |")

    full = n - 1
    paired("WER@8: shared fixed − unshared fixed (PSS cost)",
           lambda s: by_arm["shared fixed"][s]["wer"][full] - by_arm["unshared fixed"][s]["wer"][full])
    paired("WER@8: shared U(2,8) − unshared fixed",
           lambda s: by_arm["shared U(2,8)"][s]["wer"][full] - by_arm["unshared fixed"][s]["wer"][full])
    for arm in ARMS:
        paired(f"{arm}: max − min WER over depths 5..{n}",
               lambda s, arm=arm: max(by_arm[arm][s]["wer"][4:]) - min(by_arm[arm][s]["wer"][4:]))
        paired(f"{arm}: WER@5 − WER@{n} (SLI(5) cost)",
               lambda s, arm=arm: by_arm[arm][s]["wer"][4] - by_arm[arm][s]["wer"][full])
    paired("time per epoch: shared U(2,8) / unshared fixed",
           lambda s: by_arm["shared U(2,8)"][s]["train_seconds"] / by_arm["unshared fixed"][s]["train_seconds"])
    lines += ["", "Layer consistency (mean over seeds; pair (l-1, l) of consecutive layer outputs, valid frames):", "",
              "| model | measure | " + " | ".join(f"({m - 1},{m})" for m in range(2, n + 1)) + " |",
              "|---|---|" + "---|" * (n - 1)]
    for arm, rs in by_arm.items():
        if rs:
            for key in ("l2", "cosine"):
                vals = [statistics.mean(r[key][k] for r in rs.values()) for k in range(n - 1)]
                lines.append(f"| {arm} | {key} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    text = "\n".join(lines) + "\n"
    stem = runs_dir(args, out).name
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(by_arm, indent=1) + "\n")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--summarize", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    logging.setLevel(logging.ERROR)
    out = Path(args.out)
    manifest = eval_manifest(Path(args.corpus), runs_dir(args, out))
    if not args.summarize:
        for seed in args.seeds:
            for arm in ARMS:
                run_arm(args, arm, seed, out, manifest)
    print(summarize(args, out))


if __name__ == "__main__":
    main()
