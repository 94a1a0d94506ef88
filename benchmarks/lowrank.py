"""Low-rank (LR-SMS) vs full-rank Conformer-CTC: parameters, training step, inference, training memory, FLOPs.

In one run, at Conformer-M width (16 layers, d_model 256, 4 heads) built from scratch: the full-rank model and the
same model with ``low_rank`` (default the paper's LR-SMS, MHSA ramp [0.1, 0.2], FFN ramp [0.2, 0.5]). On real
batches of 1-s commands, ~2-s sentences and ~9-s joined utterances: the training step (forward, CTC loss, backward,
AdamW) and encoder inference, the two models interleaved (median of per-round ratios); the FLOPs of a training
step (torch's FlopCounterMode: matmuls and convolutions), whose ratio is the speed-up a purely compute-bound step
would get; and the memory a training step holds (parameters, gradients, Adam state, tensors saved for backward).
A third model with every factorized linear at rank 1, timed in the same rounds, measures the part of the step that
low rank leaves, and so the speed-up bounds it sets (Amdahl).
Writes results/lowrank_<device>.{json,md}.

    python benchmarks/lowrank.py --corpus data/commands
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from nemo.collections.asr.models import EncDecCTCModelBPE
from nemo.utils import logging

from common import (
    ctc_step, encoder_forward, length_batches, machine, median_ratio, step_flops, time_interleaved, training_memory,
)
from nemo_layerfx.lowrank import LowRankConfig, parse_spec
from nemo_layerfx.models import count_params
from nemo_layerfx.train import compose_config

TARGETS = {"encoder_params": 0.5, "train_speedup": 1.4}


def build(args, low_rank: dict | None):
    enc = "model.encoder."
    over = [f"corpus_dir={args.corpus}", f"{enc}n_layers={args.layers}", f"{enc}d_model={args.d_model}",
            f"{enc}n_heads={args.heads}", f"{enc}subsampling_conv_channels={args.subsampling_channels}",
            f"{enc}conv_kernel_size={args.kernel}", f"{enc}dropout=0", f"{enc}dropout_att=0"]
    if low_rank is not None:
        over.append("+model.encoder.low_rank=" + json.dumps(low_rank).replace('"', ""))
    torch.manual_seed(0)
    return EncDecCTCModelBPE(cfg=compose_config("conformer_gn_tiny", over).model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True, help="commands corpus (its tokenizer builds the model)")
    p.add_argument("--sentences", help="sentences corpus (default: synthesize 96 utterances into a temp folder)")
    p.add_argument("--joined-seconds", type=float, default=8.0, help="length of the joined utterances")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kernel", type=int, default=31, help="conv kernel (Gulati's 32, odd for NeMo)")
    p.add_argument("--subsampling-channels", type=int, default=64, help="front-end conv width (-1: d_model)")
    p.add_argument("--att", default="0.1,0.2", help="MHSA rank spec (layerfx lowrank syntax)")
    p.add_argument("--ffn", default="0.2,0.5", help="FFN rank spec")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    logging.setLevel(logging.ERROR)
    spec = LowRankConfig(att=parse_spec(args.att), ffn=parse_spec(args.ffn)).to_dict()
    models = {"full": build(args, None).to(args.device), "lowrank": build(args, spec).to(args.device)}
    params = {k: {"encoder": count_params(m.encoder), "model": count_params(m)} for k, m in models.items()}
    # what low rank cannot remove: every factorized linear at rank 1 leaves the rest of the step
    ones = {"ranks": [1] * args.layers}
    timed = {**models, "rank1": build(args, LowRankConfig(att=ones, ffn=ones).to_dict()).to(args.device)}
    batches, tmp = length_batches(args.corpus, args.sentences, args.batch, args.joined_seconds)
    settings = {}
    for name, (audio, lengths, texts) in batches.items():
        audio, lengths = audio.to(args.device), lengths.to(args.device)
        train = time_interleaved({k: ctc_step(m, audio, lengths, texts, "adamw") for k, m in timed.items()},
                                 args.rounds)
        infer = time_interleaved({k: encoder_forward(m, audio, lengths) for k, m in models.items()}, args.rounds)
        flops = {k: step_flops(m, audio, lengths, texts) for k, m in timed.items()}
        memory = {k: training_memory(m, audio, lengths, texts) for k, m in models.items()}
        speedup = median_ratio(train["full"], train["lowrank"])
        flop_limit = flops["full"] / flops["lowrank"]
        t = {k: statistics.median(v) for k, v in train.items()}
        # Amdahl: the rank-1 step is what the factorized linears leave; the linears' share is full - rank1
        lin_flops = (flops["lowrank"] - flops["rank1"]) / (flops["full"] - flops["rank1"])
        bounds = {"linears_free": median_ratio(train["full"], train["rank1"]),
                  "linears_at_dense_efficiency": t["full"] / (t["rank1"] + (t["full"] - t["rank1"]) * lin_flops),
                  "linear_speedup": (t["full"] - t["rank1"]) / (t["lowrank"] - t["rank1"]),
                  "linear_flop_ratio": 1 / lin_flops, "rest_share": t["rank1"] / t["full"]}
        settings[name] = {
            "mean_seconds": round(float(lengths.float().mean()) / 16000, 2),
            "train_step_s": t, "train_speedup": speedup, "amdahl": bounds,
            "inference_s": {k: statistics.median(v) for k, v in infer.items()},
            "inference_speedup": median_ratio(infer["full"], infer["lowrank"]),
            "step_flops": flops, "flop_limited_speedup": flop_limit, "share_of_flop_limit": speedup / flop_limit,
            "training_memory_bytes": memory, "memory_ratio": memory["lowrank"]["total"] / memory["full"]["total"],
            "raw": {"train": train, "inference": infer}}
        print(f"{name}: train {speedup:.2f}x (FLOP limit {flop_limit:.2f}x, linears free "
              f"{bounds['linears_free']:.2f}x, at dense efficiency {bounds['linears_at_dense_efficiency']:.2f}x), "
              f"inference {settings[name]['inference_speedup']:.2f}x, memory {settings[name]['memory_ratio']:.3f}",
              flush=True)
    if tmp is not None:
        tmp.cleanup()
    enc_ratio = params["lowrank"]["encoder"] / params["full"]["encoder"]
    met = {"encoder_params <= 0.5": enc_ratio <= TARGETS["encoder_params"],
           **{f"train_speedup >= 1.4 ({k})": v["train_speedup"] >= TARGETS["train_speedup"]
              for k, v in settings.items()},
           **{f"memory lower ({k})": v["memory_ratio"] < 1 for k, v in settings.items()}}
    result = {"benchmark": "LR-SMS low-rank vs full-rank GroupNorm Conformer-CTC", **machine(), "config": vars(args),
              "low_rank": spec, "params": params, "encoder_param_ratio": enc_ratio, "settings": settings,
              "targets": TARGETS, "target_met": met}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"lowrank_{result['device']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    hw = result["gpu"] or f"{result['cpu']}, {result['cpu_threads']} threads"
    front = args.subsampling_channels if args.subsampling_channels > 0 else args.d_model
    lines = [f"# Low-rank (LR-SMS) vs full rank ({hw}; torch {torch.__version__})", "",
             (f"GroupNorm Conformer-CTC from scratch, {args.layers} layers, d_model {args.d_model}, {args.heads} "
              f"heads, conv kernel {args.kernel}, front-end width {front}; "
              f"low rank: MHSA {args.att}, FFN {args.ffn} (rank = α·min(m, n), ramps over blocks). Batches of "
              f"{args.batch} real utterances; {args.rounds} interleaved rounds per measurement; training step = "
              f"forward + CTC + backward + AdamW."), "",
             "| | full rank | low rank | ratio |", "|---|---|---|---|",
             f"| encoder parameters | {params['full']['encoder']:,} | {params['lowrank']['encoder']:,} | "
             f"{enc_ratio:.3f} (target <= 0.5) |",
             f"| model parameters | {params['full']['model']:,} | {params['lowrank']['model']:,} | "
             f"{params['lowrank']['model'] / params['full']['model']:.3f} |", "",
             "| batch | train step full / low (s) | train speed-up (target >= 1.4) | FLOP-limited speed-up | "
             "achieved share | inference speed-up | training memory low / full |", "|---|---|---|---|---|---|---|"]
    for k, v in settings.items():
        lines.append(f"| {k}, mean {v['mean_seconds']:.1f} s | {v['train_step_s']['full']:.3f} / "
                     f"{v['train_step_s']['lowrank']:.3f} | {v['train_speedup']:.2f}x | "
                     f"{v['flop_limited_speedup']:.2f}x | {v['share_of_flop_limit']:.0%} | "
                     f"{v['inference_speedup']:.2f}x | {v['memory_ratio']:.3f} |")
    lines += ["", "What low rank cannot remove, measured in the same rounds: a third model with every factorized "
              "linear at rank 1 (the rest of the step: front end, conv modules, attention scores, norms, "
              "element-wise work, per-operator cost). Speed-up bounds: if the factorized linears cost nothing "
              "(full / rank-1 step), and if they ran at the dense linears' time per FLOP (the rank-1 step plus the "
              "dense linears' time scaled by the FLOP ratio of the linears).", "",
              "| batch | rest of the step (rank-1 / full) | linears: FLOP ratio / time ratio | bound, linears free | "
              "bound, linears at dense efficiency | measured |", "|---|---|---|---|---|---|"]
    for k, v in settings.items():
        b = v["amdahl"]
        lines.append(f"| {k} | {b['rest_share']:.2f} | {b['linear_flop_ratio']:.2f}x / {b['linear_speedup']:.2f}x "
                     f"| {b['linears_free']:.2f}x | {b['linears_at_dense_efficiency']:.2f}x | "
                     f"{v['train_speedup']:.2f}x |")
    lines += ["", "Targets met: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in met.items()) + ".",
              "", "FLOP-limited speed-up: FLOPs of the full step / FLOPs of the low-rank step (what a purely "
              "compute-bound step would gain). Training memory: parameters + gradients + Adam moments + tensors "
              "saved for backward, counted exactly (not allocator peaks)."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
