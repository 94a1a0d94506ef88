"""Fernandez-Lopez et al.'s low-rank claims at small scale: full rank vs LR-SMS, uniform α, SVD vs Kaiming init,
a reversed ramp and a probe-ordered rank map, all trained from scratch on the offline corpus, over seeds.

Arms (every low-rank arm has the same encoder size as LR-SMS, except ``uniform``, matched as closely as a single
α allows):

- ``full``: the dense GroupNorm Conformer-CTC (tiny preset at ``--layers``);
- ``lrsms``: MHSA ramp [0.1, 0.2], FFN ramp [0.2, 0.5], SVD (spectral) init: the paper's LR-SMS;
- ``kaiming``: the same ranks, U and Vᵀ drawn directly (the paper's init ablation);
- ``uniform``: one α for MHSA and FFN in every block, matched to LR-SMS's encoder parameter count;
- ``reversed``: LR-SMS's per-block α values in the opposite order (rank falls with depth): equal size;
- ``probe``: LR-SMS's α values ordered by the same seed's full-rank model's re-rand probe (most ambient block
  gets the smallest): equal size (beyond the paper).

Per run: dev and test WER at the end (greedy), training loss per step, dev WER per epoch, wall time, parameters.
Per full-rank model: the fraction of singular values holding 95 % of each linear's energy, per block (Figs. 1, 3).
Finished runs are kept (``result.json``) and skipped, so a stopped study resumes; ``--summarize`` only rewrites
the tables.

    python experiments/lowrank.py --corpus data/commands --layers 8 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import bisect
import functools
import json
import math
import platform
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from nemo.utils import logging

import nemo_layerfx
from study import finished_runs, mean_sd, paired, split_sizes
from nemo_layerfx.callbacks import LossHistory
from nemo_layerfx.evaluate import evaluate_wer
from nemo_layerfx.importance import ProbeConfig, probe
from nemo_layerfx.lowrank import alphas_from_report, block_alphas, energy_profile
from nemo_layerfx.models import count_params
from nemo_layerfx.train import compose_config, model_class, train

ATT, FFN = [0.1, 0.2], [0.2, 0.5]
ARMS = ("full", "lrsms", "kaiming", "uniform", "reversed", "probe")


class DevWER(pl.Callback):
    """Dev WER after every validation (NeMo logs val_wer); kept in memory for the run's result."""

    def __init__(self) -> None:
        self.history: list[dict] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "val_wer" in trainer.callback_metrics:
            self.history.append({"step": trainer.global_step, "val_wer": float(trainer.callback_metrics["val_wer"])})


def base_overrides(args: argparse.Namespace, run: Path, seed: int) -> list[str]:
    return [f"corpus_dir={args.corpus}", f"model.encoder.n_layers={args.layers}", f"layerfx.seed={seed}",
            f"trainer.max_epochs={args.epochs}", f"trainer.accelerator={getattr(args, 'device', 'cpu')}",
            "layerfx.report_wer=false", f"exp_manager.exp_dir={run / 'exp'}",
            "exp_manager.create_checkpoint_callback=false", *getattr(args, "model", ())]


def runs_dir(args: argparse.Namespace, out: Path) -> Path:
    """Where the study's runs live; ``args.tag`` (if any) keeps a smaller model's runs apart."""
    return out / "runs" / f"lowrank_L{args.layers}{getattr(args, 'tag', '')}"


def encoder_params(args: argparse.Namespace, low_rank: dict | None) -> int:
    over = [f"corpus_dir={args.corpus}", f"model.encoder.n_layers={args.layers}", *getattr(args, "model", ())]
    if low_rank:
        over.append("+model.encoder.low_rank=" + json.dumps(low_rank).replace('"', ""))
    cfg = compose_config("conformer_gn_tiny", over)
    return count_params(model_class(cfg)(cfg=cfg.model).encoder)


def matched_uniform(args: argparse.Namespace, target: int) -> float:
    """The uniform α (both groups, steps of 0.005 in [0.05, 0.6]) whose encoder size is closest to ``target``.
    Sizes grow with α, so a bisection finds the first α at or above the target; it or the step below is closest."""
    grid = [a / 200 for a in range(10, 121)]
    size = functools.cache(lambda a: encoder_params(args, {"att": a, "ffn": a}))
    i = bisect.bisect_left(range(len(grid)), target, key=lambda j: size(grid[j]))
    return min(grid[max(0, i - 1):i + 1], key=lambda a: abs(size(a) - target))


def arm_config(args: argparse.Namespace, arm: str, out: Path, seed: int) -> dict | None:
    n = args.layers
    if arm == "full":
        return None
    if arm == "lrsms":
        return {"att": ATT, "ffn": FFN}
    if arm == "kaiming":
        return {"att": ATT, "ffn": FFN, "init": "kaiming"}
    if arm == "reversed":
        return {"att": {"alphas": block_alphas(ATT, n)[::-1]}, "ffn": {"alphas": block_alphas(FFN, n)[::-1]}}
    if arm == "uniform":
        cache = out / f"uniform_alpha_L{n}{getattr(args, 'tag', '')}.json"
        if not cache.is_file():
            target = encoder_params(args, {"att": ATT, "ffn": FFN})
            cache.write_text(json.dumps({"alpha": matched_uniform(args, target), "target": target}) + "\n")
        a = json.loads(cache.read_text())["alpha"]
        return {"att": a, "ffn": a}
    if arm == "probe":
        report = runs_dir(args, out) / f"full_seed{seed}" / "probe.json"
        return {"att": {"alphas": alphas_from_report(report, *ATT)}, "ffn": {"alphas": alphas_from_report(report, *FFN)}}
    raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")


def run_arm(args: argparse.Namespace, arm: str, seed: int, out: Path) -> dict:
    run = runs_dir(args, out) / f"{arm}_seed{seed}"
    if (run / "result.json").is_file():
        return json.loads((run / "result.json").read_text())
    run.mkdir(parents=True, exist_ok=True)
    low_rank = arm_config(args, arm, out, seed)
    over = base_overrides(args, run, seed)
    if low_rank:
        over.append("+model.encoder.low_rank=" + json.dumps(low_rank).replace('"', ""))
    hist, dev = LossHistory(), DevWER()
    t0 = time.perf_counter()
    model = train(compose_config("conformer_gn_tiny", over), extra_callbacks=[hist, dev])
    seconds = time.perf_counter() - t0
    corpus = Path(args.corpus)
    result = {"arm": arm, "seed": seed, "layers": args.layers, "epochs": args.epochs, "low_rank": low_rank,
              "encoder_params": count_params(model.encoder), "params": count_params(model),
              "train_seconds": seconds, "steps": int(model.trainer.global_step),
              "dev_wer": evaluate_wer(model, corpus / "dev_manifest.json"),
              "test_wer": evaluate_wer(model, corpus / "test_manifest.json"),
              "loss": hist.losses, "dev_wer_history": dev.history}
    if arm == "full":
        probe(model, corpus / "dev_manifest.json", ProbeConfig(modes=("rerand",), draws=3, seed=seed)).to_json(
            run / "probe.json")
        result["energy95"] = energy_profile(model, 0.95)
    (run / "result.json").write_text(json.dumps(result) + "\n")
    print(f"{arm} seed {seed}: dev WER {result['dev_wer']:.3f} test WER {result['test_wer']:.3f}, "
          f"{result['encoder_params']:,} encoder params, {seconds:.0f} s", flush=True)
    return result


def loss_stats(losses: list[float]) -> dict[str, float]:
    """Mean loss over the first quarter of training, and roughness: the median |Δ log loss| between steps."""
    q = max(1, len(losses) // 4)
    logs = [math.log(max(v, 1e-8)) for v in losses]
    return {"early_loss": statistics.mean(losses[:q]), "final_loss": statistics.mean(losses[-q:]),
            "roughness": statistics.median(abs(b - a) for a, b in zip(logs, logs[1:]))}



def summarize(args: argparse.Namespace, out: Path) -> str:
    by_arm, seeds = finished_runs(runs_dir(args, out), ARMS)
    enc = compose_config("conformer_gn_tiny", [f"corpus_dir={args.corpus}", *getattr(args, "model", ())]).model.encoder
    n_dev, n_test = split_sizes(args.corpus)
    steps = [r["steps"] for rs in by_arm.values() for r in rs.values()]
    lines = [f"# Low-rank training from scratch ({args.layers} layers, offline command corpus)", "",
             f"nemo_layerfx {nemo_layerfx.__version__}, torch {torch.__version__}, {platform.machine()} CPU; "
             f"tiny GroupNorm Conformer-CTC preset (d_model {enc.d_model}, {enc.n_heads} heads, FFN "
             f"{enc.d_model * enc.ff_expansion_factor}) at {args.layers} layers, {args.epochs} epochs "
             f"({max(steps, default=0)} steps), seeds {seeds}. WER: greedy, dev {n_dev} utterances, test {n_test}. "
             "± is the standard deviation over seeds. *train s / epoch* is the wall time of each run as it "
             "happened, with other jobs sharing the CPU for some arms: not a speed measurement (that is "
             "`benchmarks/lowrank.py`, interleaved).", "",
             "| arm | encoder params | dev WER | test WER | train s / epoch | early loss | final loss | roughness |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, rs in by_arm.items():
        if not rs:
            continue
        rs = list(rs.values())
        stats = [loss_stats(r["loss"]) for r in rs]
        lines.append(f"| {arm} | {rs[0]['encoder_params']:,} | {mean_sd([r['dev_wer'] for r in rs])} | "
                     f"{mean_sd([r['test_wer'] for r in rs])} | "
                     f"{statistics.mean(r['train_seconds'] / r['epochs'] for r in rs):.1f} | "
                     f"{mean_sd([s['early_loss'] for s in stats])} | {mean_sd([s['final_loss'] for s in stats])} | "
                     f"{mean_sd([s['roughness'] for s in stats])} |")
    lines += ["", "Paired differences within seed (test WER, arm − reference; negative favours the arm):", "",
              "| comparison | mean ± sd | per seed | arm better in |", "|---|---|---|---|"]
    for arm, ref in (("lrsms", "full"), ("lrsms", "kaiming"), ("lrsms", "uniform"), ("lrsms", "reversed"),
                     ("probe", "lrsms"), ("uniform", "full")):
        common, d = paired(by_arm, arm, ref)
        if not common:
            continue
        rel = statistics.mean(d) / statistics.mean(by_arm[ref][s]["test_wer"] for s in common)
        lines.append(f"| {arm} − {ref} | {mean_sd(d)} ({rel:+.1%} rel.) | {' '.join(f'{x:+.3f}' for x in d)} | "
                     f"{sum(x < 0 for x in d)}/{len(d)} |")
    energy = [r["energy95"] for r in by_arm["full"].values() if "energy95" in r]
    if energy:
        lines += ["", "Rank needed for 95 % of the energy of the trained full-rank weights, as a fraction of "
                  "min(m, n), per block (mean over seeds):", "", "| group | " + " | ".join(
                      f"block {b}" for b in range(args.layers)) + " |", "|---|" + "---|" * args.layers]
        for group in ("att", "ffn", "conv"):
            per_block = [statistics.mean(e[group][b] for e in energy) for b in range(args.layers)]
            lines.append(f"| {group} | " + " | ".join(f"{v:.2f}" for v in per_block) + " |")
    text = "\n".join(lines) + "\n"
    name = runs_dir(args, out).name
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(
        {arm: {s: {k: v for k, v in r.items() if k not in ("loss",)} for s, r in rs.items()}
         for arm, rs in by_arm.items()}, indent=1) + "\n")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--summarize", action="store_true", help="only rewrite the tables from finished runs")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    logging.setLevel(logging.ERROR)
    out = Path(args.out)
    if not args.summarize:
        for seed in args.seeds:
            for arm in args.arms:  # full first: the probe arm reads its report
                run_arm(args, arm, seed, out)
    print(summarize(args, out))


if __name__ == "__main__":
    main()
