"""Federated-dropout client cost: a submodel at dropout rate 0.5 (FFN units, heads, conv groups) vs the full model.

In one run: parameter count, payload bytes (the Flower ArrayRecord a client receives and returns) and the time of
one client training step (forward, CTC loss, backward, SGD step) on the same real batches, alternating full and
submodel steps and taking the median of per-round ratios. The step is timed at three utterance lengths, because on
a CPU a short-utterance step is bound by the per-operator cost that both models pay alike: 1-s commands (the
``--corpus``), ~2-s sentences, and ~8-s utterances joined from consecutive sentences of one speaker (LibriSpeech's
mean is 12 s). The sentences corpus is synthesized offline into a temporary folder unless ``--sentences`` names
one. Writes results/fd_client_cpu[_front<W>].{json,md}. Federated dropout shrinks the Conformer layers only
(d_model is fixed), so the ratios also depend on how much of the model sits outside them:
``--subsampling-channels -1`` measures NeMo's full-width front end. A third model in the same rounds, keeping 5 % of
every layer's units, measures what no dropout rate removes, and the step ratio those fixed costs leave reachable.

A second comparison asks what a client whose memory is set by the full model gains from a smaller model: one SGD
step over twice the batch, which the full model takes as two accumulated passes and the submodel in one pass where
that holds no more memory (counted exactly: parameters, gradients, tensors saved for backward), as a client with
``micro_batch_size`` does (``nemo_layerfx.fl.task.pass_size``). Both compute the gradient of the same mean loss
(the encoder is padding-exact; the run checks the losses and gradients); the ratio is submodel time / full-model
time for that step.

    python benchmarks/fd_client.py --corpus data/commands
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from nemo.collections.asr.models import EncDecCTCModelBPE
from nemo.utils import logging

from common import ctc_step, length_batches, machine, median_ratio, time_interleaved, training_memory
from nemo_layerfx.evaluate import targets_of
from nemo_layerfx.fd import DropoutPlan, FreezeSpec, extract, freeze_
from nemo_layerfx.models import clone_model, count_params
from nemo_layerfx.train import compose_config

TARGETS = {"params": 0.52, "bytes": 0.52, "step_time": 0.55, "step_time_front_frozen": 0.50}


def payload_bytes(model, names: list[str] | None = None) -> int:
    """Bytes of the ArrayRecord carrying ``model``'s tensors (only ``names``: partial-variable training)."""
    state = {k: v for k, v in model.state_dict().items() if names is None or k in names}
    try:
        from flwr.app import ArrayRecord

        return ArrayRecord(state).count_bytes()
    except ImportError:  # same tensors, without Flower's small per-array header
        return sum(v.numel() * v.element_size() for v in state.values())


FLOOR_RATE = 0.95  # the floor model keeps 5 % of every layer's FFN units, heads and conv groups


def linear_estimate(floor_ratio: float, rate: float) -> float:
    """The step-time ratio at ``rate`` if time were linear in the kept width between the floor model's (kept share
    1 - FLOOR_RATE) and the full model's: what the fixed costs leave reachable without making them smaller."""
    return floor_ratio + (1 - floor_ratio) * ((1 - rate) - (1 - FLOOR_RATE)) / FLOOR_RATE


def accumulation_error(model, audio, lengths, texts, micro_batches: int) -> dict[str, float]:
    """Loss and gradients of one pass over the batch vs ``micro_batches`` accumulated ones (eval mode: no dither or
    SpecAugment; features computed once, so only the encoder's padding-exactness is tested)."""
    model.eval()
    with torch.no_grad():
        feats, flen = model.preprocessor(input_signal=audio, length=lengths)
    targets, tl = targets_of(model, texts, audio.device)

    def loss_grads(idx: slice) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        f = feats[idx, :, : int(flen[idx].max())]
        log_probs, enc_len, _ = model(processed_signal=f, processed_signal_length=flen[idx])
        loss = model.loss(log_probs=log_probs, targets=targets[idx], input_lengths=enc_len, target_lengths=tl[idx])
        loss.backward()
        return float(loss), [p.grad.clone() for p in model.parameters()]

    whole, g_whole = loss_grads(slice(None))
    b = len(texts) // micro_batches
    parts = [loss_grads(slice(i * b, (i + 1) * b)) for i in range(micro_batches)]
    acc_loss = sum(p[0] for p in parts) / micro_batches
    g_acc = [sum(p[1][k] for p in parts) / micro_batches for k in range(len(g_whole))]
    model.zero_grad(set_to_none=True)
    scale = max(float(g.abs().max()) for g in g_whole)
    return {"loss_abs_diff": abs(whole - acc_loss),
            "grad_max_abs_diff_rel": max(float((a - w).abs().max()) for a, w in zip(g_acc, g_whole)) / scale}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True, help="commands corpus (its tokenizer builds the model)")
    p.add_argument("--sentences", help="sentences corpus (default: synthesize 96 utterances into a temp folder)")
    p.add_argument("--joined-seconds", type=float, default=8.0, help="length of the joined utterances")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--subsampling-channels", type=int, default=64,
                   help="front-end conv width (the shipped tiny preset's 64; -1: NeMo's default, d_model)")
    p.add_argument("--rate", type=float, default=0.5, help="dropout rate on every layer and unit kind")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--ambient-report", help="a block probe report of a trained model of this depth: adds the "
                                            "submodel with the front end and its 2 most ambient blocks frozen")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    logging.setLevel(logging.ERROR)
    torch.manual_seed(0)
    cfg = compose_config("conformer_gn_tiny", [f"corpus_dir={args.corpus}", f"model.encoder.n_layers={args.layers}",
                                               f"model.encoder.d_model={args.d_model}",
                                               f"model.encoder.n_heads={args.heads}",
                                               f"model.encoder.subsampling_conv_channels={args.subsampling_channels}",
                                               "model.encoder.dropout=0", "model.encoder.dropout_att=0"])
    full = EncDecCTCModelBPE(cfg=cfg.model)
    plan = DropoutPlan.flat(args.layers, args.rate, kinds=("ffn", "head", "conv"))
    sub, _ = extract(full, plan, seed=0)
    # what no dropout rate removes: the front end, norms, residual stream, loss, per-operator cost (keep 5 %)
    floor, _ = extract(full, DropoutPlan.flat(args.layers, FLOOR_RATE, kinds=("ffn", "head", "conv")), seed=0)
    # partial-variable training (FLConfig.freeze): the same submodel with the front end frozen, and with the 2 most
    # ambient blocks frozen too (given a report); they send and return only what they train
    frozen = {"sub_front": FreezeSpec(names=("front_end",))}
    if args.ambient_report:
        frozen["sub_front_amb2"] = FreezeSpec(names=("front_end",),
                                              blocks={"report": args.ambient_report, "n": 2, "target": "ambient"})
    variants = {name: clone_model(sub) for name in frozen}
    trained = {name: freeze_(variants[name], spec) for name, spec in frozen.items()}
    batches, tmp = length_batches(args.corpus, args.sentences, args.batch, args.joined_seconds)
    doubled, _ = length_batches(args.corpus, tmp.name if tmp else args.sentences, 2 * args.batch, args.joined_seconds)
    settings, memory = {}, {}
    for name, (audio, lengths, texts) in batches.items():
        times = time_interleaved({"full": ctc_step(full, audio, lengths, texts),
                                  "sub": ctc_step(sub, audio, lengths, texts),
                                  "floor": ctc_step(floor, audio, lengths, texts),
                                  **{k: ctc_step(m, audio, lengths, texts) for k, m in variants.items()}},
                                 args.rounds)
        floor_ratio = median_ratio(times["floor"], times["full"])
        a2, l2, t2 = doubled[name]
        half = int(l2[: args.batch].max())  # the full model's first pass, padded as ctc_step's passes pad it
        memory[name] = {"full, batch": training_memory(full, a2[: args.batch, :half], l2[: args.batch],
                                                       t2[: args.batch], adam=False),
                        "sub, 2x batch": training_memory(sub, a2, l2, t2, adam=False)}
        # as nemo_layerfx.fl.task.pass_size decides: one pass where it fits the full model's memory, else two
        sub_passes = 1 if memory[name]["sub, 2x batch"]["total"] <= memory[name]["full, batch"]["total"] else 2
        times2 = time_interleaved({"full": ctc_step(full, a2, l2, t2, passes=2),
                                   "sub": ctc_step(sub, a2, l2, t2, passes=sub_passes)}, args.rounds)
        settings[name] = {
            "mean_seconds": round(float(lengths.float().mean()) / 16000, 2),
            "step_s": times, "median_s": {k: statistics.median(v) for k, v in times.items()},
            "ratio": median_ratio(times["sub"], times["full"]),
            "frozen": {k: {"ratio": median_ratio(times[k], times["full"]),
                           "memory_ratio": (training_memory(m, audio, lengths, texts, adam=False)["total"]
                                            / training_memory(full, audio, lengths, texts, adam=False)["total"])}
                       for k, m in variants.items()},
            "floor_ratio": floor_ratio, "linear_estimate": linear_estimate(floor_ratio, args.rate),
            "equal_memory": {"step_s": times2, "ratio": median_ratio(times2["sub"], times2["full"]),
                             "sub_passes": sub_passes,
                             "memory_bytes": memory[name],
                             "memory_ratio": (memory[name]["sub, 2x batch"]["total"]
                                              / memory[name]["full, batch"]["total"]),
                             "accumulation_error": accumulation_error(sub, a2, l2, t2, 2)}}
        print(name, settings[name]["mean_seconds"], "s:", round(settings[name]["ratio"], 3), "floor:",
              round(floor_ratio, 3), "equal memory:", round(settings[name]["equal_memory"]["ratio"], 3), flush=True)
    if tmp is not None:
        tmp.cleanup()
    params = {"full": count_params(full), "sub": count_params(sub)}
    sizes = {"full": payload_bytes(full), "sub": payload_bytes(sub),
             **{k: payload_bytes(m, trained[k]) for k, m in variants.items()}}
    enc = {k: count_params(m.encoder.layers) for k, m in (("full", full), ("sub", sub))}
    ratio = {"params": params["sub"] / params["full"], "bytes": sizes["sub"] / sizes["full"],
             "encoder_layer_params": enc["sub"] / enc["full"]}
    met = {"params": ratio["params"] <= TARGETS["params"], "bytes": ratio["bytes"] <= TARGETS["bytes"],
           **{f"step_time ({k})": v["ratio"] <= TARGETS["step_time"] for k, v in settings.items()},
           **{f"step_time, front end frozen ({k})": v["frozen"]["sub_front"]["ratio"]
              <= TARGETS["step_time_front_frozen"] for k, v in settings.items()}}
    result = {
        "benchmark": f"federated-dropout client at rate {args.rate} on FFN units, heads and conv groups vs full model",
        **machine(), "config": vars(args), "params": params, "payload_bytes": sizes, "ratios": ratio,
        "step_time": settings, "targets": TARGETS, "target_met": met,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "fd_client_cpu" + ("" if args.subsampling_channels == 64 else f"_front{args.subsampling_channels}")
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    t = TARGETS["step_time"]
    lines = [f"# Federated-dropout client cost (CPU, {result['cpu_threads']} threads; torch {torch.__version__})", "",
             (f"CTC GroupNorm Conformer, {args.layers} layers, d_model {args.d_model}, {args.heads} heads, front-end "
             f"conv width {args.subsampling_channels if args.subsampling_channels > 0 else args.d_model}; submodel "
             f"drops {args.rate:.0%} of FFN units, heads and conv groups in every layer; step = forward + CTC loss + "
             f"backward + SGD on a batch of {args.batch} real utterances; {args.rounds} alternating rounds per "
             f"length."),
             "", "| | full | submodel | ratio | target |", "|---|---|---|---|---|",
             f"| parameters | {params['full']:,} | {params['sub']:,} | {ratio['params']:.3f} | <= 0.52 |",
             f"| payload bytes | {sizes['full']:,} | {sizes['sub']:,} | {ratio['bytes']:.3f} | <= 0.52 |"]
    for k, v in settings.items():
        lines.append(f"| step time (median s), {k}, mean {v['mean_seconds']:.1f} s | {v['median_s']['full']:.3f} | "
                     f"{v['median_s']['sub']:.3f} | {v['ratio']:.3f} | <= {t} |")
    lines += ["", "## Partial-variable training: the submodel with parts frozen", "",
              "The same submodel with the front end (`encoder.pre_encode`) frozen"
              + (", and with the front end and the report's 2 most ambient blocks frozen" if args.ambient_report
                 else " (the frozen-ambient variant needs `--ambient-report`, a probe report of a trained model of "
                      "this depth; not run)")
              + ": it trains, sends and returns only the rest (`FLConfig.freeze`). Step time and training memory "
              "(SGD: parameters, gradients, tensors saved for backward) on the same batch, relative to the full "
              "model's; bytes: the payload each way.", "",
              "| variant | payload bytes (ratio) | " + " | ".join(f"step, {k}" for k in settings) + " | "
              + " | ".join(f"memory, {k}" for k in settings) + " |",
              "|---|---|" + "---|" * (2 * len(settings))]
    for variant in variants:
        lines.append(f"| {variant} | {sizes[variant]:,} ({sizes[variant] / sizes['full']:.3f}) | "
                     + " | ".join(f"{v['frozen'][variant]['ratio']:.3f}" for v in settings.values()) + " | "
                     + " | ".join(f"{v['frozen'][variant]['memory_ratio']:.3f}" for v in settings.values()) + " |")
    lines.append(f"\nTarget: a step with the front end frozen <= {TARGETS['step_time_front_frozen']} of the full "
                 "model's at every length.")
    lines += ["", f"Encoder-layer parameters alone: {ratio['encoder_layer_params']:.3f} of the full model's (the "
              f"subsampling front end, norms and decoder keep their size). Targets met: "
              + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in met.items()) + ".", "",
              "## What the fixed costs leave reachable", "",
              f"In the same rounds, a floor model keeping {1 - FLOOR_RATE:.0%} of every layer's units steps in the "
              f"time below (relative to the full model): what no dropout rate removes (front end, norms, the "
              f"d_model-wide residual stream, loss, optimizer on the kept-size parameters, per-operator cost). If the "
              f"rest of the step shrank in proportion to the kept width, rate {args.rate} would step at the "
              f"linear estimate.", "",
              "| length | floor / full | linear estimate at this rate | measured submodel |", "|---|---|---|---|"]
    for k, v in settings.items():
        lines.append(f"| {k} | {v['floor_ratio']:.3f} | {v['linear_estimate']:.3f} | {v['ratio']:.3f} |")
    lines += ["",
              f"## One SGD step over {2 * args.batch} utterances at the full model's memory", "",
              f"The full model takes the step as 2 accumulated passes of {args.batch} (the memory of one pass of "
              f"{args.batch} sets the device's budget). The submodel takes it in one pass of {2 * args.batch} where "
              f"that holds no more memory, else in 2 passes too: what a federated client with "
              f"`micro_batch_size: {args.batch}` does (`nemo_layerfx.fl.task.pass_size`). Same gradient (checked on "
              f"the submodel: one pass vs two accumulated, features computed once). Memory counted exactly "
              f"(parameters, gradients, tensors saved for backward; SGD has no state). Not the same-batch step the "
              f"target is set on.", "",
              f"| length | memory, full (pass of {args.batch}) / sub (pass of {2 * args.batch}) | sub passes | step "
              f"time full ({args.batch} + {args.batch}) | sub | ratio | loss diff | grad diff (rel.) |",
              "|---|---|---|---|---|---|---|---|"]
    for k, v in settings.items():
        e = v["equal_memory"]
        mf, ms = e["memory_bytes"]["full, batch"]["total"], e["memory_bytes"]["sub, 2x batch"]["total"]
        lines.append(f"| {k} | {mf / 2**20:.0f} MiB / {ms / 2**20:.0f} MiB ({e['memory_ratio']:.2f}x) | "
                     f"{e['sub_passes']} | "
                     f"{statistics.median(e['step_s']['full']):.3f} s | "
                     f"{statistics.median(e['step_s']['sub']):.3f} s | {e['ratio']:.3f} | "
                     f"{e['accumulation_error']['loss_abs_diff']:.1e} | "
                     f"{e['accumulation_error']['grad_max_abs_diff_rel']:.1e} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
