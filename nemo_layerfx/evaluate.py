"""Evaluation without a Trainer: manifests, audio batches, the encoder prefix cache, greedy decoding, loss, WER.

Shared by the importance probe, the depth sweep, pruning reports and the Flower server. The prefix cache is what
makes per-layer studies cheap: per batch, the preprocessor, subsampling and the hidden state entering every layer
are computed once, and a study of layer i (a reset, a truncation) runs only what comes after it.

Shape notation: B batch, T frames after subsampling, D d_model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from nemo_layerfx.models import conformer_encoder, eval_depth


def read_manifest(path: str | Path, max_utterances: int | None = None) -> list[dict]:
    """Rows of a NeMo manifest, relative audio paths resolved against the manifest's folder (as NeMo does), sorted
    by duration (less padding, fixed order). Every audio file is checked here, before any model work, so a bad
    line is named at once instead of failing deep inside a batch."""
    path = Path(path)
    if max_utterances is not None and int(max_utterances) < 1:
        raise ValueError(f"max_utterances must be >= 1 (or None for all), got {max_utterances}")
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
        audio = Path(row["audio_filepath"])
        row["audio_filepath"] = str(audio if audio.is_absolute() else path.parent / audio)
        if not Path(row["audio_filepath"]).is_file():
            how = "" if audio.is_absolute() else " (a relative path is resolved against the manifest's folder)"
            raise FileNotFoundError(f"{path} line {n}: no such audio file {row['audio_filepath']}{how}")
        rows.append(row)
    if not rows:
        raise ValueError(f"manifest is empty: {path}")
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


def error_counts(hyps: list[str], refs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per utterance: word edits and reference words (what a corpus WER sums)."""
    counts = [word_errors(h, r) for h, r in zip(hyps, refs)]
    return np.array([c[0] for c in counts], dtype=np.int64), np.array([c[1] for c in counts], dtype=np.int64)


def resamples(n: int, rounds: int, seed: int) -> np.ndarray:
    """(rounds, n) utterance indices drawn with replacement (seeded: the same for every unit of a probe)."""
    return np.random.default_rng(seed).integers(0, n, size=(rounds, n))


@torch.no_grad()
def transcripts(model: nn.Module, manifest: str | Path, max_utterances: int | None = None, batch_size: int = 16,
                rows: list[dict] | None = None) -> tuple[list[str], list[str], float]:
    """Greedy hypotheses and references of ``model`` on a manifest (eval mode, the encoder's own forward: its
    inference depth, its inference layouts), and the seconds the model took (front end, encoder, decoding)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    hyps, refs, seconds = [], [], 0.0
    rows = read_manifest(manifest, max_utterances) if rows is None else rows
    try:
        for audio, lengths, texts in audio_batches(rows, batch_size, model._cfg.sample_rate, device):
            sync()
            t0 = time.perf_counter()
            feats, flen = model.preprocessor(input_signal=audio, length=lengths)
            enc, enc_len = model.encoder(audio_signal=feats, length=flen)
            hyps += decode(model, enc, enc_len)
            sync()
            seconds += time.perf_counter() - t0
            refs += texts
    finally:
        model.train(was)
    return hyps, refs, seconds


def evaluate_wer(model: nn.Module, manifest: str | Path, max_utterances: int | None = None,
                 batch_size: int = 16) -> float:
    """Greedy WER of ``model`` on a manifest (CTC, RNNT or hybrid), in eval mode, as the model runs."""
    hyps, refs, _ = transcripts(model, manifest, max_utterances, batch_size)
    return wer(hyps, refs)


@dataclass
class EvalReport:
    """What ``layerfx eval`` prints: the model's WER with a bootstrap interval, its speed and its size."""

    wer: float
    wer_ci: list[float]  # [lo, hi]: percentile interval over utterance resamples (empty with bootstrap=0)
    ci_level: float
    utterances: int
    words: int
    audio_seconds: float
    rtf: float  # model seconds (front end + encoder + decoding) / audio seconds, one pass, this device
    parameters: int
    encoder_parameters: int
    depth: int  # layers an inference forward runs
    n_layers: int
    device: str
    manifest: str

    def lines(self) -> list[str]:
        ci = (f" ({self.ci_level:.0%} CI {self.wer_ci[0]:.4f}-{self.wer_ci[1]:.4f}, bootstrap over utterances)"
              if self.wer_ci else "")
        depth = f"{self.n_layers} layers" if self.depth == self.n_layers else \
            f"{self.depth} of {self.n_layers} layers (inference depth)"
        return [f"WER {self.wer:.4f}{ci} on {self.utterances} utterances, {self.words} words",
                f"real-time factor {self.rtf:.4f} on {self.device} ({self.audio_seconds:.0f} s of audio, one pass)",
                f"parameters {self.parameters:,} (encoder {self.encoder_parameters:,}, {depth})"]


def evaluate(model: nn.Module, manifest: str | Path, batch_size: int = 16, max_utterances: int | None = None,
             bootstrap: int = 1000, ci_level: float = 0.95, seed: int = 0) -> EvalReport:
    """WER (NeMo's ``word_error_rate`` of greedy transcripts, as ``transcribe()`` decodes), its percentile
    bootstrap interval over utterances, the real-time factor and the parameter counts of ``model``.

    Example::

        print("\n".join(evaluate(model, "test_manifest.json").lines()))
    """
    if bootstrap < 0 or not 0.0 < ci_level < 1.0:
        raise ValueError(f"bootstrap must be >= 0 and ci_level in (0, 1), got {bootstrap}, {ci_level}")
    rows = read_manifest(manifest, max_utterances)
    hyps, refs, seconds = transcripts(model, manifest, batch_size=batch_size, rows=rows)
    errors, words = error_counts(hyps, refs)
    interval: list[float] = []
    if bootstrap:
        idx = resamples(len(refs), bootstrap, seed)
        tail = (1.0 - ci_level) / 2.0
        interval = [float(v) for v in np.quantile(errors[idx].sum(axis=1) / words[idx].sum(axis=1).clip(min=1),
                                                  [tail, 1.0 - tail])]
    enc = conformer_encoder(model)
    audio_s = float(sum(r["duration"] for r in rows))
    return EvalReport(wer=wer(hyps, refs), wer_ci=interval, ci_level=ci_level, utterances=len(refs),
                      words=int(words.sum()), audio_seconds=audio_s, rtf=seconds / audio_s,
                      parameters=sum(p.numel() for p in model.parameters()),
                      encoder_parameters=sum(p.numel() for p in enc.parameters()), depth=eval_depth(enc),
                      n_layers=len(enc.layers), device=str(next(model.parameters()).device), manifest=str(manifest))
