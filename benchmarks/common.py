"""Shared by the benchmarks: real batches of three utterance lengths, interleaved timing, training steps,
FLOP and training-memory accounting, and the machine/version record every result file carries.

Ratios are measured side by side in one process: the models' steps alternate (order flipped every round) on the
same batches after a warm-up step each, and the reported ratio is the median of per-round ratios.
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch

from nemo_layerfx import memory
from nemo_layerfx.evaluate import read_manifest, targets_of


def machine() -> dict:
    import nemo

    import nemo_layerfx

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"device": "cuda" if gpu else "cpu", "gpu": gpu, "cpu_threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(), "cpu": cpu_model(),
            "versions": {"torch": torch.__version__, "nemo": nemo.__version__, "nemo_layerfx": nemo_layerfx.__version__,
                         "python": platform.python_version()}}


def cpu_model() -> str:
    """The CPU as /proc/cpuinfo names it, with its family and model numbers and whether it has AVX-512: CPU speed-up
    ratios differ between machines (the prune benchmark's 1-s inference ratio: 1.63-1.69 on one 2-core machine,
    1.67-1.96 on another), so a result file says which CPU it came from."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
    except OSError:
        return platform.processor() or platform.machine()
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = info.get("flags", "").split()
    return (f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')}"
            f"{', AVX-512' if 'avx512f' in flags else ''})")


def load_batch(groups: list[list[dict]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One padded batch; each item is the concatenated audio and text of a group of manifest rows."""
    import soundfile as sf

    waves = [torch.cat([torch.from_numpy(sf.read(r["audio_filepath"], dtype="float32")[0]) for r in g]) for g in groups]
    lengths = torch.tensor([len(w) for w in waves])
    audio = torch.zeros(len(waves), int(lengths.max()))
    for i, w in enumerate(waves):
        audio[i, : len(w)] = w
    return audio, lengths, [" ".join(r["text"] for r in g) for g in groups]


def joined_groups(rows: list[dict], batch: int, seconds: float) -> list[list[dict]]:
    """``batch`` groups of consecutive utterances of one speaker, each at least ``seconds`` long."""
    by_speaker, groups = defaultdict(list), []
    for r in rows:
        by_speaker[r["speaker"]].append(r)
    for spk_rows in by_speaker.values():
        group: list[dict] = []
        for r in spk_rows:
            group.append(r)
            if sum(g["duration"] for g in group) >= seconds:
                groups.append(group)
                group = []
    if len(groups) < batch:
        raise ValueError(f"the sentences corpus has only {len(groups)} joined utterances of {seconds} s; need {batch}")
    return groups[:batch]


def length_batches(corpus: str, sentences: str | None, batch: int, joined_seconds: float) -> tuple[dict, object]:
    """Real batches at three lengths: 1-s commands (``corpus``), median-length ~2-s sentences, and utterances
    joined from one speaker's consecutive sentences (LibriSpeech's mean is 12 s). The sentences corpus is
    synthesized offline into a temporary folder unless ``sentences`` names one; returns (batches, temp handle)."""
    from nemo_layerfx.corpus import CorpusConfig, make_corpus

    tmp = None
    if sentences is None:
        tmp = tempfile.TemporaryDirectory()
        make_corpus(CorpusConfig(out=tmp.name, preset="sentences", n=96, speakers=4, dev_frac=0, test_frac=0,
                                 vocab_size=-1))
        sentences = tmp.name
    rows = read_manifest(Path(sentences) / "train_manifest.json")  # sorted by duration
    mid = max(0, len(rows) // 2 - batch // 2)
    groups = {
        "commands": [[r] for r in read_manifest(Path(corpus) / "train_manifest.json", batch)],
        "sentences": [[r] for r in rows[mid: mid + batch]],
        f"joined {joined_seconds:g} s": joined_groups(rows, batch, joined_seconds),
    }
    return {name: load_batch(g) for name, g in groups.items()}, tmp


def time_interleaved(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """Each step once to warm up, then ``rounds`` rounds of all steps, the order reversed every other round."""
    for s in steps.values():
        s()
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def ctc_step(model, audio, lengths, texts, optimizer: str = "sgd", lr: float = 1e-4,
             passes: int = 1) -> Callable[[], None]:
    """One training step of a CTC model: forward, its CTC loss, backward, optimizer step. With ``passes`` > 1 the
    batch is taken as that many equal passes (each padded to its own longest utterance) whose gradients accumulate,
    each pass's mean loss weighted by its share: the step a client makes when only a pass that size fits."""
    chunks = []
    for i in range(passes):
        s = slice(i * len(texts) // passes, (i + 1) * len(texts) // passes)
        chunks.append((audio[s, : int(lengths[s].max())], lengths[s], *targets_of(model, texts[s], audio.device)))
    params = list(model.parameters())
    # AdamW as the shipped configs build it (optim.fused: true); SGD as the federated clients build it
    opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.AdamW(params, lr=lr, fused=True)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for a, al, targets, tl in chunks:
            log_probs, enc_len, _ = model(input_signal=a, input_signal_length=al)
            loss = model.loss(log_probs=log_probs, targets=targets, input_lengths=enc_len, target_lengths=tl)
            (loss / passes).backward()
        opt.step()

    return step


def encoder_forward(model, audio, lengths) -> Callable[[], None]:
    """Inference: preprocessor + encoder in eval mode without gradients."""
    model.eval()

    @torch.no_grad()
    def forward() -> None:
        feats, flen = model.preprocessor(input_signal=audio, length=lengths)
        model.encoder(audio_signal=feats, length=flen)

    return forward


def encoder_only(model, audio, lengths) -> Callable[[], None]:
    """Inference of the encoder alone, eval mode, no gradients: the features are computed once, outside the timed
    call (the preprocessor is the same for every model a benchmark compares; time it with ``preprocessor_only``)."""
    model.eval()
    with torch.no_grad():
        feats, flen = model.preprocessor(input_signal=audio, length=lengths)

    @torch.no_grad()
    def forward() -> None:
        model.encoder(audio_signal=feats, length=flen)

    return forward


def preprocessor_only(model, audio, lengths) -> Callable[[], None]:
    """The mel-spectrogram preprocessor alone (eval mode, no gradients)."""
    model.eval()

    @torch.no_grad()
    def forward() -> None:
        model.preprocessor(input_signal=audio, length=lengths)

    return forward


def step_flops(model, audio, lengths, texts) -> int:
    """Floating-point operations (matmuls and convolutions, as torch's FlopCounterMode counts) of one training
    step's forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    targets, tl = targets_of(model, texts, audio.device)
    model.train()
    with FlopCounterMode(display=False) as counter:
        log_probs, enc_len, _ = model(input_signal=audio, input_signal_length=lengths)
        model.loss(log_probs=log_probs, targets=targets, input_lengths=enc_len, target_lengths=tl).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def training_memory(model, audio, lengths, texts, adam: bool = True) -> dict[str, int]:
    """Bytes a training step holds (parameters, gradients, Adam's two moments unless ``adam`` is false, tensors
    saved for backward), counted exactly: ``nemo_layerfx.memory.training_memory``."""
    return memory.training_memory(model, audio, lengths, texts, moments=2 if adam else 0)
