"""The offline espeak-ng corpus: real audio, deterministic, per-speaker manifests, clear errors."""

from __future__ import annotations

import hashlib
import json
import wave
from pathlib import Path

import pytest

from nemo_layerfx import cli
from nemo_layerfx.corpus import CorpusConfig, make_corpus, wordnet_sentences


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file except the timing-free metadata we expect to differ (none)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.unit
def test_manifests_and_audio_are_real_16k_speech(corpus):
    train = rows(corpus / "train_manifest.json")
    dev = rows(corpus / "dev_manifest.json")
    assert train and dev
    for r in train + dev:
        assert set(r) == {"audio_filepath", "duration", "text", "speaker"}
        assert set(r["text"]) <= set("abcdefghijklmnopqrstuvwxyz' ")
        with wave.open(str(corpus / r["audio_filepath"])) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
            assert abs(w.getnframes() / 16000 - r["duration"]) < 1e-3
            assert 0.5 < r["duration"] < 6.0
    assert not {r["text"] for r in dev} & {r["text"] for r in train}  # split by sentence
    clients = sorted((corpus / "clients").glob("*.json"))
    assert sum(len(rows(c)) for c in clients) == len(train)
    for c in clients:  # one speaker per client manifest, paths resolve from the client folder
        client_rows = rows(c)
        assert {r["speaker"] for r in client_rows} == {c.stem}
        assert all((c.parent / r["audio_filepath"]).is_file() for r in client_rows)
    assert (corpus / "tokenizer" / "tokenizer.model").is_file()


@pytest.mark.unit
def test_deterministic_independent_of_workers_and_prefix_stable(tmp_path):
    base = dict(n=16, speakers=3, seed=7, vocab_size=-1)
    a = make_corpus(CorpusConfig(out=str(tmp_path / "a"), workers=1, **base))
    b = make_corpus(CorpusConfig(out=str(tmp_path / "b"), workers=2, **base))
    da, db = digest(tmp_path / "a"), digest(tmp_path / "b")
    da.pop("corpus_info.json"), db.pop("corpus_info.json")  # records the worker count
    assert da == db and a["utterances"] == b["utterances"]
    small = make_corpus(CorpusConfig(out=str(tmp_path / "s"), workers=2, **{**base, "n": 8}))
    ds = digest(tmp_path / "s")
    wavs = {k: v for k, v in ds.items() if k.startswith("wav/")}
    assert len(wavs) == 8 and all(da[k] == v for k, v in wavs.items())  # n=8 is a subset of n=16
    assert sum(small["utterances"].values()) == 8
    other_seed = make_corpus(CorpusConfig(out=str(tmp_path / "o"), workers=2, **{**base, "seed": 8}))
    assert digest(tmp_path / "o") != da and sum(other_seed["utterances"].values()) == 16


@pytest.mark.unit
def test_sentences_preset_uses_wordnet(tmp_path):
    pool = wordnet_sentences(vocab=500)
    assert len(pool) > 300 and all(set(s) <= set("abcdefghijklmnopqrstuvwxyz' ") for s in pool)
    info = make_corpus(CorpusConfig(out=str(tmp_path / "w"), preset="sentences", vocab=500, n=6, speakers=2,
                                    vocab_size=-1))
    texts = [r["text"] for split in ("train", "dev", "test") for r in rows(tmp_path / "w" / f"{split}_manifest.json")]
    assert len(texts) == 6 and all(t in pool for t in texts) and info["tokenizer"] is None


@pytest.mark.unit
@pytest.mark.parametrize("kw, match", [
    (dict(preset="poems"), "unknown corpus preset 'poems'; choose one of commands, sentences"),
    (dict(n=0), "n must be >= 1"),
    (dict(dev_frac=0.6, test_frac=0.5), "dev_frac and test_frac"),
])
def test_bad_corpus_config(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        CorpusConfig(out=str(tmp_path), **kw)


@pytest.mark.unit
def test_cli_make_corpus_errors(tmp_path, capsys):
    assert cli.main(["make-corpus", "--out", str(tmp_path), "--speakers", "500", "--n", "2"]) == 2
    assert "speakers must be between 1 and 152" in capsys.readouterr().err
    missing = tmp_path / "no_wordnet"
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        wordnet_sentences(wordnet_dir=missing)
