"""Evaluation without a Trainer: manifests, audio batches, the encoder prefix cache, greedy decoding, loss, WER.

Shared by the importance probe, the depth sweep, pruning reports and the Flower server. The prefix cache is what
makes per-layer studies cheap: per batch, the preprocessor, subsampling and the hidden state entering every layer
are computed once, and a study of layer i (a reset, a truncation) runs only what comes after it.

Shape notation: B batch, T frames after subsampling, D d_model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from nemo_layerfx.models import conformer_encoder


def read_manifest(path: str | Path, max_utterances: int | None = None) -> list[dict]:
    """Rows of a NeMo manifest, relative audio paths resolved, sorted by duration (less padding, fixed order)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such manifest: {path}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row["audio_filepath"], row["duration"], row["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} line {n} is not a NeMo manifest row with audio_filepath, duration and text "
                             f"({type(e).__name__}: {e})") from e
        rows.append(row)
    if not rows:
        raise ValueError(f"manifest is empty: {path}")
    for r in rows:
        audio = Path(r["audio_filepath"])
        r["audio_filepath"] = str(audio if audio.is_absolute() else path.parent / audio)
    rows.sort(key=lambda r: r["duration"])
    return rows[:max_utterances] if max_utterances else rows


def audio_batches(rows: list[dict], batch_size: int, sample_rate: int, device) -> Iterator[tuple]:
    """(audio (B, samples), lengths (B,), texts) per batch of manifest rows, zero-padded."""
    import soundfile as sf

    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        waves = []
        for r in chunk:
            wav, sr = sf.read(r["audio_filepath"], dtype="float32")
            if sr != sample_rate:
                raise ValueError(f"{r['audio_filepath']} is {sr} Hz; the model expects {sample_rate} Hz")
            waves.append(torch.from_numpy(wav if wav.ndim == 1 else wav.mean(axis=1)))
        lengths = torch.tensor([len(w) for w in waves])
        audio = torch.zeros(len(waves), int(lengths.max()))
        for i, w in enumerate(waves):
            audio[i, : len(w)] = w
        yield audio.to(device), lengths.to(device), [r["text"] for r in chunk]


@dataclass
class Prefix:
    hidden: list[torch.Tensor]  # hidden[i]: (B, T, D) input of layer i; hidden[N]: encoder output before out_proj
    length: torch.Tensor  # (B,) encoded lengths
    pos_emb: torch.Tensor
    pad_mask: torch.Tensor
    att_mask: torch.Tensor | None


_Prefix = Prefix  # the name the probe used before this module existed


@torch.no_grad()
def prefix_start(model: nn.Module, audio: torch.Tensor, lengths: torch.Tensor) -> Prefix:
    """Preprocessor, subsampling, positional encoding and masks: the input of layer 0 (``hidden == [x]``)."""
    enc = conformer_encoder(model)
    feats, feat_len = model.preprocessor(input_signal=audio, length=lengths)
    x = feats.transpose(1, 2)  # (B, T_feat, F)
    if isinstance(enc.pre_encode, nn.Linear):
        x, length = enc.pre_encode(x), feat_len
    else:
        x, length = enc.pre_encode(x=x, lengths=feat_len)
    length = length.to(torch.int64)
    x, pos_emb = enc.pos_enc(x=x, cache_len=0)
    pad_mask, att_mask = enc._create_masks(att_context_size=enc.att_context_size, padding_length=length,
                                           max_audio_length=x.size(1), offset=None, device=x.device)
    return Prefix([x], length, pos_emb, pad_mask, att_mask)


@torch.no_grad()
def encode_prefix(model: nn.Module, audio: torch.Tensor, lengths: torch.Tensor, depth: int | None = None) -> Prefix:
    """``prefix_start`` and then layers 0..depth-1 once (default: every layer); keeps the hidden state entering
    each layer (``hidden[i]``) and the last one's output (``hidden[depth]``)."""
    prefix = prefix_start(model, audio, lengths)
    run_layers(conformer_encoder(model), prefix, 0, keep=True, stop=depth)
    return prefix


def next_layer(enc: nn.Module, p: Prefix) -> torch.Tensor:
    """Run the layer after the last kept hidden state and keep its output (B, T, D)."""
    i = len(p.hidden) - 1
    x = enc.layers[i](x=p.hidden[i], att_mask=p.att_mask, pos_emb=p.pos_emb, pad_mask=p.pad_mask)
    p.hidden.append(x)
    return x


def run_layers(enc: nn.Module, p: Prefix, start: int, keep: bool = False, stop: int | None = None) -> torch.Tensor:
    """Layers ``start``..``stop``-1 (default: to the end) on ``p.hidden[start]``, then ``out_proj``; returns the
    encoder output (B, D, T). ``keep`` appends every layer's output to ``p.hidden``."""
    x = p.hidden[start]
    for layer in list(enc.layers)[start:stop]:
        x = layer(x=x, att_mask=p.att_mask, pos_emb=p.pos_emb, pad_mask=p.pad_mask)
        if keep:
            p.hidden.append(x)
    return output_from(enc, x)


def output_from(enc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The encoder output (B, D, T) from a layer output (B, T, D): ``out_proj`` when the encoder has one."""
    if enc.out_proj is not None:
        x = enc.out_proj(x)
    return x.transpose(1, 2)


@torch.no_grad()
def decode(model: nn.Module, encoded: torch.Tensor, length: torch.Tensor) -> list[str]:
    """Greedy transcripts from encoder output (B, D, T): RNNT (and hybrid) through the joint, else CTC."""
    if hasattr(model, "joint"):
        hyps = model.decoding.rnnt_decoder_predictions_tensor(encoder_output=encoded, encoded_lengths=length)
    else:
        log_probs = model.decoder(encoder_output=encoded)
        hyps = model.decoding.ctc_decoder_predictions_tensor(log_probs, decoder_lengths=length)
    if isinstance(hyps, tuple):
        hyps = hyps[0]
    return [h.text if hasattr(h, "text") else str(h) for h in hyps]


def token_ids(model: nn.Module, text: str) -> list[int]:
    """Token ids of a transcript with the model's tokenizer (BPE) or vocabulary (char models)."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        return list(tokenizer.text_to_ids(text))
    vocab = {c: i for i, c in enumerate(model.decoder.vocabulary)}
    return [vocab[c] for c in text.lower() if c in vocab]


_token_ids = token_ids


def targets_of(model: nn.Module, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded token targets (B, U) and their lengths (B,)."""
    ids = [token_ids(model, t) for t in texts]
    tl = torch.tensor([len(i) for i in ids], device=device)
    targets = torch.zeros(len(ids), max(1, int(tl.max())), dtype=torch.long, device=device)
    for i, seq in enumerate(ids):
        targets[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return targets, tl


def model_loss(model: nn.Module, encoded: torch.Tensor, length: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """The model's own loss (CTC, or RNNT through the joint) on one encoded batch, as NeMo reduces it; with
    gradients when they are enabled."""
    targets, tl = targets_of(model, texts, encoded.device)
    if not hasattr(model, "joint"):
        log_probs = model.decoder(encoder_output=encoded)
        return model.loss(log_probs=log_probs, targets=targets, input_lengths=length, target_lengths=tl)
    dec, _, _ = model.decoder(targets=targets, target_length=tl)
    if model.joint.fuse_loss_wer:
        return model.joint(encoder_outputs=encoded, decoder_outputs=dec, encoder_lengths=length,
                           transcripts=targets, transcript_lengths=tl, compute_wer=False)[0]
    joint = model.joint(encoder_outputs=encoded, decoder_outputs=dec)
    return model.loss(log_probs=joint, targets=targets, input_lengths=length, target_lengths=tl)


@torch.no_grad()
def batch_loss(model: nn.Module, encoded: torch.Tensor, length: torch.Tensor, texts: list[str]) -> float:
    """``model_loss`` as a number (the probe's and the sweep's loss)."""
    return float(model_loss(model, encoded, length, texts))


def wer(hyps: list[str], refs: list[str]) -> float:
    from nemo.collections.asr.metrics.wer import word_error_rate

    return float(word_error_rate(hypotheses=hyps, references=refs))


def word_errors(hyp: str, ref: str) -> tuple[int, int]:
    """(word edits, reference words) of one utterance: the parts a corpus WER sums."""
    from kaldialign import edit_distance  # what NeMo's word_error_rate counts with

    r = ref.split()
    return int(edit_distance(r, hyp.split())["total"]), len(r)


@torch.no_grad()
def evaluate_wer(model: nn.Module, manifest: str | Path, max_utterances: int | None = None,
                 batch_size: int = 16) -> float:
    """Greedy WER of ``model`` on a manifest (CTC, RNNT or hybrid), in eval mode, through the full encoder."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    hyps, refs = [], []
    try:
        for audio, lengths, texts in audio_batches(read_manifest(manifest, max_utterances), batch_size,
                                                   model._cfg.sample_rate, device):
            feats, flen = model.preprocessor(input_signal=audio, length=lengths)
            enc, enc_len = model.encoder(audio_signal=feats, length=flen)
            hyps += decode(model, enc, enc_len)
            refs += texts
    finally:
        model.train(was)
    return wer(hyps, refs)
