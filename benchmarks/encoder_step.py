"""Encoder forward+backward step time: our padding-exact GroupNorm vs NeMo's BatchNorm and NeMo's group_normG.

All three encoders get identical weights (where shapes allow) and identical padded batches of varying lengths.
Timings are interleaved round by round (A, B, C, A, B, C, ...) so machine noise hits all three alike; the
report gives medians and ratios to BatchNorm. All three run the same attention and front end (ours, given to NeMo's
encoders here by ``lean_modules_``), so the ratios compare the conv modules: the norm, and on a CPU our pointwise
convs, which run as matrix products (``conv.pointwise``). On CUDA with Triton our
encoder runs twice: with the fused GroupNorm kernels (what users get) and with the reference ops
(``layerfx_group_norm_reference``), so the kernels' gain is measured in the same run. Writes
results/encoder_step_<device>[_<tag>].{json,md}.

    python benchmarks/encoder_step.py                  # CPU, tiny demo encoder
    python benchmarks/encoder_step.py --device cuda --d-model 256 --layers 16 --batch 32
    python benchmarks/encoder_step.py --device cuda --d-model 512 --layers 17 --heads 8 --batch 32 --tag large
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
from nemo.collections.asr.modules import ConformerEncoder
from nemo_layerfx.encoder import GroupNormConformerEncoder, lean_modules_
from nemo_layerfx.encoder.fused_gn import fused_group_norm, use_fused


def build(cls, norm: str, args, device):
    torch.manual_seed(0)
    enc = cls(feat_in=80, n_layers=args.layers, d_model=args.d_model, n_heads=args.heads, conv_kernel_size=15,
              subsampling="striding", subsampling_conv_channels=64, conv_norm_type=norm, dropout=0.1)
    lean_modules_(enc)  # our attention and front end (the same numbers, fewer passes) on NeMo's encoders too
    return enc.to(device).train()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(enc, x, lengths, device, gn_mode: str = "auto") -> float:
    sync(device)
    t0 = time.perf_counter()
    with fused_group_norm(gn_mode):
        out, _ = enc(audio_signal=x, length=lengths)
    out.float().pow(2).mean().backward()
    sync(device)
    dt = time.perf_counter() - t0
    enc.zero_grad(set_to_none=True)
    return dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--d-model", type=int, default=144)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tag", default="", help="suffix of the result files (e.g. large)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    device = torch.device(args.device)
    encoders = {
        "nemo_batch_norm": build(ConformerEncoder, "batch_norm", args, device),
        "nemo_group_norm": build(ConformerEncoder, f"group_norm{args.groups}", args, device),
        "layerfx_group_norm": build(GroupNormConformerEncoder, f"group_norm{args.groups}", args, device),
    }
    fused = use_fused(torch.empty(0, device=device))
    if fused:  # the same encoder on the reference ops, to measure the kernels' own gain
        encoders["layerfx_group_norm_reference"] = encoders["layerfx_group_norm"]
    g = torch.Generator().manual_seed(0)
    # 1-4 s utterances (100-400 feature frames), zero-padded to the longest: the padding NeMo batches carry
    batches = []
    for _ in range(8):
        lengths = torch.randint(100, 401, (args.batch,), generator=g)
        x = torch.randn(args.batch, 80, int(lengths.max()), generator=g)
        x = x * (torch.arange(x.shape[2])[None, None, :] < lengths[:, None, None])
        batches.append((x.to(device), lengths.to(device)))
    times: dict[str, list[float]] = {k: [] for k in encoders}
    names = list(encoders)
    for r in range(args.warmup + args.rounds):
        x, lengths = batches[r % len(batches)]
        order = names[r % len(names):] + names[: r % len(names)]  # rotate so no encoder always runs first
        for name in order:
            dt = step(encoders[name], x, lengths, device, "off" if name.endswith("_reference") else "auto")
            if r >= args.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    # paired: each round's ratio to BatchNorm on the same batch, then the median over rounds
    paired = {k: statistics.median(a / b for a, b in zip(v, times["nemo_batch_norm"])) for k, v in times.items()}
    result = {
        "benchmark": "encoder forward+backward step",
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "nemo": __import__("nemo").__version__,
                     "nemo_layerfx": nemo_layerfx.__version__, "python": platform.python_version()},
        "config": vars(args),
        "fused_group_norm": fused,
        "median_s": med,
        "ratio_to_batch_norm": paired,
        "ratio_of_medians": {k: v / med["nemo_batch_norm"] for k, v in med.items()},
        "target": "layerfx_group_norm <= 1.05 x nemo_batch_norm",
    }
    result["target_met"] = result["ratio_to_batch_norm"]["layerfx_group_norm"] <= 1.05
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"encoder_step_{device.type}" + (f"_{args.tag}" if args.tag else "")
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Encoder step ({device.type}: {result['device_name']}, {result['cpu_threads']} CPU threads)", "",
             f"d_model {args.d_model}, {args.layers} layers, batch {args.batch} of 1-4 s, {args.rounds} interleaved "
             f"rounds; torch {torch.__version__}, NeMo {result['versions']['nemo']}; our GroupNorm on "
             f"{'the fused Triton kernels' if fused else 'the reference ops (no fused kernels here)'}", "",
             "| encoder | median step (s) | ratio to BatchNorm (median of paired rounds) |", "|---|---|---|"]
    lines += [f"| {k} | {med[k]:.4f} | {paired[k]:.3f} |" for k in encoders]
    lines += ["", f"Target ours <= 1.05x BatchNorm: {'met' if result['target_met'] else 'NOT met'}."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
