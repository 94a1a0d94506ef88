"""Kubo et al.'s adaptive-dropout pruning at small scale: dense vs ADL-pruned vs hand-made baselines of the same
size, the survival pattern, and how survival relates to the layer-importance probe, over seeds.

Per seed, all on the offline corpus with the tiny preset at ``--layers`` layers and the same epochs:

- ``dense``: the GroupNorm Conformer-CTC; probed (re-rand, 3 draws) for the comparison with survival;
- ``adl``: the same model with adaptive-dropout gates on FFN units, per-head query/key and value dimensions and
  conv groups (K = ``--k-share`` of the run's steps), then pruned (no fine-tuning); the gated model's survival
  report is kept;
- ``adl_settled``: the same with ``settle_after_k`` (not in the paper): after step K training uses the eval mask,
  so the last steps fine-tune the subnetwork that is then pruned (same total steps);
- Kubo's baselines at the pruned model's size: ``shallow`` (fewer layers), ``narrow`` (smaller d_model),
  ``narrowffn`` (narrower FFNs), ``nomacaron`` (no first FFN; its size is fixed).

Finished runs are kept (``result.json``) and skipped, so a stopped study resumes; ``--summarize`` rewrites the
tables only.

    python experiments/adaptive_dropout.py --corpus data/commands --layers 8 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from nemo.utils import logging

import nemo_layerfx
from study import finished_runs, mean_sd
from nemo_layerfx.evaluate import evaluate_wer
from nemo_layerfx.importance import ProbeConfig, probe, spearman
from nemo_layerfx.models import count_params
from nemo_layerfx.pruning import prune, survival_report
from nemo_layerfx.train import compose_config, model_class, train

ARMS = ("dense", "adl", "adl_settled", "shallow", "narrow", "narrowffn", "nomacaron")
STEPS_PER_EPOCH = 48  # 764 training utterances of the command corpus in batches of 16


def overrides(args: argparse.Namespace, arm: str, extra: list[str]) -> list[str]:
    return [f"corpus_dir={args.corpus}", f"model.encoder.n_layers={args.layers}", f"trainer.max_epochs={args.epochs}",
            "trainer.accelerator=cpu", "layerfx.report_wer=false", "exp_manager.create_checkpoint_callback=false",
            *extra]


def size(args: argparse.Namespace, preset: str, extra: list[str]) -> int:
    cfg = compose_config(preset, overrides(args, "size", extra))
    return count_params(model_class(cfg)(cfg=cfg.model))


def matched(args: argparse.Namespace, target: int) -> dict[str, tuple[str, list[str], int]]:
    """Baseline presets and overrides whose parameter count is closest to ``target``."""
    out = {}
    cands = [("conformer_gn_tiny_shallow", [f"model.encoder.n_layers={n}"]) for n in range(1, args.layers + 1)]
    # the shallow preset's own n_layers is replaced: put the candidate after the common overrides
    out["shallow"] = min(((p, e, size(args, p, e)) for p, e in cands), key=lambda c: abs(c[2] - target))
    cands = [("conformer_gn_tiny_narrow", [f"model.encoder.d_model={d}"]) for d in range(32, 145, 8)]
    out["narrow"] = min(((p, e, size(args, p, e)) for p, e in cands), key=lambda c: abs(c[2] - target))
    cands = [("conformer_gn_tiny_narrowffn", [f"+model.encoder.ff_hidden={[w] * args.layers}"])
             for w in range(16, 577, 16)]
    out["narrowffn"] = min(((p, e, size(args, p, e)) for p, e in cands), key=lambda c: abs(c[2] - target))
    out["nomacaron"] = ("conformer_gn_tiny_nomacaron", [], size(args, "conformer_gn_tiny_nomacaron", []))
    return out


def run_arm(args: argparse.Namespace, arm: str, seed: int, out: Path) -> dict:
    run = out / "runs" / f"adaptive_dropout_L{args.layers}" / f"{arm}_seed{seed}"
    if (run / "result.json").is_file():
        return json.loads((run / "result.json").read_text())
    run.mkdir(parents=True, exist_ok=True)
    corpus = Path(args.corpus)
    common = [f"layerfx.seed={seed}", f"exp_manager.exp_dir={run / 'exp'}"]
    preset, extra = "conformer_gn_tiny", []
    if arm in ("adl", "adl_settled"):
        k = max(1, round(args.k_share * args.epochs * STEPS_PER_EPOCH))
        preset = "conformer_gn_adaptive_dropout_tiny"
        extra = [f"model.encoder.adaptive_dropout.steps={k}",
                 f"trainer.callbacks=[{{_target_: nemo_layerfx.pruning.AdaptiveDropout, out_dir: '{run}'}}]"]
        if arm == "adl_settled":
            extra.append("+model.encoder.adaptive_dropout.settle_after_k=true")
    elif arm != "dense":
        target = json.loads((run.parent / f"adl_seed{seed}" / "result.json").read_text())["params"]
        preset, extra, _ = matched(args, target)[arm]
    t0 = time.perf_counter()
    model = train(compose_config(preset, overrides(args, arm, common + extra)))
    seconds = time.perf_counter() - t0
    result = {"arm": arm, "seed": seed, "preset": preset, "overrides": extra, "train_seconds": seconds}
    if arm in ("adl", "adl_settled"):
        report = survival_report(model)
        result["gated_dev_wer"] = evaluate_wer(model, corpus / "dev_manifest.json")
        model, pruned = prune(model)
        result.update(survival=report.survival, expected=report.expected, kept=pruned.kept,
                      dense_params=pruned.params_before)
    result.update(params=count_params(model), dev_wer=evaluate_wer(model, corpus / "dev_manifest.json"),
                  test_wer=evaluate_wer(model, corpus / "test_manifest.json"))
    if arm == "dense":
        report = probe(model, corpus / "dev_manifest.json", ProbeConfig(modes=("rerand",), draws=3, seed=seed))
        report.to_json(run / "probe.json")
        result["probe_delta"] = report.delta_wer["rerand"]
    (run / "result.json").write_text(json.dumps(result) + "\n")
    print(f"{arm} seed {seed}: {result['params']:,} params, dev WER {result['dev_wer']:.3f}, test WER "
          f"{result['test_wer']:.3f}, {seconds:.0f} s", flush=True)
    return result


def summarize(args: argparse.Namespace, out: Path) -> str:
    runs = out / "runs" / f"adaptive_dropout_L{args.layers}"
    by, seeds = finished_runs(runs, ARMS)
    lines = [f"# Adaptive-dropout pruning ({args.layers} layers, CTC, offline command corpus)", "",
             f"nemo_layerfx {nemo_layerfx.__version__}, torch {torch.__version__}, {platform.machine()} CPU; tiny "
             f"GroupNorm Conformer-CTC preset at {args.layers} layers, {args.epochs} epochs, seeds {seeds}; ADL: "
             f"gates on FFN units, query/key and value dims per head and conv groups, K = {args.k_share:.0%} of the "
             "steps, pruned without fine-tuning. Baselines sized to the pruned model of the same seed. WER: "
             "greedy; dev 101 utterances, test 135. ± is the standard deviation over seeds.", "",
             "| arm | parameters | dev WER | test WER |", "|---|---|---|---|"]
    for arm, rs in by.items():
        if rs:
            rs = list(rs.values())
            lines.append(f"| {arm} | {mean_sd([r['params'] for r in rs], ',.0f')} | "
                         f"{mean_sd([r['dev_wer'] for r in rs])} | {mean_sd([r['test_wer'] for r in rs])} |")
    lines += ["", "Paired within seed (test WER, arm − reference; negative favours the arm):", "",
              "| comparison | mean ± sd | per seed |", "|---|---|---|"]
    for arm, ref in (("adl", "dense"), ("adl_settled", "dense"), ("adl_settled", "adl"), ("adl", "shallow"),
                     ("adl_settled", "shallow"), ("adl", "narrow"), ("adl", "narrowffn"), ("adl", "nomacaron")):
        common = sorted(set(by[arm]) & set(by[ref]))
        if common:
            d = [by[arm][s]["test_wer"] - by[ref][s]["test_wer"] for s in common]
            lines.append(f"| {arm} − {ref} | {mean_sd(d)} | {' '.join(f'{x:+.3f}' for x in d)} |")
    adl = list(by["adl"].values())
    if adl:
        ratios = [r["params"] / r["dense_params"] for r in adl]
        lines += ["", f"Pruned / dense parameters: {mean_sd(ratios)}; gated and pruned dev WER equal in "
                  f"{sum(abs(r['gated_dev_wer'] - r['dev_wer']) < 1e-9 for r in adl)}/{len(adl)} seeds.", "",
                  "Surviving share per layer and kind (mean over seeds):", "",
                  "| layer | " + " | ".join(adl[0]["survival"]) + " |", "|---|" + "---|" * len(adl[0]["survival"])]
        for i in range(args.layers):
            lines.append(f"| {i} | " + " | ".join(f"{statistics.mean(r['survival'][k][i] for r in adl):.2f}"
                                                  for k in adl[0]["survival"]) + " |")
        rows = []
        for s in sorted(set(by["adl"]) & set(by["dense"])):
            surv = by["adl"][s]["survival"]
            per_layer = [statistics.mean(surv[k][i] for k in surv) for i in range(args.layers)]
            rows.append(spearman(per_layer, by["dense"][s]["probe_delta"]))
        if rows:
            lines += ["", f"Rank correlation of a layer's mean surviving share with its re-rand ΔWER in the dense "
                      f"model (per seed): {' '.join(f'{r:+.2f}' for r in rows)}"]
    text = "\n".join(lines) + "\n"
    (out / f"adaptive_dropout_L{args.layers}.md").write_text(text)
    (out / f"adaptive_dropout_L{args.layers}.json").write_text(json.dumps(by, indent=1) + "\n")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--k-share", type=float, default=0.7, help="K as a share of the run's optimizer steps")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--summarize", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    logging.setLevel(logging.ERROR)
    out = Path(args.out)
    if not args.summarize:
        for seed in args.seeds:
            for arm in args.arms:  # adl before the baselines: they match its size
                run_arm(args, arm, seed, out)
    print(summarize(args, out))


if __name__ == "__main__":
    main()
