"""Demo data preparation on a tiny scale, from a fake fortunes folder (and the real one if present)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf

from speechllm import synthesis
from speechllm.manifest import load_manifest
from speechllm.tts import TTSUnavailableError, get_voice
from stages import prepare_demo_data as prep

# fast engines only: festival starts up in ~0.5 s per call
TRAIN = ["espeak-ng:en-us", "espeak-ng:en-us+f2", "flite:kal16"]
HELDOUT = ["flite:slt"]
TINY = dict(
    n_train=12, n_dev=3, n_test=3, n_docs=(0, 0, 0), n_mc=0, train_voices=TRAIN, heldout_voices=HELDOUT,
    progress=False,
)  # fmt: skip
WITH_DOCS = {**TINY, "n_docs": (2, 1, 1), "n_mc": 3}
WORDS = "the a cat dog sees runs over under big small red blue house tree river stone quickly slowly".split()


@pytest.fixture(scope="module", autouse=True)
def _needs_voices():
    for spec in TRAIN + HELDOUT:
        try:
            get_voice(spec)
        except TTSUnavailableError as err:
            pytest.skip(str(err))


@pytest.fixture
def fortunes(tmp_path) -> Path:
    """Two topics of made-up fortunes, plus the awkward cases the cleaner must handle."""
    folder = tmp_path / "fortunes"
    folder.mkdir()
    rng = random.Random(0)
    for topic in ("alpha", "beta"):
        entries = []
        for _ in range(200):  # enough dev/test fortunes of one topic for a few 40-80-word documents
            words = rng.choices(WORDS, k=rng.randint(5, 12))
            entries.append(" ".join(words[:4]) + "\n\t" + " ".join(words[4:]).capitalize() + ".")
        entries += [
            "Short one.",  # too few words for speech
            'Know thyself, and the river runs over the stone.\n\t\t-- Somebody Wise,\n\t\t   "A Book"',
            "int main() { return 0; } is what the dog said",  # code: not speakable
            "Caf\u00e9 au lait is what the cat drinks in the house",  # non-ASCII
            entries[0],  # duplicate
        ]
        (folder / topic).write_text("\n%\n".join(entries) + "\n%\n", encoding="utf-8")
        (folder / f"{topic}.dat").write_bytes(b"\x00\x01index")
        (folder / f"{topic}.u8").symlink_to(topic)
    return folder


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def wav_mtimes(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.rglob("*.wav")}


@pytest.fixture
def count_synthesis(monkeypatch):
    """Count the clips synthesised in this process (runs with workers=1): whole or chunk by chunk."""
    calls = []
    to_file, spans = synthesis.synthesize_to_file, synthesis.synthesize_spans

    def counting_to_file(voice, text, path, *args, **kwargs):
        calls.append(path)
        return to_file(voice, text, path, *args, **kwargs)

    def counting_spans(voice, chunks, *args, **kwargs):
        calls.append(chunks)
        return spans(voice, chunks, *args, **kwargs)

    monkeypatch.setattr(synthesis, "synthesize_to_file", counting_to_file)
    monkeypatch.setattr(synthesis, "synthesize_spans", counting_spans)
    return calls


def test_clean_fortune():
    assert (
        prep.clean_fortune("Hello  there,\n\tworld.\n\t\t-- Someone\n\t\t   wrapped")
        == "Hello there, world."
    )
    assert prep.clean_fortune("-- only an attribution") is None
    assert prep.clean_fortune("a [[phoneme]] trick") is None
    assert prep.clean_fortune("na\u00efve") is None
    assert prep.clean_fortune("123 456") is None  # no letters


def test_split_is_seeded_and_stable():
    entries = [prep.Entry(f"sentence number {i}", "t") for i in range(2000)]
    splits = [prep.split_of(e, 0, 0.1, 0.1) for e in entries]
    assert splits == [prep.split_of(e, 0, 0.1, 0.1) for e in entries]
    assert splits != [prep.split_of(e, 1, 0.1, 0.1) for e in entries]
    assert 150 < splits.count("test") < 250 and 150 < splits.count("dev") < 250
    # case and punctuation do not change the split: near-duplicates cannot straddle train and test
    assert prep.split_of(prep.Entry("Sentence number 7!", "u"), 0, 0.1, 0.1) == splits[7]


def test_tiny_run_then_rerun_synthesizes_nothing(fortunes, tmp_path, count_synthesis):
    out = tmp_path / "out"
    summary = prep.prepare_demo_data(out, fortunes_dir=fortunes, workers=1, **WITH_DOCS)
    assert len(count_synthesis) == 18 + 4 + 3 and summary["synthesized"] == 25  # speech, docs, mc

    text = read_jsonl(out / "text" / "train.jsonl")
    assert (
        text
        and {"id", "text", "topic"} == set(text[0])
        and {r["topic"] for r in text} == {"alpha", "beta"}
    )
    train_texts = {r["text"] for r in text}
    assert len(train_texts) == len(text)  # deduplicated
    for dropped in (
        "Short one.",
        "Somebody",
        "main()",
        "Caf",
    ):  # too short, attribution, code, non-ASCII
        assert not any(dropped in t for t in train_texts)
    manifests = {split: read_jsonl(out / "speech" / f"{split}.jsonl") for split in prep.SPLITS}
    assert [len(manifests[s]) for s in prep.SPLITS] == [12, 3, 3]
    for rows in manifests.values():
        for row in rows:
            assert set(row) == {"id", "audio", "duration", "text", "speaker", "topic"}
            info = sf.info(out / "speech" / row["audio"])  # relative to the manifest's folder
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert info.duration == pytest.approx(row["duration"], abs=1e-3)
            assert 4 <= len(row["text"].split()) <= 30
            assert (
                all(ord(c) < 128 for c in row["text"])
                and "{" not in row["text"]
                and "--" not in row["text"]
            )
    assert {r["speaker"] for r in manifests["train"]} == set(TRAIN)  # 12 clips dealt over 3 voices
    assert {r["speaker"] for r in manifests["dev"] + manifests["test"]} == set(HELDOUT)
    speech_train_texts = {r["text"] for r in manifests["train"]}
    assert speech_train_texts <= train_texts
    for row in manifests["dev"] + manifests["test"]:
        assert row["text"] not in train_texts | speech_train_texts

    check_documents_and_mc(out, fortunes, train_texts, manifests)

    saved = json.loads((out / "summary.json").read_text())
    assert saved["speech"]["train"]["clips"] == 12 and saved["total_hours"] > 0
    assert saved["voices"] == {"train": TRAIN, "heldout": HELDOUT}
    assert [saved["docs"][s]["clips"] for s in prep.SPLITS] == [2, 1, 1] and saved["mc"]["test"]["clips"] == 3
    assert saved["pool"]["documents"] == len(read_jsonl(out / "docs" / "pool.jsonl"))
    assert set(saved["mc"]["test"]["voices"]) <= set(HELDOUT) and saved["docs"]["train"]["hours"] > 0
    hours = [s["hours"] for group in ("speech", "docs", "mc") for s in saved[group].values()]
    assert saved["total_hours"] == pytest.approx(sum(hours))

    # a second run finds every wav and rewrites identical manifests
    before = wav_mtimes(out)
    assert len(before) == 25
    written = {p: p.read_bytes() for p in out.rglob("*.json*") if p.name != "summary.json"}
    again = prep.prepare_demo_data(out, fortunes_dir=fortunes, workers=1, **WITH_DOCS)
    assert len(count_synthesis) == 25 and again["synthesized"] == 0
    assert wav_mtimes(out) == before
    assert {p: p.read_bytes() for p in out.rglob("*.json*") if p.name != "summary.json"} == written


def segments_into(text: str, pieces: set[str]) -> bool:
    """Whether ``text`` is some of ``pieces`` joined with single spaces (a search over where the next
    piece may start)."""
    starts, seen = [0], {0}
    while starts:
        start = starts.pop()
        for piece in pieces:
            if text.startswith(piece, start):
                end = start + len(piece)
                if end == len(text):
                    return True
                if text[end] == " " and end + 1 not in seen:
                    seen.add(end + 1)
                    starts.append(end + 1)
    return False


def check_documents_and_mc(out: Path, fortunes: Path, train_texts: set[str], speech: dict) -> None:
    heldout_texts = {r["text"] for s in ("dev", "test") for r in speech[s]}
    pool = read_jsonl(out / "docs" / "pool.jsonl")
    assert pool and all(set(r) == {"id", "text", "topic", "n_words"} for r in pool)
    for row in pool:  # 40-80 words of consecutive training fortunes of one topic
        assert 40 <= row["n_words"] == len(row["text"].split()) <= 80
        same_topic = {t["text"] for t in read_jsonl(out / "text" / "train.jsonl") if t["topic"] == row["topic"]}
        assert segments_into(row["text"], same_topic)
        assert not any(h in row["text"] for h in heldout_texts)
    pool_by_id = {r["id"]: r for r in pool}

    docs = {s: load_manifest(out / "docs" / f"{s}.jsonl", require_audio=True) for s in prep.SPLITS}
    assert [len(docs[s]) for s in prep.SPLITS] == [2, 1, 1]
    for split, rows in docs.items():
        for doc in rows:
            assert doc.speaker in (TRAIN if split == "train" else HELDOUT)
            assert set(doc.meta) == {"doc", "topic", "n_words"}
            # spoken chunk by chunk: 3-6 words each, contiguous, ending with the wav
            assert " ".join(w["w"] for w in doc.words) == doc.text
            assert all(3 <= sum(any(c.isalnum() for c in t) for t in w["w"].split()) <= 6 for w in doc.words)
            assert doc.words[0]["start"] == 0
            assert all(a["end"] == b["start"] for a, b in zip(doc.words, doc.words[1:]))
            info = sf.info(doc.audio)
            assert info.samplerate == 16000 and doc.words[-1]["end"] == info.frames / 16000
            assert doc.duration == pytest.approx(info.frames / 16000, abs=1e-4)
            if split == "train":
                assert pool_by_id[doc.meta["doc"]]["text"] == doc.text
            else:  # held-out documents: none of the pool, no training text inside
                assert doc.meta["doc"] not in pool_by_id
                assert not any(t in doc.text for t in train_texts)
                assert not any(doc.text in p["text"] for p in pool)

    all_texts = {e.text for e in prep.read_fortunes(fortunes)}
    questions = load_manifest(out / "mc" / "test.jsonl", require_audio=True)
    assert len(questions) == 3
    for q in questions:
        options, answer = q.meta["options"], q.meta["answer"]
        assert q.speaker in HELDOUT and sf.info(q.audio).samplerate == 16000
        assert len(options) == len({o.lower() for o in options}) == 4 and 0 <= answer < 4
        assert len(q.text.split()) >= 5 and len(options[answer].split()) >= 3
        whole = f"{q.text} {options[answer]}"  # the true rest completes a held-out fortune
        assert whole in all_texts and whole not in train_texts
        assert not any(q.text in t for t in train_texts)
        for i, option in enumerate(options):  # the others end other fortunes
            if i != answer:
                assert any(t.endswith(" " + option) and t != whole for t in all_texts - train_texts)


def test_interrupted_run_resumes(fortunes, tmp_path, count_synthesis):
    out = tmp_path / "out"

    def crash_after_five(item):
        if len(count_synthesis) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prep.prepare_demo_data(
            out, fortunes_dir=fortunes, workers=1, on_item=crash_after_five, **TINY
        )
    assert len(wav_mtimes(out)) == 5 and not (out / "speech" / "train.jsonl").exists()
    before = wav_mtimes(out)

    count_synthesis.clear()
    summary = prep.prepare_demo_data(out, fortunes_dir=fortunes, workers=1, **TINY)
    assert len(count_synthesis) == 13 and summary["synthesized"] == 13
    assert all(p.stat().st_mtime_ns == m for p, m in before.items())
    assert len(read_jsonl(out / "speech" / "train.jsonl")) == 12


def test_killed_worker_pool_resumes(fortunes, tmp_path, count_synthesis):
    """SIGKILL the command line mid-synthesis (2 worker processes), then finish the run in-process."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "stages.prepare_demo_data", str(out), "--fortunes-dir", str(fortunes),
           "--n-train", "40", "--n-dev", "3", "--n-test", "3", "--n-docs", "0", "0", "0", "--n-mc", "0",
           "--workers", "2",
           "--train-voices", *TRAIN, "--heldout-voices", *HELDOUT]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[1], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while len(list((out / "speech" / "wav" / "train").glob("*.wav"))) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, (
            "the run ended before it could be killed"
        )
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole session: the parent and its worker processes
    proc.wait()
    done = len(wav_mtimes(out))
    assert 3 <= done < 40

    kwargs = {**TINY, "n_train": 40}
    summary = prep.prepare_demo_data(out, fortunes_dir=fortunes, workers=1, **kwargs)
    assert len(count_synthesis) == summary["synthesized"] == 46 - done
    rows = read_jsonl(out / "speech" / "train.jsonl")
    assert len(rows) == 40 and all(sf.info(out / "speech" / r["audio"]).frames > 0 for r in rows)


def test_voice_errors(fortunes, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="never be used for training"):
        prep.prepare_demo_data(
            tmp_path, fortunes_dir=fortunes, **{**TINY, "heldout_voices": ["flite:kal16"]}
        )
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        prep.prepare_demo_data(tmp_path, fortunes_dir=tmp_path / "missing", **TINY)

    real = prep.get_voice

    def no_flite(spec):
        if spec.startswith("flite:"):
            raise TTSUnavailableError("`flite` is not installed: run `apt-get install flite`")
        return real(spec)

    monkeypatch.setattr(prep, "get_voice", no_flite)
    with pytest.raises(RuntimeError, match="no held-out voice"):
        prep.prepare_demo_data(tmp_path, fortunes_dir=fortunes, **TINY)


@pytest.mark.skipif(
    not prep.FORTUNES_DIR.is_dir(), reason="the Debian `fortunes` package is not installed"
)
def test_real_fortunes(tmp_path):
    entries = prep.read_fortunes()
    assert len(entries) > 10000 and {"computers", "politics", "science"} <= {
        e.topic for e in entries
    }
    assert len({e.key for e in entries}) == len(entries)
    summary = prep.prepare_demo_data(
        tmp_path, fortunes_dir=prep.FORTUNES_DIR, topics=["food", "science"], workers=1, **TINY
    )
    assert set(summary["text"]["topics"]) == {"food", "science"}
    text = {r["text"] for r in read_jsonl(tmp_path / "text" / "train.jsonl")}
    pool = [r["text"] for r in read_jsonl(tmp_path / "docs" / "pool.jsonl")]
    assert summary["pool"]["documents"] == len(pool) > 20
    for split in ("dev", "test"):
        heldout = {r["text"] for r in read_jsonl(tmp_path / "speech" / f"{split}.jsonl")}
        assert not text & heldout
        assert not any(h in doc for h in heldout for doc in pool)


def test_build_documents_against_a_plain_count():
    rng = random.Random(1)
    entries = [prep.Entry(f"{topic} entry {i} " + "word " * rng.randint(1, 57), topic)
               for topic in ("x", "y", "z") for i in range(60)]  # fmt: skip
    entries = [prep.Entry(e.text.strip(), e.topic) for e in entries]
    documents = prep.build_documents(entries, "0/test")
    assert documents == prep.build_documents(entries, "0/test") != prep.build_documents(entries, "1/test")
    used = [e for d in documents for e in d.entries]
    assert len(used) == len(set(used))
    for doc in documents:
        assert 40 <= doc.n_words <= 80 and {e.topic for e in doc.entries} == {doc.topic}
        assert doc.text == " ".join(e.text for e in doc.entries) and doc.id.startswith("doc-")
    for topic in ("x", "y", "z"):  # only a remainder too short for a document is left over
        assert sum(e.n_words for e in entries if e.topic == topic and e not in used) < 40
    with pytest.raises(ValueError, match="longer than a document"):
        prep.build_documents([prep.Entry("w " * 81, "x")], "0")


def test_split_for_continuation():
    rng = random.Random(0)
    entry = prep.Entry("One two three four five. Six seven eight nine", "t")
    assert prep.split_for_continuation(entry, rng) == ("One two three four five.", "Six seven eight nine")
    plain = prep.Entry("a b c d e f g h i j", "t")
    cuts = {len(prep.split_for_continuation(plain, rng)[0].split()) for _ in range(50)}
    assert cuts == {5, 6, 7}  # context >= 5 words, rest >= 3
    with pytest.raises(ValueError, match="too short"):
        prep.split_for_continuation(prep.Entry("a b c d e f g", "t"), rng)
