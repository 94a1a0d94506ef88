"""Probe cost: the cached layer-importance probe vs naive full evaluations, on the same data, in one run.

The naive way evaluates the whole model once for the baseline and once per reset (preprocessor, subsampling and
all N layers every time). The probe computes the prefix once per batch and re-runs only layers i..N-1 after
resetting layer i; with ``--batch-variants V`` it also stacks V resets of one layer into one batch for the layers
after it (meant for GPUs). Every method must give identical WERs. Repetitions alternate (naive, probe V=1,
probe V=..., naive, ...) and the report gives median time ratios of each repetition's pairs. Writes
results/probe_cost_<device>[_notf32][_<model>].{json,md}.

    python benchmarks/probe_cost.py --corpus data/commands --layers 16
    python benchmarks/probe_cost.py --corpus data/commands --device cuda --modes reinit rerand --draws 3 \
        --batch-variants 1 4 16 --manifest train_manifest.json --utterances 128
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import nemo_layerfx
from nemo.collections.asr.models import EncDecCTCModelBPE
from nemo.utils import logging
from nemo_layerfx.evaluate import audio_batches, decode, read_manifest, wer
from nemo_layerfx.importance import (
    ProbeConfig, fresh_draw, init_state, layer_snapshot, probe, probe_units, swapped,
)
from nemo_layerfx.train import compose_config


@torch.no_grad()
def naive(model, rows, batch_size, resets) -> tuple[float, dict[str, list[float]]]:
    """Baseline + one full evaluation per reset (no reuse of anything); resets: mode -> per unit -> states."""
    device = next(model.parameters()).device

    def evaluate() -> float:
        hyps, refs = [], []
        for audio, lengths, texts in audio_batches(rows, batch_size, 16000, device):
            feats, flen = model.preprocessor(input_signal=audio, length=lengths)
            enc, enc_len = model.encoder(audio_signal=feats, length=flen)
            hyps += decode(model, enc, enc_len)
            refs += texts
        return wer(hyps, refs)

    base = evaluate()
    per_unit: dict[str, list[float]] = {}
    for mode, states in resets.items():
        per_unit[mode] = []
        for (_, _, module), draws in zip(probe_units(model, "block"), states):
            scores = []
            for state in draws:
                with swapped(module, state):
                    scores.append(evaluate())
            per_unit[mode].append(sum(scores) / len(scores))
    return base, per_unit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True, help="a layerfx make-corpus folder (manifests + tokenizer)")
    p.add_argument("--manifest", default="dev_manifest.json", help="which manifest of the corpus to probe on")
    p.add_argument("--model", default=None, help="a trained CTC .nemo to probe (default: a fresh untrained one)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--d-model", type=int, default=144)
    p.add_argument("--utterances", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--modes", nargs="+", default=["rerand"], choices=["reinit", "rerand"])
    p.add_argument("--draws", type=int, default=1)
    p.add_argument("--batch-variants", nargs="+", type=int, default=[1], help="probe once per value given")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-tf32", action="store_true", help="GPU: full fp32 convolutions and matmuls (cuDNN TF32 off)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    logging.setLevel(logging.ERROR)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    cfg = compose_config("conformer_gn_tiny", [f"corpus_dir={args.corpus}", f"model.encoder.n_layers={args.layers}",
                                               f"model.encoder.d_model={args.d_model}"])
    torch.manual_seed(0)
    suffix = args.device + ("_notf32" if args.no_tf32 else "") + (f"_{Path(args.model).stem}" if args.model else "")
    if args.model:  # re-init then uses a fresh draw as the "initial" values (a .nemo has none; timing only)
        from nemo_layerfx.models import restore

        model = restore(args.model)
        init = {f"layers.{i}.{k}": v for i, layer in enumerate(model.encoder.layers)
                for k, v in fresh_draw(layer, seed=10**6 + i).items()}
        args.layers, args.d_model = len(model.encoder.layers), model.cfg.encoder.d_model
    else:
        model = EncDecCTCModelBPE(cfg=cfg.model)
        init = layer_snapshot(model)
        with torch.no_grad():  # stand-in for training, so that re-init is not a no-op
            for prm in model.encoder.layers.parameters():
                prm.add_(0.02 * torch.randn_like(prm))
    model = model.to(args.device).eval()
    manifest = Path(args.corpus) / args.manifest
    rows = read_manifest(manifest, args.utterances)
    units = probe_units(model, "block")
    resets = {}  # exactly the states the probe uses (same seeds)
    for mode in args.modes:
        resets[mode] = ([[init_state(m, i, init)] for _, i, m in units] if mode == "reinit" else
                        [[fresh_draw(m, seed=u * 1_009 + d) for d in range(args.draws)]
                         for u, (_, _, m) in enumerate(units)])
    n_resets = sum(len(d) for states in resets.values() for d in states)
    # WER only on both sides (the naive loop computes no loss)
    configs = {v: ProbeConfig(modes=tuple(args.modes), draws=args.draws, batch_size=args.batch,
                              max_utterances=args.utterances, loss=False, batch_variants=v)
               for v in args.batch_variants}
    times: dict[str, list[float]] = {"naive": [], **{f"probe V={v}": [] for v in configs}}
    identical, max_diff = {}, {}  # WERs equal to the naive ones; largest per-unit WER difference
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        base_n, per_unit_n = naive(model, rows, args.batch, resets)
        times["naive"].append(time.perf_counter() - t0)
        for v, pcfg in configs.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            report = probe(model, manifest, pcfg, init=init)
            times[f"probe V={v}"].append(time.perf_counter() - t0)
            identical[f"probe V={v}"] = report.baseline_wer == base_n and report.wer == per_unit_n
            max_diff[f"probe V={v}"] = max(abs(a - b) for m in per_unit_n for a, b in zip(report.wer[m], per_unit_n[m]))
    ratios = {k: statistics.median(a / b for a, b in zip(t, times["naive"])) for k, t in times.items() if k != "naive"}
    v1 = f"probe V={args.batch_variants[0]}"
    batched = {k: statistics.median(a / b for a, b in zip(t, times[v1])) for k, t in times.items()
               if k.startswith("probe") and k != v1}
    first = ratios[v1]
    result = {
        "benchmark": f"probe of all {args.layers} layers ({n_resets} resets) vs {n_resets + 1} naive full evaluations",
        "device": args.device, "cpu_threads": torch.get_num_threads(), "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "versions": {"torch": torch.__version__, "nemo": __import__("nemo").__version__,
                     "nemo_layerfx": nemo_layerfx.__version__},
        "config": vars(args), "times_s": times, "ratio_to_naive": ratios, f"ratio_to_{v1.replace(' ', '_')}": batched,
        "identical_wers": identical, "max_wer_difference": max_diff, "baseline_wer": report.baseline_wer,
        "tf32": not args.no_tf32, "target": "ratio <= 0.55 at N = 16 (one reset per pass, identical WERs)",
        "target_met": identical[v1] and ratios[v1] <= 0.55,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"probe_cost_{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Probe cost ({args.device}{', ' + result['gpu'] if result['gpu'] else ''}, "
             f"{result['cpu_threads']} threads; torch {torch.__version__})", "",
             f"{'model ' + args.model if args.model else 'untrained model'}: "
             f"{args.layers} layers, d_model {args.d_model}, baseline WER {report.baseline_wer:.3f}; {len(rows)} utterances of {args.manifest}, batch "
             f"{args.batch}, modes {' + '.join(args.modes)}, {args.draws} draw(s): {n_resets} resets; "
             f"{args.repeats} alternating repetitions"
             + (f"; TF32 {'off' if args.no_tf32 else 'on (cuDNN default)'}" if args.device.startswith("cuda") else ""),
             "",
             "| method | median time (s) | / naive | identical WERs | max WER difference |", "|---|---|---|---|---|",
             f"| naive: {n_resets + 1} full evaluations | {statistics.median(times['naive']):.2f} | 1 | | |"]
    lines += [f"| cached {k} | {statistics.median(times[k]):.2f} | {ratios[k]:.3f} | {identical[k]} | "
              f"{max_diff[k]:.4f} |" for k in ratios]
    lines += ["", f"Cached probe / naive (median of paired repetitions): **{first:.3f}** (target <= 0.55: "
              f"{'met' if result['target_met'] else 'NOT met'})."]
    lines += [f"Batched resets, {k} / {v1}: **{r:.3f}**." for k, r in batched.items()]
    (out / f"probe_cost_{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
