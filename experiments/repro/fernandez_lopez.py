"""Fernandez-Lopez et al. 2025 ("Full-Rank No More: Low-Rank Weight Training for Modern Speech Recognition
Models"), every claim we can check in one report.

The models are the low-rank study's (``experiments/lowrank.py``, whose runs this reuses and extends): the tiny
GroupNorm Conformer-CTC preset at 8 layers trained from scratch on the offline corpus, per seed full rank, LR-SMS
(MHSA ramp [0.1, 0.2], FFN ramp [0.2, 0.5], SVD init), the same ranks with Kaiming init, a uniform α and the reversed
ramp at LR-SMS's size, and a rank map ordered by the full model's probe (ours). Speed and memory come from
``benchmarks/lowrank.py`` (Conformer-M width, interleaved), read from its results file when it exists.

Budgets (CPU, 2 cores; each 12-epoch run takes 4–5 minutes on idle cores, 10–15 with other work running):
``smoke`` (tests: tiny models, minutes), ``small`` (seed 0, all six arms: about 25 minutes idle), ``full`` (seeds
0–2: about 75 minutes idle; a GPU shortens it).

Deviations from the paper, stated in the report: CTC on a synthetic corpus at d_model 144 and 8 blocks instead of
an encoder-decoder Conformer (d_model 768, 12 + 6 blocks) on LRS3 and LibriSpeech, and 576 steps.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from study import (VERDICT_RULE, benchmark_results, claims_table, ensure_corpus, finished_runs, fmt, paired,
                   verdict, write_report)

SMOKE_MODEL = ["model.encoder.d_model=32", "model.encoder.n_heads=2", "model.encoder.subsampling_conv_channels=16",
               "model.encoder.conv_norm_type=group_norm4"]
ARMS = ["full", "lrsms", "kaiming", "uniform", "reversed", "probe"]
BUDGETS = {
    # smoke: 8 steps however small the corpus (the tests' has 3 batches per epoch)
    "smoke": {"seeds": [0], "epochs": 8, "model": [*SMOKE_MODEL, "trainer.max_steps=8"], "tag": "_smoke"},
    "small": {"seeds": [0], "epochs": 12, "model": [], "tag": ""},
    "full": {"seeds": [0, 1, 2], "epochs": 12, "model": [], "tag": ""},
}
LAYERS = 8
FLAT = 0.02  # a change in the 95 %-energy rank fraction smaller than this is no trend


def quality_claims(by: dict, seeds: list[int]) -> list[dict]:
    rows = []
    if by["lrsms"] and by["full"]:
        ratio = [by["lrsms"][s]["encoder_params"] / by["full"][s]["encoder_params"] for s in seeds]
        rel = [(by["lrsms"][s]["test_wer"] - by["full"][s]["test_wer"]) / by["full"][s]["test_wer"] for s in seeds]
        rows.append({"claim": "LR-SMS: over 2× fewer parameters within 5 % relative WER of full rank",
                     "paper": "243M → 115M; LibriSpeech 2.66 → 2.74 (+3 % rel.), LRS3 1.99 → 2.11 (+6 %)",
                     "measured": f"encoder parameters {fmt(ratio, '.3f')}× full; test WER LR-SMS vs full "
                                 f"{fmt([100 * r for r in rel], '+.1f')} % relative",
                     "criterion": "size: encoder ratio ≤ 0.5 in every seed; WER: paired t-test on 5 % − the relative "
                                  "WER change (positive: within 5 %)",
                     "verdict": ("smaller" if max(ratio) <= 0.5 else "not 2× smaller") + "; WER within 5 %: "
                     + verdict([0.05 - r for r in rel], +1, "spread covers 5 %")})
    for name, arm, paper in (("SVD initialization trains more stably than Kaiming", "kaiming",
                              "Kaiming-initialized factors train worse and less stably (their ablation)"),
                             ("a rank ramp that grows with depth beats a uniform α at equal size", "uniform",
                              "Table II vs I: [0.1, 0.2] / [0.2, 0.5] at 115M beats uniform 0.25 at 113M"),
                             ("(ours) rank growing with depth beats the reversed ramp at equal size", "reversed",
                              "implied by their per-depth rank analysis (Figs. 1, 3), not trained")):
        _, d = paired(by, "lrsms", arm)
        if d:
            rows.append({"claim": name, "paper": paper, "measured": f"test WER LR-SMS − {arm}: {fmt(d)}",
                         "verdict": verdict(d, -1, "spread covers the difference")})
    _, d = paired(by, "kaiming", "lrsms", "roughness")
    if d:
        rows.append({"claim": "SVD initialization: a smoother loss curve than Kaiming",
                     "paper": "uniform factorization with plain init tends to exploding gradients",
                     "measured": f"roughness (median |Δ log loss| per step) Kaiming − LR-SMS: {fmt(d)}",
                     "verdict": verdict(d, +1, "spread covers the difference")})
    _, d = paired(by, "probe", "lrsms")
    if d:
        rows.append({"claim": "(ours) a probe-ordered rank map beats the linear ramp at equal size",
                     "paper": "not in the paper: more rank for the full model's critical blocks",
                     "measured": f"test WER probe map − LR-SMS: {fmt(d)}",
                     "verdict": verdict(d, -1, "spread covers the difference")})
    return rows


def energy_claims(by: dict) -> list[dict]:
    energy = [r["energy95"] for r in by["full"].values() if "energy95" in r]
    rows = []
    for group, label in (("att", "MHSA"), ("ffn", "FFN")):
        if not energy:
            break
        half = len(energy[0][group]) // 2
        d = [statistics.mean(e[group][half:]) - statistics.mean(e[group][:half]) for e in energy]
        first = [e[group][0] for e in energy]
        last = [e[group][-1] for e in energy]
        rows.append({"claim": f"the rank holding 95 % of the energy grows with depth ({label})",
                     "paper": "Figs. 1, 3: trained full-rank weights of deeper blocks need more rank",
                     "measured": f"fraction of min(m, n), block 0 {fmt(first, '.2f')} → block "
                                 f"{len(energy[0][group]) - 1} {fmt(last, '.2f')}; upper − lower half {fmt(d)}",
                     "criterion": f"paired t-test on upper − lower half; flat when |Δ| < {FLAT} in every seed (a cut "
                                  "of ours)",
                     "verdict": (f"not seen: flat (|Δ| < {FLAT} in every seed)" if all(abs(x) < FLAT for x in d)
                                 else verdict(d, +1, "spread covers the trend"))})
    return rows


def speed_claims(bench: dict | None) -> list[dict]:
    if not bench:
        return []
    settings = bench["settings"]
    train = [v["train_speedup"] for v in settings.values()]
    limit = [v["flop_limited_speedup"] for v in settings.values()]
    mem = [v["memory_ratio"] for v in settings.values()]
    inf = [v["inference_speedup"] for v in settings.values()]
    return [{"claim": "LR-SMS trains about 1.3× faster (ours: ≥ 1.4× on CPU, issue target)",
             "paper": "1.31× on A100s at 115M vs 243M",
             "measured": f"{bench['encoder_param_ratio']:.2f}× the encoder parameters: training step "
                         f"{min(train):.2f}–{max(train):.2f}× faster over {len(train)} batch lengths (the FLOPs "
                         f"removed allow {min(limit):.2f}–{max(limit):.2f}×); inference "
                         f"{min(inf):.2f}–{max(inf):.2f}×"
                         " (Conformer-M width, CPU)",
             "criterion": "benchmark (one interleaved run): ≥ 1.3× at every batch length; our 1.4× target",
             "verdict": ("reproduced (≥ 1.3×)" if min(train) >= 1.3 else "faster, below the paper's 1.31×")
             + ("; the 1.4× target met" if min(train) >= 1.4 else "; the 1.4× target not met")},
            {"claim": "LR-SMS needs less training memory",
             "paper": "16.4 → 14.9 GB (0.91×)",
             "measured": f"parameters + gradients + optimizer state + saved activations: {min(mem):.2f}–"
                         f"{max(mem):.2f}× full over {len(mem)} batch lengths",
             "criterion": "benchmark (one interleaved run): < 1× at every batch length",
             "verdict": "reproduced" if max(mem) < 1 else "refuted"}]


def run(args) -> Path:
    import lowrank as lr
    ensure_corpus(args.corpus)
    budget = BUDGETS[args.budget]
    results = Path(args.out)
    study = argparse.Namespace(corpus=args.corpus, layers=LAYERS, epochs=budget["epochs"], tag=budget["tag"],
                               device=args.device, model=budget["model"] + args.model_overrides)
    for seed in budget["seeds"]:
        for arm in ARMS:  # full first: the probe arm reads its report
            lr.run_arm(study, arm, seed, results)
    lr.summarize(study, results)
    by, _ = finished_runs(lr.runs_dir(study, results), ARMS)
    by = {a: {s: r for s, r in rs.items() if s in budget["seeds"]} for a, rs in by.items()}
    for rs in by.values():
        for r in rs.values():
            r.update(lr.loss_stats(r["loss"]))
    seeds = [s for s in budget["seeds"] if all(s in by[a] for a in ARMS)]
    bench = benchmark_results("lowrank_cpu")
    rows = quality_claims(by, seeds) + energy_claims(by) + speed_claims(bench)
    tables = f"../{lr.runs_dir(study, results).name}.md"
    steps = max(r["steps"] for rs in by.values() for r in rs.values())
    lines = ["# Fernandez-Lopez et al. 2025, reproduced at small scale", "",
             f"Budget `{args.budget}`: tiny GroupNorm Conformer-CTC preset at {LAYERS} blocks trained from scratch "
             f"on the offline corpus, {steps} steps, seeds {seeds}, arms {', '.join(ARMS)} (all low-rank arms at "
             f"LR-SMS's size, `uniform` as close as one α allows); device {args.device}. Run with "
             f"`python experiments/reproduce.py fernandez-lopez --budget {args.budget}`; per-arm tables: "
             f"[{tables}]({tables}); speed from `benchmarks/lowrank.py` "
             f"({'read from benchmarks/results/lowrank_cpu.json' if bench else 'not run: no speed rows'}).", "",
             "Deviations: an encoder-decoder Conformer at d_model 768 on LRS3 and LibriSpeech in the paper, a small "
             "CTC encoder on a synthetic corpus here, so only relative effects compare. " + VERDICT_RULE, "",
             *claims_table(rows)]
    return write_report(results / "fernandez-lopez", args.budget, lines, {"seeds": seeds, "claims": rows})
