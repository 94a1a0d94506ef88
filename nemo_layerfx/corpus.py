"""Offline speech corpus: real speech synthesized with espeak-ng, written as NeMo manifests.

Nothing is downloaded. Each utterance ``i`` is a pure function of ``(seed, i)``: its sentence, speaker, speaking
rate, pitch and gain; so two runs give byte-identical files and a corpus of ``n`` utterances contains the one of
``n' < n``. Splits are decided by a hash of the sentence, so dev and test sentences never occur in training.

Presets:
    commands   a small-vocabulary smart-home command grammar (about 70 words); a tiny model learns it in minutes.
    sentences  open-vocabulary WordNet example sentences (Debian ``wordnet-base``); harder, for experiments.

Layout of ``out``::

    wav/<speaker>/<utt>.wav          16 kHz mono 16-bit
    train_manifest.json, dev_manifest.json, test_manifest.json    {"audio_filepath","duration","text","speaker"}
    clients/<speaker>.json           per-speaker training manifests (non-IID federated clients)
    tokenizer/tokenizer.model        SentencePiece BPE trained on the training text
    speakers.tsv, corpus_info.json
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import wave
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
            "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6")
PRESETS = ("commands", "sentences")
WORDNET_DIR = Path("/usr/share/wordnet")

# --- the command grammar: every production is a list of alternatives --------------------------------------
_ROOMS = ["kitchen", "bedroom", "office", "garage", "hallway", "bathroom", "garden", "living room"]
_DEVICES = ["light", "lights", "lamp", "fan", "heater", "radio", "speaker", "television"]
_OPENABLE = ["door", "window", "blinds", "curtains", "gate"]
_NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twenty", "fifty"]
_MEDIA = ["music", "the news", "some jazz", "the radio", "a podcast", "my playlist"]


def _command(rng: random.Random) -> str:
    room, dev = rng.choice(_ROOMS), rng.choice(_DEVICES)
    forms = [
        lambda: f"turn {rng.choice(['on', 'off'])} the {room} {dev}",
        lambda: f"switch {rng.choice(['on', 'off'])} the {dev} in the {room}",
        lambda: f"set the {room} {dev} to {rng.choice(_NUMBERS)} percent",
        lambda: f"{rng.choice(['open', 'close'])} the {room} {rng.choice(_OPENABLE)}",
        lambda: f"play {rng.choice(_MEDIA)} in the {room}",
        lambda: f"{rng.choice(['raise', 'lower'])} the volume by {rng.choice(_NUMBERS)}",
        lambda: f"{rng.choice(['stop', 'pause', 'resume'])} {rng.choice(_MEDIA)}",
        lambda: f"is the {room} {rng.choice(_OPENABLE)} {rng.choice(['open', 'closed', 'locked'])}",
        lambda: f"{rng.choice(['dim', 'brighten'])} the {room} {rng.choice(['light', 'lights', 'lamp'])}",
    ]
    text = rng.choice(forms)()
    return f"please {text}" if rng.random() < 0.15 else text


# --- WordNet example sentences ------------------------------------------------------------------------------
_QUOTED = re.compile(r'"([^"]+)"')
_BAD = re.compile(r"[0-9@#$%&*+=/\\<>\[\]{}_~^|]|\b[A-Z]{2,}\b|\b\w\.\w")


def _normalize(sentence: str) -> str | None:
    """Lowercase ``[a-z' ]`` text that espeak speaks exactly as written, or None if it would be verbalized."""
    if _BAD.search(sentence) or not sentence.isascii():
        return None
    s = sentence.lower().replace("-", " ")
    s = re.sub(r"[^a-z' ]", " ", s)
    words = [w.strip("'") for w in s.split()]
    words = [w for w in words if w]
    if not 3 <= len(words) <= 20 or any(len(w) == 1 and w not in ("a", "i", "o") for w in words):
        return None
    return " ".join(words)


def wordnet_sentences(vocab: int = 0, wordnet_dir: Path = WORDNET_DIR) -> list[str]:
    """Unique normalized WordNet example sentences; ``vocab=K`` keeps those built from the K commonest words."""
    files = [wordnet_dir / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    if not all(f.is_file() for f in files):
        raise FileNotFoundError(
            f"the 'sentences' preset needs WordNet's data files in {wordnet_dir}: apt-get install wordnet-base"
        )
    seen: dict[str, None] = {}
    for f in files:
        for line in f.read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            for quoted in _QUOTED.findall(line.split("|", 1)[1]):
                s = _normalize(quoted)
                if s is not None:
                    seen.setdefault(s)
    pool = sorted(seen)
    if vocab > 0:
        counts: dict[str, int] = defaultdict(int)
        for s in pool:
            for w in s.split():
                counts[w] += 1
        keep = set(sorted(counts, key=lambda w: (-counts[w], w))[:vocab])
        pool = [s for s in pool if all(w in keep for w in s.split())]
    return pool


# --- speakers and utterances ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Speaker:
    name: str  # e.g. "en-gb+f2-s172-p45"
    voice: str  # espeak-ng -v argument
    rate: int  # words per minute
    pitch: int  # 0..99


def make_speakers(n: int, seed: int) -> list[Speaker]:
    """``n`` speakers: distinct accent x variant voices with a fixed base rate and pitch each."""
    voices = [f"{a}+{v}" for a in ACCENTS for v in VARIANTS]
    if not 1 <= n <= len(voices):
        raise ValueError(f"speakers must be between 1 and {len(voices)}, got {n}")
    rng = random.Random(f"speakers-{seed}")
    rng.shuffle(voices)
    out = []
    for voice in voices[:n]:
        rate, pitch = rng.randint(140, 200), rng.randint(30, 70)
        out.append(Speaker(f"{voice}-s{rate}-p{pitch}", voice, rate, pitch))
    return out


@dataclass(frozen=True)
class Utterance:
    index: int
    text: str
    speaker: Speaker
    rate: int
    pitch: int
    gain: float
    split: str


def split_of(text: str, dev_frac: float, test_frac: float) -> str:
    u = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "dev" if u < dev_frac else "test" if u < dev_frac + test_frac else "train"


def plan_utterance(i: int, seed: int, preset: str, pool: list[str], speakers: list[Speaker],
                   dev_frac: float, test_frac: float) -> Utterance:
    rng = random.Random(f"{seed}-{i}")
    text = _command(rng) if preset == "commands" else pool[rng.randrange(len(pool))]
    spk = speakers[rng.randrange(len(speakers))]
    rate = max(80, min(220, round(spk.rate * rng.uniform(0.92, 1.08))))
    pitch = max(0, min(99, spk.pitch + rng.randint(-8, 8)))
    return Utterance(i, text, spk, rate, pitch, round(rng.uniform(0.3, 0.9), 3),
                     split_of(text, dev_frac, test_frac))


def synthesize(u: Utterance) -> np.ndarray:
    """16 kHz int16 samples of ``u``, peak-normalized to ``u.gain``."""
    speech = subprocess.run(
        ["espeak-ng", "-v", u.speaker.voice, "-s", str(u.rate), "-p", str(u.pitch), "--stdout", u.text],
        capture_output=True, check=True,
    ).stdout
    raw = subprocess.run(  # -R -D: no random dither, so output is reproducible
        ["sox", "-R", "-D", "-t", "wav", "-", "-t", "raw", "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16",
         "-e", "signed-integer", "-"],
        input=speech, capture_output=True, check=True,
    ).stdout
    x = np.frombuffer(raw, dtype="<i2").astype(np.float64)
    peak = np.abs(x).max() if x.size else 0.0
    if peak > 0:
        x = x * (u.gain * 32767.0 / peak)
    return np.round(x).astype("<i2")


def _write_wav(path: Path, samples: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(samples.tobytes())


def _render(job: tuple[Utterance, str]) -> dict:
    u, out = job
    rel = Path("wav") / u.speaker.name / f"utt{u.index:06d}.wav"
    samples = synthesize(u)
    _write_wav(Path(out) / rel, samples)
    return {"audio_filepath": str(rel), "duration": round(len(samples) / SAMPLE_RATE, 4), "text": u.text,
            "speaker": u.speaker.name}


def check_tools() -> None:
    missing = [t for t in ("espeak-ng", "sox") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"{' and '.join(missing)} not found; the corpus is synthesized offline with them: "
                           f"apt-get install -y espeak-ng sox")


def write_manifest(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@contextmanager
def _stderr_to(path: Path):
    """Send file descriptor 2 (where C/C++ libraries log) to ``path`` for the duration of the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def train_tokenizer(text_rows: list[str], out_dir: Path, vocab_size: int) -> Path:
    """SentencePiece BPE tokenizer (NeMo's ``create_spt_model``) on the training transcripts."""
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    out_dir.mkdir(parents=True, exist_ok=True)
    text_file = out_dir / "train_text.txt"
    text_file.write_text("\n".join(text_rows) + "\n")
    try:
        with _stderr_to(out_dir / "train_tokenizer.log"):  # SentencePiece's C++ trainer prints ~80 lines there
            model_path, _ = create_spt_model(str(text_file), vocab_size, sample_size=-1, do_lower_case=True,
                                             tokenizer_type="bpe", output_dir=str(out_dir))
    except RuntimeError as e:
        raise ValueError(f"tokenizer vocab_size={vocab_size} does not fit this corpus' text ({e}); "
                         f"pass a smaller --vocab-size") from e
    return Path(model_path)


@dataclass
class CorpusConfig:
    """What ``make_corpus`` builds. Defaults are the demo's command corpus."""

    out: str
    preset: str = "commands"  # commands | sentences
    n: int = 1000  # utterances in total (all splits)
    speakers: int = 24  # distinct accent x variant voices (1..152)
    seed: int = 0
    workers: int = 2  # synthesis processes; the output does not depend on it
    dev_frac: float = 0.1
    test_frac: float = 0.1
    vocab: int = 0  # sentences preset: keep sentences made of the K commonest words (0 = all)
    vocab_size: int = 0  # tokenizer pieces; 0 = preset default (commands 64, sentences 256); -1 = no tokenizer

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown corpus preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not (0 <= self.dev_frac < 1 and 0 <= self.test_frac < 1 and self.dev_frac + self.test_frac < 1):
            raise ValueError("dev_frac and test_frac must be in [0, 1) and sum to less than 1")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


def make_corpus(cfg: CorpusConfig, progress: bool = False) -> dict:
    """Build the corpus described by ``cfg`` into ``cfg.out`` and return its summary (also in corpus_info.json).

    ``progress`` shows a progress bar of the synthesis on stderr (``layerfx make-corpus`` turns it on)."""
    check_tools()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pool = wordnet_sentences(cfg.vocab) if cfg.preset == "sentences" else []
    speakers = make_speakers(cfg.speakers, cfg.seed)
    utts = [plan_utterance(i, cfg.seed, cfg.preset, pool, speakers, cfg.dev_frac, cfg.test_frac)
            for i in range(cfg.n)]
    jobs = [(u, str(out)) for u in utts]
    from tqdm import tqdm

    with tqdm(total=len(jobs), desc="synthesizing", unit="utt", leave=False, disable=not progress) as bar:
        rows = []
        with ProcessPoolExecutor(cfg.workers) if cfg.workers > 1 else nullcontext() as ex:
            for r in (ex.map(_render, jobs, chunksize=16) if ex is not None else map(_render, jobs)):
                rows.append(r)
                bar.update(1)

    by_split: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
    for u, r in zip(utts, rows):
        by_split[u.split].append(r)
    for split, split_rows in by_split.items():
        write_manifest(out / f"{split}_manifest.json", split_rows)
    clients = out / "clients"
    clients.mkdir(exist_ok=True)
    per_speaker: dict[str, list[dict]] = defaultdict(list)
    for r in by_split["train"]:
        per_speaker[r["speaker"]].append(r)
    for name, spk_rows in sorted(per_speaker.items()):
        # client manifests sit one folder down: their audio paths are made relative to it
        write_manifest(clients / f"{name}.json", [dict(r, audio_filepath="../" + r["audio_filepath"])
                                                  for r in spk_rows])
    with open(out / "speakers.tsv", "w") as f:
        f.write("name\tvoice\trate\tpitch\n")
        for s in speakers:
            f.write(f"{s.name}\t{s.voice}\t{s.rate}\t{s.pitch}\n")

    vocab_size = cfg.vocab_size or (64 if cfg.preset == "commands" else 256)
    tokenizer = None
    if vocab_size > 0 and by_split["train"]:
        tokenizer = str(train_tokenizer([r["text"] for r in by_split["train"]], out / "tokenizer", vocab_size))
    info = {
        "config": asdict(cfg),
        "utterances": {k: len(v) for k, v in by_split.items()},
        "hours": {k: round(sum(r["duration"] for r in v) / 3600, 4) for k, v in by_split.items()},
        "speakers": len(speakers),
        "words": len({w for r in rows for w in r["text"].split()}),
        "tokenizer": tokenizer and os.path.relpath(tokenizer, out),
    }
    (out / "corpus_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info
