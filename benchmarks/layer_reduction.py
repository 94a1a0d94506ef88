"""Layer reduction (Tian et al.) costs: sampled-depth training steps, inference at depth M, shared-parameter size.

In one run, at Conformer-M width (8 layers, d_model 256, 4 heads) on real batches (1-s commands, ~2-s sentences,
~9-s joined utterances), for unshared and parameter-shared (G = 1) models:

- a training step (forward, CTC, backward, AdamW) with depth sampled from U{2..8} vs the same step at the fixed
  depth that was drawn (interleaved, same batch): the overhead of sampling beyond the layers it skips (target
  <= 1.03), and the speed-up of U(2, 8) over fixed depth 8 (Tian: 1.72x GPU-hours per epoch);
- eval-mode encoder inference at depth M of the 8-layer model vs a model built with M layers (same weights), for
  every M (target <= 1.03), and SLI(5)-of-8 vs all 8 layers;
- parameters and .nemo bytes of the shared model vs the unshared one (encoder layers: exactly 1/8).

Writes results/layer_reduction_<device>.{json,md}.

    python benchmarks/layer_reduction.py --corpus data/commands
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from nemo.collections.asr.models import EncDecCTCModelBPE
from nemo.utils import logging

from common import ctc_step, encoder_forward, length_batches, machine, median_ratio, time_interleaved
from nemo_layerfx.depth import DepthSampler
from nemo_layerfx.encoder import EncoderExtension
from nemo_layerfx.models import count_params
from nemo_layerfx.train import compose_config

TARGETS = {"sampling_overhead": 1.03, "inference_vs_built": 1.03}


class FixedDepth(EncoderExtension):
    """A depth source that always answers ``depth`` (the fixed-depth reference step)."""

    def __init__(self, depth: int):
        self.depth_value = depth

    def training_depth(self, encoder) -> int:
        return self.depth_value


def build(args, layers: int, share: int | None, sampling: bool):
    enc = "model.encoder."
    over = [f"corpus_dir={args.corpus}", f"{enc}n_layers={layers}", f"{enc}d_model={args.d_model}",
            f"{enc}n_heads={args.heads}", f"{enc}subsampling_conv_channels={args.subsampling_channels}",
            f"{enc}dropout=0", f"{enc}dropout_att=0", f"{enc}dropout_pre_encoder=0"]
    if share is not None:
        over.append(f"+{enc}share_layers={share}")
    if sampling:
        over.append(f"+{enc}depth_sampling={{low: {args.low}, high: {layers}, seed: 0}}")
    torch.manual_seed(0)
    return EncDecCTCModelBPE(cfg=compose_config("conformer_gn_tiny", over).model)


def nemo_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_to(f"{tmp}/m.nemo")
        return Path(f"{tmp}/m.nemo").stat().st_size


def train_costs(model, batch, steps: list[int], rounds: int) -> dict:
    """Per drawn step: the sampled step and a step at the same fixed depth, in alternating order; every other
    drawn step also a step at full depth."""
    audio, lengths, texts = batch
    enc = model.encoder
    sampler = enc.extension("depth_sampling")
    step = ctc_step(model, audio, lengths, texts, "adamw")

    def timed(depth_source) -> float:
        enc.remove_extension("depth_sampling")
        enc.add_extension("depth_sampling", depth_source)
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0

    timed(FixedDepth(len(enc.layers)))  # warm-up
    times: dict[str, list[float]] = {"sampled": [], "fixed": [], "depth8": []}
    for r in range(rounds):
        for k, s in enumerate(steps):
            sampler.step = s
            pair = [("sampled", sampler), ("fixed", FixedDepth(sampler.draw(s)))]
            for name, source in (pair if (r + k) % 2 == 0 else pair[::-1]):
                times[name].append(timed(source))
            if k % 2 == 0:
                times["depth8"].append(timed(FixedDepth(len(enc.layers))))
    enc.remove_extension("depth_sampling")
    enc.add_extension("depth_sampling", sampler)
    return {"sampled_s": times["sampled"], "fixed_same_depth_s": times["fixed"], "depth8_s": times["depth8"],
            "overhead": median_ratio(times["sampled"], times["fixed"]),  # per drawn step: same depth, same batch
            "speedup_vs_depth8": statistics.mean(times["depth8"]) / statistics.mean(times["sampled"])}


def at_depth(model, depth: int, forward: Callable[[], None]) -> Callable[[], None]:
    """``forward`` with the model's inference depth set to ``depth`` first (so two depths can be interleaved)."""
    def run() -> None:
        model.encoder.set_inference_depth(depth)
        forward()

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True)
    p.add_argument("--sentences", help="sentences corpus (default: synthesize 96 utterances into a temp folder)")
    p.add_argument("--joined-seconds", type=float, default=8.0)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--low", type=int, default=2)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--subsampling-channels", type=int, default=64)
    p.add_argument("--sli", type=int, default=5, help="the shallow-layer inference depth to report")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="passes over the drawn steps (each depth twice per pass)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    logging.setLevel(logging.ERROR)
    n = args.layers
    # steps whose draws cover every depth low..n twice (the same list for both models)
    sampler = DepthSampler(args.low, n, seed=0)
    steps, seen = [], {d: 0 for d in range(args.low, n + 1)}
    for s in range(10_000):
        d = sampler.draw(s)
        if seen[d] < 2:
            seen[d] += 1
            steps.append(s)
        if all(v == 2 for v in seen.values()):
            break
    models = {"unshared": build(args, n, None, True).to(args.device),
              "shared G=1": build(args, n, 1, True).to(args.device)}
    batches, tmp = length_batches(args.corpus, args.sentences, args.batch, args.joined_seconds)
    result_train: dict = {}
    result_infer: dict = {}
    for name, (audio, lengths, texts) in batches.items():
        batch = (audio.to(args.device), lengths.to(args.device), texts)
        result_train[name] = {k: train_costs(m, batch, steps, args.rounds) for k, m in models.items()}
        # inference: the 8-layer model at depth M vs a model built with M layers (same weights), every M
        full = models["unshared"]
        rows = {}
        for m_depth in range(1, n + 1):
            short = build(args, m_depth, None, False).to(args.device)
            short.load_state_dict({k: v for k, v in full.state_dict().items() if k in short.state_dict()})
            full.encoder.set_inference_depth(m_depth)
            t = time_interleaved({"depth M of 8": encoder_forward(full, batch[0], batch[1]),
                                  "built with M": encoder_forward(short, batch[0], batch[1])}, 8 * args.rounds)
            rows[m_depth] = {k: statistics.median(v) for k, v in t.items()}
            rows[m_depth]["ratio"] = median_ratio(t["depth M of 8"], t["built with M"])
        # SLI: the same model at all n layers vs at depth sli, interleaved (times from different rounds can differ
        # by more than the layers do)
        forward = encoder_forward(full, batch[0], batch[1])
        t = time_interleaved({d: at_depth(full, d, forward) for d in (n, args.sli)}, 8 * args.rounds)
        full.encoder.set_inference_depth(None)
        result_infer[name] = {"per_depth": rows, "sli_speedup": median_ratio(t[n], t[args.sli])}
        print(name, {k: round(v["overhead"], 3) for k, v in result_train[name].items()},
              "SLI speed-up", round(result_infer[name]["sli_speedup"], 2), flush=True)
    if tmp is not None:
        tmp.cleanup()
    layer_params = {k: sum(q.numel() for q in m.encoder.layer_sets.parameters()) if hasattr(m.encoder, "layer_sets")
                    else sum(q.numel() for q in m.encoder.layers.parameters()) for k, m in models.items()}
    size = {"params": {k: count_params(m) for k, m in models.items()}, "encoder_layer_params": layer_params,
            "nemo_bytes": {k: nemo_bytes(m) for k, m in models.items()}}
    worst_overhead = max(v["overhead"] for r in result_train.values() for v in r.values())
    worst_infer = max(row["ratio"] for r in result_infer.values() for row in r["per_depth"].values())
    met = {"sampling overhead <= 1.03": worst_overhead <= TARGETS["sampling_overhead"],
           "inference at depth M <= 1.03 x built with M": worst_infer <= TARGETS["inference_vs_built"],
           "shared layer params exactly 1/8": layer_params["unshared"] == n * layer_params["shared G=1"]}
    result = {"benchmark": "layer reduction: sampled depth, inference depth, shared parameters", **machine(),
              "config": vars(args), "drawn_steps": steps, "train": result_train, "inference": result_infer,
              "size": size, "targets": TARGETS, "target_met": met}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"layer_reduction_{result['device']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    hw = result["gpu"] or f"{result['cpu']}, {result['cpu_threads']} threads"
    lines = [f"# Layer reduction costs ({hw}; torch {torch.__version__})", "",
             f"GroupNorm Conformer-CTC, {n} layers, d_model {args.d_model}, {args.heads} heads; depth sampled from "
             f"U{{{args.low}..{n}}}; batches of {args.batch} real utterances; training step = forward + CTC + backward "
             f"+ AdamW; {len(steps)} drawn steps (every depth twice) x {args.rounds} passes, each interleaved with a "
             f"step at the same fixed depth (overhead: the median of the per-step ratios; inference: "
             f"{8 * args.rounds} interleaved rounds per depth, the median ratio).", "",
             "| batch | model | sampled / same fixed depth (target <= 1.03) | speed-up of U(2, 8) over depth 8 |",
             "|---|---|---|---|"]
    for name, r in result_train.items():
        for k, v in r.items():
            lines.append(f"| {name} | {k} | {v['overhead']:.3f} | {v['speedup_vs_depth8']:.2f}x |")
    lines += ["", f"Inference (eval encoder forward) of the {n}-layer model at depth M / a model built with M layers "
              "(target <= 1.03), and SLI speed-up:", "",
              "| batch | " + " | ".join(f"M={m}" for m in range(1, n + 1)) + f" | SLI({args.sli}) vs {n} |",
              "|---|" + "---|" * (n + 1)]
    for name, r in result_infer.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['per_depth'][m]['ratio']:.3f}" for m in range(1, n + 1))
                     + f" | {r['sli_speedup']:.2f}x |")
    lines += ["", "| | unshared | shared G=1 | ratio |", "|---|---|---|---|",
              f"| encoder-layer parameters | {layer_params['unshared']:,} | {layer_params['shared G=1']:,} | "
              f"{layer_params['shared G=1'] / layer_params['unshared']:.4f} |",
              f"| model parameters | {size['params']['unshared']:,} | {size['params']['shared G=1']:,} | "
              f"{size['params']['shared G=1'] / size['params']['unshared']:.3f} |",
              f"| .nemo bytes | {size['nemo_bytes']['unshared']:,} | {size['nemo_bytes']['shared G=1']:,} | "
              f"{size['nemo_bytes']['shared G=1'] / size['nemo_bytes']['unshared']:.3f} |",
              "", "Targets met: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in met.items()) + "."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
