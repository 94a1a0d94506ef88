"""Probe cost: the cached layer-importance probe vs N+1 naive full evaluations, on the same data, in one run.

The naive way evaluates the whole model once for the baseline and once per reset layer (preprocessor,
subsampling and all N layers every time). The probe computes the prefix once per batch and re-runs only layers
i..N-1 after resetting layer i. Both must give identical WERs. Repetitions alternate (naive, probe, naive, ...)
and the report gives the median time ratio. Writes results/probe_cost_<device>.{json,md}.

    python benchmarks/probe_cost.py --corpus data/commands --layers 16
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
from nemo_layerfx.importance import (
    ProbeConfig, audio_batches, decode, fresh_draw, probe, probe_units, read_manifest, swapped, wer,
)
from nemo_layerfx.train import compose_config


@torch.no_grad()
def naive(model, rows, batch_size, draws) -> tuple[float, list[float]]:
    """Baseline + one full evaluation per reset layer (no reuse of anything)."""
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
    per_layer = []
    for (_, _, module), state in zip(probe_units(model, "block"), draws):
        with swapped(module, state):
            per_layer.append(evaluate())
    return base, per_layer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True, help="a layerfx make-corpus folder (dev manifest + tokenizer)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--d-model", type=int, default=144)
    p.add_argument("--utterances", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    logging.setLevel(logging.ERROR)
    cfg = compose_config("conformer_gn_tiny", [f"corpus_dir={args.corpus}", f"model.encoder.n_layers={args.layers}",
                                               f"model.encoder.d_model={args.d_model}"])
    torch.manual_seed(0)
    model = EncDecCTCModelBPE(cfg=cfg.model).to(args.device).eval()
    manifest = Path(args.corpus) / "dev_manifest.json"
    rows = read_manifest(manifest, args.utterances)
    # WER only on both sides (the naive loop computes no loss)
    pcfg = ProbeConfig(modes=("rerand",), draws=1, batch_size=args.batch, max_utterances=args.utterances, loss=False)
    draws = [fresh_draw(m, seed=u * 1_009) for u, (_, _, m) in enumerate(probe_units(model, "block"))]
    t_naive, t_probe = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        base_n, layers_n = naive(model, rows, args.batch, draws)
        t_naive.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        report = probe(model, manifest, pcfg)
        t_probe.append(time.perf_counter() - t0)
    identical = report.baseline_wer == base_n and report.wer["rerand"] == layers_n
    ratio = statistics.median(a / b for a, b in zip(t_probe, t_naive))
    result = {
        "benchmark": f"probe of all {args.layers} layers vs {args.layers + 1} naive full evaluations",
        "device": args.device, "cpu_threads": torch.get_num_threads(), "machine": platform.machine(),
        "versions": {"torch": torch.__version__, "nemo": __import__("nemo").__version__,
                     "nemo_layerfx": nemo_layerfx.__version__},
        "config": vars(args), "naive_s": t_naive, "probe_s": t_probe, "ratio_probe_to_naive": ratio,
        "identical_wers": identical, "baseline_wer": report.baseline_wer, "target": "ratio <= 0.55 at N = 16",
        "target_met": identical and ratio <= 0.55,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"probe_cost_{args.device}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Probe cost ({args.device}, {result['cpu_threads']} threads; torch {torch.__version__})", "",
             f"{args.layers} layers, d_model {args.d_model}, {len(rows)} dev utterances, batch {args.batch}, "
             f"{args.repeats} alternating repetitions", "",
             "| method | median time (s) |", "|---|---|",
             f"| naive: {args.layers + 1} full evaluations | {statistics.median(t_naive):.2f} |",
             f"| cached probe | {statistics.median(t_probe):.2f} |", "",
             f"Ratio probe / naive (median of paired repetitions): **{ratio:.3f}** (target <= 0.55: "
             f"{'met' if result['target_met'] else 'NOT met'}); WERs identical: {identical}."]
    (out / f"probe_cost_{args.device}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
