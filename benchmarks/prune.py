"""Adaptive-dropout pruning costs: training with gates vs dense, and the pruned model's size and inference speed.

In one run, at Conformer-M width (16 layers, d_model 256, 4 heads) on real batches (1-s commands, ~2-s sentences,
~9-s joined utterances):

- the training step (forward, CTC, backward, AdamW) of the gated model vs the dense one (target <= 1.10);
- the pruned model (built by ``prune``: FFN units, per-head query/key and value dimensions and conv groups
  removed) vs the dense one: parameters (target <= 0.45) and encoder inference time (target >= 1.8x faster; the
  encoder alone, on features computed beforehand; the shared mel preprocessor is timed in the same rounds and the
  speed-up with it added is reported too),
  with the limit the parameter ratio sets (1 / ratio), and a floor model pruned to one unit per gate: what
  pruning cannot remove, and the speed-up it leaves reachable at the pruned model's size;
- the same three encoders as NeMo's TorchScript export writes them (``encoder.export("enc.ts")``: traced, frozen),
  which is how a model is deployed without Python, and which drops Python's per-operator cost.

Which units are pruned: by default every gate keeps the share ``--keep`` of its units (drawn at random, seeded);
``--survival survival.json`` (from a trained model: ``layerfx prune --report`` or the AdaptiveDropout callback)
keeps, per layer and kind, the share that run kept, stretched over the 16 layers. Writes
results/prune_<device>.{json,md}.

    python benchmarks/prune.py --corpus data/commands --survival experiments/results/runs/adaptive_dropout_L8/adl_seed0/survival.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
from pathlib import Path

import torch
from nemo.collections.asr.models import EncDecCTCModelBPE
from nemo.utils import logging

from common import ctc_step, encoder_only, length_batches, machine, median_ratio, preprocessor_only, time_interleaved
from nemo_layerfx.models import count_params
from nemo_layerfx.pruning import gates_of, prune, remove_gates
from nemo_layerfx.train import compose_config

TARGETS = {"params": 0.45, "inference_speedup": 1.8, "gated_step": 1.10}


def build(args):
    enc = "model.encoder."
    over = [f"corpus_dir={args.corpus}", f"{enc}n_layers={args.layers}", f"{enc}d_model={args.d_model}",
            f"{enc}n_heads={args.heads}", f"{enc}subsampling_conv_channels={args.subsampling_channels}",
            f"{enc}conv_kernel_size={args.kernel}", f"{enc}dropout=0", f"{enc}dropout_att=0",
            f"+{enc}adaptive_dropout={{steps: 100}}"]
    torch.manual_seed(0)
    return EncDecCTCModelBPE(cfg=compose_config("conformer_gn_tiny", over).model)


def set_keep_(model, keep: dict[str, list[float]] | float, seed: int = 0) -> None:
    """Close gates so that layer i keeps the share keep[kind][i] of each kind (or ``keep`` everywhere)."""
    g = torch.Generator().manual_seed(seed)
    model.encoder.adaptive_dropout_schedule.step.fill_(10**6)  # c(t) = c_inf: the deterministic threshold
    layers = gates_of(model)
    for i, gates in enumerate(layers):
        for kind, gate in gates.items():
            if isinstance(keep, dict):
                src = keep[kind]
                share = src[min(len(src) - 1, i * len(src) // len(layers))]  # stretch the trained run's depth
            else:
                share = keep
            n_keep = max(1, round(share * gate.n))
            order = torch.randperm(gate.n, generator=g)
            with torch.no_grad():
                gate.beta_prime.fill_(-1.0)  # β = -12 < c_inf: pruned
                gate.beta_prime[order[:n_keep]] = 1.0  # β = 8 >= c_inf: kept


def export_encoder(model, path: Path):
    """The model's encoder as NeMo's TorchScript export writes it (``Exportable.export``: traced under inference
    mode, frozen), loaded back; exported from a copy, so the timed eager model is untouched."""
    copy.deepcopy(model.encoder).eval().export(str(path), check_trace=False)
    return torch.jit.load(str(path), map_location=next(model.parameters()).device)


def exported_forward(encoder, model, audio, lengths):
    """An exported encoder's inference on the model's features (computed once, outside the timed call)."""
    model.eval()
    with torch.no_grad():
        feats, flen = model.preprocessor(input_signal=audio, length=lengths)

    @torch.no_grad()
    def forward() -> None:
        encoder(feats, flen)

    return forward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True)
    p.add_argument("--sentences", help="sentences corpus (default: synthesize 96 utterances into a temp folder)")
    p.add_argument("--joined-seconds", type=float, default=8.0)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kernel", type=int, default=31)
    p.add_argument("--subsampling-channels", type=int, default=64)
    p.add_argument("--keep", type=float, default=0.4, help="share of units every gate keeps (without --survival)")
    p.add_argument("--survival", default=None, help="a survival.json: keep per layer and kind what that run kept")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=12,
                   help="interleaved rounds of the training steps (inference: twice as many)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    logging.setLevel(logging.ERROR)
    gated = build(args)
    keep = json.loads(Path(args.survival).read_text())["survival"] if args.survival else args.keep
    set_keep_(gated, keep)
    dense = remove_gates(gated)
    pruned, report = prune(gated)
    # what pruning these units cannot remove: every gate keeps one unit (front end, norms, residual stream, the
    # attention score maps, which keep their size, and the per-operator cost)
    floor_gated = build(args)
    set_keep_(floor_gated, 0.0)
    floor, _ = prune(floor_gated)
    models = {"dense": dense.to(args.device), "gated": gated.to(args.device), "pruned": pruned.to(args.device),
              "floor": floor.to(args.device)}
    params = {k: count_params(remove_gates(m) if k == "gated" else m) for k, m in models.items()}
    export_dir = tempfile.TemporaryDirectory()
    exported = {k: export_encoder(models[k], Path(export_dir.name) / f"{k}.ts") for k in ("dense", "pruned", "floor")}
    batches, tmp = length_batches(args.corpus, args.sentences, args.batch, args.joined_seconds)
    settings = {}
    for name, (audio, lengths, texts) in batches.items():
        audio, lengths = audio.to(args.device), lengths.to(args.device)
        gated.encoder.adaptive_dropout_schedule.step.fill_(50)  # mid-schedule: the gates sample, as in training
        train = time_interleaved({k: ctc_step(models[k], audio, lengths, texts, "adamw") for k in ("dense", "gated")},
                                 args.rounds)
        infer = time_interleaved({**{k: encoder_only(models[k], audio, lengths) for k in ("dense", "pruned", "floor")},
                                  "preprocessor": preprocessor_only(dense, audio, lengths)}, 2 * args.rounds)
        t = {k: statistics.median(v) for k, v in infer.items()}
        pre = infer.pop("preprocessor")
        # inference time linear in the parameters between the floor and the dense model, at the pruned model's size
        share = (params["pruned"] - params["floor"]) / (params["dense"] - params["floor"])
        linear = t["dense"] / (t["floor"] + share * (t["dense"] - t["floor"]))
        exp = time_interleaved({k: exported_forward(exported[k], models[k], audio, lengths)
                                for k in ("dense", "pruned", "floor")}, 2 * args.rounds)
        te = {k: statistics.median(v) for k, v in exp.items()}
        settings[name] = {"mean_seconds": round(float(lengths.float().mean()) / 16000, 2),
                          "train_step_s": {k: statistics.median(v) for k, v in train.items()},
                          "gated_step_ratio": median_ratio(train["gated"], train["dense"]),
                          "inference_s": t,
                          "inference_speedup": median_ratio(infer["dense"], infer["pruned"]),
                          "floor_speedup": median_ratio(infer["dense"], infer["floor"]), "linear_estimate": linear,
                          # the same, each model's time with the shared preprocessor's of that round added
                          "with_preprocessor_speedup": statistics.median(
                              (d + q) / (p + q) for d, p, q in zip(infer["dense"], infer["pruned"], pre)),
                          # the encoders as NeMo's TorchScript export writes them (traced, frozen), in their own rounds
                          "exported_s": te, "exported_speedup": median_ratio(exp["dense"], exp["pruned"]),
                          "exported_floor_speedup": median_ratio(exp["dense"], exp["floor"]),
                          "exported_linear_estimate": te["dense"] / (te["floor"] + share * (te["dense"] - te["floor"])),
                          "raw": {"train": train, "inference": {**infer, "preprocessor": pre}, "exported": exp}}
        print(name, round(settings[name]["gated_step_ratio"], 3), round(settings[name]["inference_speedup"], 2),
              round(settings[name]["exported_speedup"], 2), flush=True)
    if tmp is not None:
        tmp.cleanup()
    export_dir.cleanup()
    ratio = params["pruned"] / params["dense"]
    met = {"params <= 0.45": ratio <= TARGETS["params"],
           **{f"inference >= 1.8x ({k})": v["inference_speedup"] >= TARGETS["inference_speedup"]
              for k, v in settings.items()},
           **{f"exported inference >= 1.8x ({k})": v["exported_speedup"] >= TARGETS["inference_speedup"]
              for k, v in settings.items()},
           **{f"gated step <= 1.10 ({k})": v["gated_step_ratio"] <= TARGETS["gated_step"] for k, v in settings.items()}}
    result = {"benchmark": "adaptive-dropout gates and the pruned model vs dense", **machine(), "config": vars(args),
              "kept": report.kept, "params": params, "param_ratio": ratio, "settings": settings, "targets": TARGETS,
              "target_met": met}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"prune_{result['device']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    hw = result["gpu"] or f"{result['cpu']}, {result['cpu_threads']} threads"
    source = f"the survival pattern of {args.survival}" if args.survival else f"{args.keep:.0%} of every gate's units"
    lines = [f"# Adaptive-dropout pruning costs ({hw}; torch {torch.__version__})", "",
             f"GroupNorm Conformer-CTC, {args.layers} layers, d_model {args.d_model}, {args.heads} heads, conv "
             f"kernel {args.kernel}; pruned model keeps {source}; batches of {args.batch} real utterances; "
             f"{args.rounds} interleaved rounds (training), {2 * args.rounds} (inference).", "",
             "| | dense | pruned | ratio |", "|---|---|---|---|",
             f"| parameters | {params['dense']:,} | {params['pruned']:,} | {ratio:.3f} (target <= 0.45) |", "",
             "| batch | gated / dense training step (target <= 1.10) | inference speed-up of the pruned encoder "
             "(target >= 1.8) | with the preprocessor | limit 1 / parameter ratio | floor model | linear estimate |",
             "|---|---|---|---|---|---|---|"]
    for k, v in settings.items():
        lines.append(f"| {k}, mean {v['mean_seconds']:.1f} s | {v['gated_step_ratio']:.3f} | "
                     f"{v['inference_speedup']:.2f}x | {v['with_preprocessor_speedup']:.2f}x | {1 / ratio:.2f}x | "
                     f"{v['floor_speedup']:.2f}x | "
                     f"{v['linear_estimate']:.2f}x |")
    lines += ["", "Exported (NeMo's TorchScript export of each encoder: traced, frozen; timed in their own interleaved "
              "rounds):", "", "| batch | inference speed-up of the pruned encoder (target >= 1.8) | floor model | "
              "linear estimate | dense / pruned / floor, median s |", "|---|---|---|---|---|"]
    for k, v in settings.items():
        e = v["exported_s"]
        lines.append(f"| {k} | {v['exported_speedup']:.2f}x | {v['exported_floor_speedup']:.2f}x | "
                     f"{v['exported_linear_estimate']:.2f}x | {e['dense']:.3f} / {e['pruned']:.3f} / {e['floor']:.3f} |")
    lines += ["", "Inference: the encoder alone on features computed beforehand; 'with the preprocessor' adds the "
              "shared mel preprocessor's time of the same round to both models."]
    lines += ["", f"Floor model: the same encoder pruned to one unit per gate ({params['floor']:,} parameters), timed "
              "in the same rounds: what pruning these units cannot remove (front end, norms, the d_model-wide residual "
              "stream, attention score maps, which keep their size, per-operator cost). Linear estimate: the "
              "speed-up if inference time were linear in the parameters between the floor and the dense model."]
    lines += ["", "Targets met: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in met.items()) + "."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
