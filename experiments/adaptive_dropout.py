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
  ``narrowffn`` (narrower FFNs), ``nomacaron`` (no first FFN; its size is fixed), each sized to ``adl`` of the same
  seed; with the suffix ``_settled`` (``shallow_settled``, ``narrow_settled``, ``narrowffn_settled``) sized to
  ``adl_settled`` instead.

Finished runs are kept (``result.json``) and skipped, so a stopped study resumes; ``--summarize`` rewrites the
tables only. Variants of the schedule (``--k-share``, ``--c0``, ``--alpha``, ``--gamma``) keep the gated arms' runs
in their own folder and share the dense runs; ``--tag`` keeps every arm apart (another ``--epochs``).

    python experiments/adaptive_dropout.py --corpus data/commands --layers 8 --seeds 0 1
    python experiments/adaptive_dropout.py --corpus data/commands --layers 8 --seeds 0 1 2 --k-share 0.85 \
        --arms adl_settled
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from nemo.utils import logging

import nemo_layerfx
from study import finished_runs, mean_sd, paired, split_sizes
from nemo_layerfx.evaluate import audio_batches, evaluate_wer, read_manifest
from nemo_layerfx.importance import ProbeConfig, probe, spearman
from nemo_layerfx.models import count_params
from nemo_layerfx.pruning import prune, survival_report
from nemo_layerfx.train import compose_config, model_class, train

BASELINES = ("shallow", "narrow", "narrowffn", "nomacaron")
SIZED = BASELINES[:3]  # NoMacaron's size is fixed: one arm serves both ADL variants
ARMS = ("dense", "adl", "adl_settled", *BASELINES, *(f"{b}_settled" for b in SIZED))
DEFAULT_ALPHA, DEFAULT_GAMMA = 1e-7, 1e-5  # Kubo's α and L2 weight γ (AdaptiveDropoutConfig)
DEFAULT_K_SHARE = 0.7
DEFAULT_C0 = 10.0  # Kubo's c₀, where the moving target starts
BATCH = 16  # the tiny preset's training batch


def steps_per_epoch(corpus: str | Path) -> int:
    """Optimizer steps in one epoch of the corpus's training manifest (48 for the command corpus: 764 / 16)."""
    rows = sum(1 for line in (Path(corpus) / "train_manifest.json").read_text().splitlines() if line.strip())
    return -(-rows // BATCH)


def overrides(args: argparse.Namespace, extra: Sequence[str]) -> list[str]:
    return [f"corpus_dir={args.corpus}", f"model.encoder.n_layers={args.layers}", f"trainer.max_epochs={args.epochs}",
            f"trainer.accelerator={getattr(args, 'device', 'cpu')}", "layerfx.report_wer=false",
            "exp_manager.create_checkpoint_callback=false", *getattr(args, "model", ()), *extra]


def size(args: argparse.Namespace, preset: str, extra: list[str]) -> int:
    cfg = compose_config(preset, overrides(args, extra))
    return count_params(model_class(cfg)(cfg=cfg.model))


def matched(args: argparse.Namespace, kind: str, target: int) -> tuple[str, list[str], int]:
    """The baseline preset and overrides of ``kind`` whose parameter count is closest to ``target``."""
    if kind == "nomacaron":  # its size is fixed
        return "conformer_gn_tiny_nomacaron", [], size(args, "conformer_gn_tiny_nomacaron", [])
    d_model = int(compose_config("conformer_gn_tiny", overrides(args, [])).model.encoder.d_model)
    ffn, step = 4 * d_model, max(1, d_model // 9)  # the tiny preset: d_model 144, FFN widths 16, 32, ..., 576
    cands = {  # the candidate override comes after the common ones, so it replaces the preset's own value
        "shallow": [[f"model.encoder.n_layers={n}"] for n in range(1, args.layers + 1)],
        "narrow": [[f"model.encoder.d_model={d}"] for d in range(8, d_model + 1, 8)],
        "narrowffn": [[f"+model.encoder.ff_hidden={[w] * args.layers}"] for w in range(step, ffn + 1, step)],
    }[kind]
    return min(((f"conformer_gn_tiny_{kind}", e, size(args, f"conformer_gn_tiny_{kind}", e)) for e in cands),
               key=lambda c: abs(c[2] - target))


@torch.no_grad()
def dev_log_probs(model: torch.nn.Module, manifest: Path, n: int = 16) -> torch.Tensor:
    """CTC log-probs (B, T, V) of the first ``n`` dev utterances in one padded batch, eval mode: comparing the
    gated model's with the pruned one's checks that pruning removed only what the eval mask already zeroed."""
    model.eval()
    device = next(model.parameters()).device
    audio, lengths, _ = next(audio_batches(read_manifest(manifest, n), n, model._cfg.sample_rate, device))
    feats, feat_len = model.preprocessor(input_signal=audio, length=lengths)
    return model.decoder(encoder_output=model.encoder(audio_signal=feats, length=feat_len)[0]).cpu()


def steps(args: argparse.Namespace) -> int:
    """Optimizer steps of a run: ``max_steps`` when the study caps them (smoke), else the epochs'."""
    return getattr(args, "max_steps", None) or args.epochs * steps_per_epoch(args.corpus)


def gate_settings(args: argparse.Namespace) -> tuple[float, float, float]:
    """The gates' regularizer weights α and γ and the target's start c₀ (the paper's when the study's caller does not
    set them, as ``reproduce.py`` does not)."""
    return getattr(args, "alpha", DEFAULT_ALPHA), getattr(args, "gamma", DEFAULT_GAMMA), getattr(args, "c0", DEFAULT_C0)


def variant(args: argparse.Namespace) -> str:
    """'' for the paper's α and γ and the study's K share, else a suffix naming what differs ('_g3e-05',
    '_k0.5_a0.0001_g0.01'): it keeps the runs of the gated arms and of the baselines sized to them apart."""
    k, alpha, gamma, c0 = args.k_share, *gate_settings(args)
    named = (("k", k, DEFAULT_K_SHARE), ("a", alpha, DEFAULT_ALPHA), ("g", gamma, DEFAULT_GAMMA), ("c", c0, DEFAULT_C0))
    return "".join(f"_{name}{v:g}" for name, v, default in named if v != default)


def runs_dir(args: argparse.Namespace, out: Path, arm: str = "") -> Path:
    """Where the study's runs live; ``args.tag`` (if any) keeps a smaller model's runs apart. The dense arm does not
    depend on the gates, so every variant (``variant``) shares the dense runs of the paper's settings."""
    suffix = "" if arm == "dense" else variant(args)
    return out / "runs" / f"adaptive_dropout_L{args.layers}{getattr(args, 'tag', '')}{suffix}"


def run_arm(args: argparse.Namespace, arm: str, seed: int, out: Path) -> dict:
    run = runs_dir(args, out, arm) / f"{arm}_seed{seed}"
    if (run / "result.json").is_file():
        return json.loads((run / "result.json").read_text())
    run.mkdir(parents=True, exist_ok=True)
    corpus = Path(args.corpus)
    common = [f"layerfx.seed={seed}", f"exp_manager.exp_dir={run / 'exp'}"]
    preset, extra = "conformer_gn_tiny", []
    if arm in ("adl", "adl_settled"):
        k, (alpha, gamma, c0) = max(1, round(args.k_share * steps(args))), gate_settings(args)
        preset = "conformer_gn_adaptive_dropout_tiny"
        extra = [f"model.encoder.adaptive_dropout.steps={k}", f"+model.encoder.adaptive_dropout.alpha={alpha}",
                 f"+model.encoder.adaptive_dropout.gamma={gamma}",
                 f"+model.encoder.adaptive_dropout.c0={c0}",
                 f"trainer.callbacks=[{{_target_: nemo_layerfx.pruning.AdaptiveDropout, out_dir: '{run}'}}]"]
        if arm == "adl_settled":
            extra.append("+model.encoder.adaptive_dropout.settle_after_k=true")
    elif arm != "dense":
        kind, sized_to = (arm.removesuffix("_settled"), "adl_settled") if arm.endswith("_settled") else (arm, "adl")
        target = json.loads((run.parent / f"{sized_to}_seed{seed}" / "result.json").read_text())["params"]
        preset, extra, _ = matched(args, kind, target)
    t0 = time.perf_counter()
    model = train(compose_config(preset, overrides(args, common + extra)))
    seconds = time.perf_counter() - t0
    result = {"arm": arm, "seed": seed, "preset": preset, "overrides": extra, "train_seconds": seconds}
    if arm in ("adl", "adl_settled"):
        report = survival_report(model)
        result["gated_dev_wer"] = evaluate_wer(model, corpus / "dev_manifest.json")
        gated = dev_log_probs(model, corpus / "dev_manifest.json")
        model, pruned = prune(model)
        result.update(survival=report.survival, expected=report.expected, kept=pruned.kept,
                      dense_params=pruned.params_before,
                      max_log_prob_diff=float((dev_log_probs(model, corpus / "dev_manifest.json") - gated).abs().max()))
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
    by, seeds = finished_runs(runs_dir(args, out), ARMS)
    if variant(args):  # the dense runs live with the paper's settings; compare on the variant's own seeds
        dense = finished_runs(runs_dir(args, out, "dense"), ["dense"])[0]["dense"]
        by["dense"] = {s: r for s, r in dense.items() if s in seeds}
    n_dev, n_test = split_sizes(args.corpus)
    alpha, gamma, c0 = gate_settings(args)
    lines = [f"# Adaptive-dropout pruning ({args.layers} layers, CTC, offline command corpus)", "",
             f"nemo_layerfx {nemo_layerfx.__version__}, torch {torch.__version__}, {platform.machine()} CPU; tiny "
             f"GroupNorm Conformer-CTC preset at {args.layers} layers, {steps(args)} steps, seeds {seeds}; ADL: "
             "gates on FFN units, query/key and value dims per head and conv groups, "
             f"c₀ = {c0:g}, α = {alpha:g}, γ = {gamma:g}, "
             f"K = {args.k_share:.0%} of the steps, pruned without fine-tuning; `adl_settled` trains the eval-mask "
             "subnetwork after K. Baselines sized to the pruned `adl` model of the same seed (`*_settled`: to "
             f"`adl_settled`). WER: greedy; dev {n_dev} utterances, test {n_test}. ± is the standard deviation over "
             "seeds.", "",
             "| arm | parameters | dev WER | test WER |", "|---|---|---|---|"]
    for arm, rs in by.items():
        if rs:
            rs = list(rs.values())
            lines.append(f"| {arm} | {mean_sd([r['params'] for r in rs], ',.0f')} | "
                         f"{mean_sd([r['dev_wer'] for r in rs])} | {mean_sd([r['test_wer'] for r in rs])} |")
    lines += ["", "Paired within seed (test WER unless marked **dev**; arm − reference; negative favours the arm):",
              "", "| comparison | mean ± sd | per seed |", "|---|---|---|"]
    pairs = [("adl", "dense"), ("adl_settled", "dense"), ("adl_settled", "adl"),
             *(("adl", b) for b in BASELINES), *(("adl_settled", f"{b}_settled") for b in SIZED),
             ("adl_settled", "nomacaron")]
    for arm, ref in pairs:
        common, d = paired(by, arm, ref)
        if common:
            lines.append(f"| {arm} − {ref} | {mean_sd(d)} | {' '.join(f'{x:+.3f}' for x in d)} |")
    for arm in ("adl", "adl_settled"):  # the criterion: dev WER no worse than dense
        common, d = paired(by, arm, "dense", key="dev_wer")
        if common:
            lines.append(f"| {arm} − dense, **dev** WER | {mean_sd(d)} | {' '.join(f'{x:+.3f}' for x in d)} |")
    for name in ("adl", "adl_settled"):
        gated = list(by[name].values())
        if not gated:
            continue
        ratios = [r["params"] / r["dense_params"] for r in gated]
        kinds = list(gated[0]["survival"])
        lines += ["", f"**{name}**: pruned / dense parameters {mean_sd(ratios)}; gated and pruned dev WER equal in "
                  f"{sum(abs(r['gated_dev_wer'] - r['dev_wer']) < 1e-9 for r in gated)}/{len(gated)} seeds. "
                  "Surviving share per layer and kind (mean over seeds):", "",
                  "| layer | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for i in range(args.layers):
            lines.append(f"| {i} | " + " | ".join(f"{statistics.mean(r['survival'][k][i] for r in gated):.2f}"
                                                  for k in kinds) + " |")
        rho = [spearman(layer_survival(by[name][s]), by["dense"][s]["probe_delta"])
               for s in sorted(set(by[name]) & set(by["dense"]))]
        if rho:
            lines += ["", f"Rank correlation of a layer's mean surviving share with its re-rand ΔWER in the dense "
                      f"model (per seed): {' '.join(f'{r:+.2f}' for r in rho)}"]
    text = "\n".join(lines) + "\n"
    name = f"adaptive_dropout_L{args.layers}{getattr(args, 'tag', '')}{variant(args)}"
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(by, indent=1) + "\n")
    return text


def layer_survival(result: dict) -> list[float]:
    """A layer's surviving share, averaged over the gated kinds."""
    surv = result["survival"]
    return [statistics.mean(surv[k][i] for k in surv) for i in range(len(next(iter(surv.values()))))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--k-share", type=float, default=DEFAULT_K_SHARE, help="K as a share of the run's optimizer steps")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="the gates' regularizer weight α")
    p.add_argument("--c0", type=float, default=DEFAULT_C0, help="where the moving target c(t) starts: a lower c₀ "
                   "leaves the gates more of the K steps in which dropping a unit is likely")
    p.add_argument("--gamma", type=float, default=DEFAULT_GAMMA,
                   help="the gates' L2 weight γ (a K share, α or γ other than the paper's keeps the gated arms' "
                   "runs apart; the dense runs are shared)")
    p.add_argument("--tag", default="", help="a suffix that keeps every arm's runs apart, dense included: another "
                   "schedule, e.g. --epochs 18 --tag _e18")
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
