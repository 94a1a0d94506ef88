"""Federated-dropout client cost: a submodel at dropout rate 0.5 (FFN units, heads, conv groups) vs the full model.

In one run: parameter count, payload bytes (the Flower ArrayRecord a client receives and returns) and the time of
one client training step (forward, CTC loss, backward, SGD step) on the same real batches, alternating full and
submodel steps and taking the median of per-pair ratios. The step is timed at three utterance lengths, because on
a CPU a short-utterance step is bound by the per-operator cost that both models pay alike: 1-s commands (the
``--corpus``), ~2-s sentences, and ~8-s utterances joined from consecutive sentences of one speaker (LibriSpeech's
mean is 12 s). The sentences corpus is synthesized offline into a temporary folder unless ``--sentences`` names
one. Writes results/fd_client_cpu[_front<W>].{json,md}. Federated dropout shrinks the Conformer layers only
(d_model is fixed), so the ratios also depend on how much of the model sits outside them:
``--subsampling-channels -1`` measures NeMo's full-width front end.

    python benchmarks/fd_client.py --corpus data/commands
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from nemo.collections.asr.models import EncDecCTCModelBPE
from nemo.utils import logging

import nemo_layerfx
from common import joined_groups, load_batch
from nemo_layerfx.corpus import CorpusConfig, make_corpus
from nemo_layerfx.fd import DropoutPlan, extract
from nemo_layerfx.importance import _token_ids, read_manifest
from nemo_layerfx.train import compose_config


def payload_bytes(model) -> int:
    try:
        from flwr.app import ArrayRecord

        return ArrayRecord(model.state_dict()).count_bytes()
    except ImportError:  # same tensors, without Flower's small per-array header
        return sum(v.numel() * v.element_size() for v in model.state_dict().values())


def time_pairs(steps: dict, rounds: int) -> dict[str, list[float]]:
    """Alternate full and submodel steps (order flipped every round) after one warm-up step each."""
    for s in steps.values():
        s()
    times: dict[str, list[float]] = {"full": [], "sub": []}
    for r in range(rounds):
        for name in (("full", "sub") if r % 2 == 0 else ("sub", "full")):
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def make_step(model, audio, lengths, texts):
    """One client SGD step with the model's own CTC loss."""
    ids = [_token_ids(model, t) for t in texts]
    tl = torch.tensor([len(i) for i in ids])
    targets = torch.zeros(len(ids), int(tl.max()), dtype=torch.long)
    for i, seq in enumerate(ids):
        targets[i, : len(seq)] = torch.tensor(seq)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        log_probs, enc_len, _ = model(input_signal=audio, input_signal_length=lengths)
        loss = model.loss(log_probs=log_probs, targets=targets, input_lengths=enc_len, target_lengths=tl)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


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
    tmp = None
    if args.sentences is None:
        tmp = tempfile.TemporaryDirectory()
        make_corpus(CorpusConfig(out=tmp.name, preset="sentences", n=96, speakers=4, dev_frac=0, test_frac=0,
                                 vocab_size=-1))
        args.sentences = tmp.name
    sentences = read_manifest(Path(args.sentences) / "train_manifest.json")  # sorted by duration
    mid = max(0, len(sentences) // 2 - args.batch // 2)
    batches = {
        "commands": [[r] for r in read_manifest(Path(args.corpus) / "train_manifest.json", args.batch)],
        "sentences": [[r] for r in sentences[mid: mid + args.batch]],  # the median-length ones
        f"joined {args.joined_seconds:g} s": joined_groups(sentences, args.batch, args.joined_seconds),
    }
    settings = {}
    for name, groups in batches.items():
        audio, lengths, texts = load_batch(groups)
        times = time_pairs({"full": make_step(full, audio, lengths, texts),
                            "sub": make_step(sub, audio, lengths, texts)}, args.rounds)
        settings[name] = {"mean_seconds": round(float(lengths.float().mean()) / 16000, 2),
                          "step_s": times, "median_s": {k: statistics.median(v) for k, v in times.items()},
                          "ratio": statistics.median(s / f for s, f in zip(times["sub"], times["full"]))}
        print(name, settings[name]["mean_seconds"], "s:", round(settings[name]["ratio"], 3), flush=True)
    if tmp is not None:
        tmp.cleanup()
    params = {k: sum(q.numel() for q in m.parameters()) for k, m in (("full", full), ("sub", sub))}
    sizes = {"full": payload_bytes(full), "sub": payload_bytes(sub)}
    enc = {k: sum(q.numel() for q in m.encoder.layers.parameters()) for k, m in (("full", full), ("sub", sub))}
    ratio = {"params": params["sub"] / params["full"], "bytes": sizes["sub"] / sizes["full"],
             "encoder_layer_params": enc["sub"] / enc["full"]}
    targets = {"params": 0.52, "bytes": 0.52, "step_time": 0.60}
    met = {"params": ratio["params"] <= 0.52, "bytes": ratio["bytes"] <= 0.52,
           **{f"step_time ({k})": v["ratio"] <= 0.60 for k, v in settings.items()}}
    result = {
        "benchmark": f"federated-dropout client at rate {args.rate} on FFN units, heads and conv groups vs full model",
        "device": "cpu", "cpu_threads": torch.get_num_threads(), "machine": platform.machine(),
        "versions": {"torch": torch.__version__, "nemo": __import__("nemo").__version__,
                     "nemo_layerfx": nemo_layerfx.__version__},
        "config": vars(args), "params": params, "payload_bytes": sizes, "ratios": ratio, "step_time": settings,
        "targets": targets, "target_met": met,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "fd_client_cpu" + ("" if args.subsampling_channels == 64 else f"_front{args.subsampling_channels}")
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Federated-dropout client cost (CPU, {result['cpu_threads']} threads; torch {torch.__version__})", "",
             (f"CTC GroupNorm Conformer, {args.layers} layers, d_model {args.d_model}, {args.heads} heads, front-end "
             f"conv width {args.subsampling_channels if args.subsampling_channels > 0 else args.d_model}; submodel "
             f"drops {args.rate:.0%} of FFN units, heads and conv groups in every layer; step = forward + CTC loss + "
             f"backward + SGD on a batch of {args.batch} real utterances; {args.rounds} alternating pairs per length."),
             "", "| | full | submodel | ratio | target |", "|---|---|---|---|---|",
             f"| parameters | {params['full']:,} | {params['sub']:,} | {ratio['params']:.3f} | <= 0.52 |",
             f"| payload bytes | {sizes['full']:,} | {sizes['sub']:,} | {ratio['bytes']:.3f} | <= 0.52 |"]
    for k, v in settings.items():
        lines.append(f"| step time (median s), {k}, mean {v['mean_seconds']:.1f} s | {v['median_s']['full']:.3f} | "
                     f"{v['median_s']['sub']:.3f} | {v['ratio']:.3f} | <= 0.60 |")
    lines += ["", f"Encoder-layer parameters alone: {ratio['encoder_layer_params']:.3f} of the full model's (the "
              f"subsampling front end, norms and decoder keep their size). Targets met: "
              + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in met.items()) + "."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
