"""2 ranks x batch B against 1 process x batch 2B, for our GroupNorm encoder and NeMo's BatchNorm one.

    torchrun --nproc_per_node 2 tests/scripts/ddp_exactness.py --corpus C --out DIR

Each rank builds the same tiny CTC model (dropout, dither and SpecAugment off, so a step is a function of the
weights and the batch alone), wraps it in torch's DistributedDataParallel over gloo, and takes a few SGD steps with
NeMo's own forward and CTC loss on its half of each global batch of real utterances. DDP averages the gradients;
NeMo's CTC loss averages over the batch, so the step equals one process's step on the whole global batch exactly
when an utterance's loss does not depend on its batch mates. Rank 0 saves the weights. Then every rank probes the
trained GroupNorm model on its share of the dev utterances (``probe(..., distributed=True)``) and rank 0 writes the
report. ``tests/test_ddp.py`` compares both with one process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's TINY overrides
from conftest import TINY  # noqa: E402

import nemo_layerfx  # noqa: E402,F401
from nemo_layerfx.evaluate import audio_batches, read_manifest, targets_of  # noqa: E402
from nemo_layerfx.train import compose_config, model_class  # noqa: E402

NORMS = {"group": [], "batch": ["model.encoder._target_=nemo.collections.asr.modules.ConformerEncoder",
                                "model.encoder.conv_norm_type=batch_norm"]}
STEPS, BATCH = 3, 4  # per rank; one process takes 2 x BATCH


def build(corpus: str, norm: str):
    quiet = ["model.encoder.dropout=0.0", "model.encoder.dropout_pre_encoder=0.0", "model.encoder.dropout_emb=0.0",
             "model.encoder.dropout_att=0.0", "model.preprocessor.dither=0.0", "~model.spec_augment"]
    cfg = compose_config("conformer_gn_tiny", TINY + quiet + NORMS[norm] + [f"corpus_dir={corpus}"])
    torch.manual_seed(0)
    model = model_class(cfg)(cfg=cfg.model)
    assert model.spec_augmentation is None
    return model.train()


def train(model, corpus: str, rank: int, world: int):
    """STEPS SGD steps; global batch s is utterances [s * 2B, (s + 1) * 2B) of the training manifest, rank r takes
    every world-th of them."""
    rows = read_manifest(Path(corpus) / "train_manifest.json")
    rows.sort(key=lambda r: r["audio_filepath"])  # a fixed order that mixes lengths (padding differs per batch)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for s in range(STEPS):
        chunk = rows[s * 2 * BATCH:(s + 1) * 2 * BATCH][rank::world]
        audio, lengths, texts = next(audio_batches(chunk, len(chunk), model._cfg.sample_rate, "cpu"))
        log_probs, enc_len, _ = net(input_signal=audio, input_signal_length=lengths)
        targets, target_len = targets_of(model, texts, "cpu")
        loss = model.loss(log_probs=log_probs, targets=targets, input_lengths=enc_len, target_lengths=target_len)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def main() -> None:
    from nemo_layerfx.importance import ProbeConfig, probe

    p = argparse.ArgumentParser()
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)
    for norm in NORMS:
        model = train(build(args.corpus, norm), args.corpus, rank, world)
        if rank == 0:
            torch.save(model.state_dict(), out / f"{norm}.pt")
        if norm == "group":
            report = probe(model.eval(), Path(args.corpus) / "dev_manifest.json", ProbeConfig(bootstrap=200),
                           distributed=True)
            if rank == 0:
                report.to_json(out / "probe.json")
                (out / "shards.json").write_text(json.dumps({"world": world}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
