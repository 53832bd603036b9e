"""The resumable synthesis job, with the real espeak-ng on a few short items."""

import json
import random

import numpy as np
import pytest
import soundfile as sf

from speechllm.manifest import load_manifest, write_manifest
from speechllm.synthesis import SynthesisItem, chunk_words, manifest_rows, synthesize_items, words_path
from speechllm.tts import get_voice, resample

VOICE = "espeak-ng:en-us"


@pytest.fixture(scope="module", autouse=True)
def _needs_espeak(tts_voice):
    tts_voice(VOICE)  # a skip naming the package to install; a failure under CI=true


def make_items() -> list[SynthesisItem]:
    return [
        SynthesisItem("a", "one small cat", VOICE),
        SynthesisItem("b", "two big dogs run", VOICE, chunks=("two big", "dogs run")),
        SynthesisItem("c", "a red house", "espeak-ng:en-us+f2"),
        SynthesisItem("d", "the river runs over the stone", VOICE, chunks=("the river runs", "over the stone")),
        SynthesisItem("e", "blue tree", VOICE, audio="nested/e.wav"),
    ]


def stamps(out, items) -> dict[str, tuple[int, int]]:
    """(mtime_ns, inode) of each item's wav: a rewrite (atomic rename) changes at least one of them."""
    return {it.id: ((out / it.audio).stat().st_mtime_ns, (out / it.audio).stat().st_ino) for it in items}


def test_killed_job_resumes_without_touching_finished_items(tmp_path):
    items, out = make_items(), tmp_path / "out"
    new = []

    def crash_after_two(item):
        new.append(item.id)
        if len(new) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synthesize_items(items, out, workers=1, progress=False, on_item=crash_after_two)
    assert new == ["a", "b"]
    assert sorted(p.name for p in out.rglob("*.wav")) == ["a.wav", "b.wav"]
    before = stamps(out, items[:2])

    new.clear()
    results = synthesize_items(items, out, workers=1, progress=False, on_item=lambda it: new.append(it.id))
    assert new == ["c", "d", "e"]  # the finished items were only read back
    assert stamps(out, items[:2]) == before
    assert list(results) == [it.id for it in items]
    for item in items:
        info = sf.info(out / item.audio)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert results[item.id]["duration"] == info.frames / 16000
        assert (results[item.id]["words"] is None) == (item.chunks is None)

    again = synthesize_items(items, out, workers=1, progress=False, on_item=lambda it: new.append(it.id))
    assert again == results and new == ["c", "d", "e"]  # nothing left to do; words read from sidecars


def test_half_written_items_are_redone(tmp_path):
    out = tmp_path / "out"
    items = make_items()[:2]
    a, b = (out / it.audio for it in items)
    a.parent.mkdir(parents=True)
    sf.write(a.with_name(".a.wav.tmp"), np.zeros(1600, np.float32), 16000, subtype="PCM_16", format="WAV")
    sf.write(b, np.zeros(1600, np.float32), 16000, subtype="PCM_16")  # a wav without its sidecar
    new = []
    synthesize_items(items, out, workers=1, progress=False, on_item=lambda it: new.append(it.id))
    assert new == ["a", "b"] and sf.info(b).frames > 1600

    # a sidecar whose wav never came (killed in between), a wav at the wrong rate, a stale sidecar
    b.unlink()
    sf.write(a, np.zeros(2205, np.float32), 22050, subtype="PCM_16")
    synthesize_items(items, out, workers=1, progress=False, on_item=lambda it: new.append(it.id))
    assert new == ["a", "b"] * 2
    rechunked = SynthesisItem("b", "two big dogs run", VOICE, chunks=("two", "big dogs run"))
    result = synthesize_items([rechunked], out, workers=1, progress=False, on_item=lambda it: new.append(it.id))
    assert new[-1] == "b" and [w["w"] for w in result["b"]["words"]] == ["two", "big dogs run"]


def test_chunked_item_has_exact_contiguous_boundaries(tmp_path):
    item = SynthesisItem("d", "the river runs\nover the stone", VOICE, chunks=("the river runs", "over the stone"))
    result = synthesize_items([item], tmp_path, workers=1, progress=False)["d"]
    words = result["words"]
    assert [w["w"] for w in words] == ["the river runs", "over the stone"]
    assert words[0]["start"] == 0 and words[0]["end"] == words[1]["start"] and words[0]["end"] > 0
    assert words[-1]["end"] == result["duration"] == sf.info(tmp_path / item.audio).frames / 16000
    assert json.loads(words_path(tmp_path / item.audio).read_text()) == words
    # the second chunk's span of the wav is that chunk spoken alone (to the 16-bit PCM step)
    wav, sr = sf.read(tmp_path / item.audio, dtype="float32")
    alone = resample(*get_voice(VOICE).synthesize("over the stone"), 16000)
    cut = wav[round(words[1]["start"] * sr) :]
    assert len(cut) == len(alone) and np.abs(cut - alone).max() <= 1 / 32768


def test_ranks_share_the_items(tmp_path):
    items = make_items()
    shards = [synthesize_items(items, tmp_path, workers=1, rank=r, world_size=2, progress=False) for r in (0, 1)]
    assert list(shards[0]) == ["a", "c", "e"] and list(shards[1]) == ["b", "d"]
    merged = {**shards[0], **shards[1]}
    assert sorted(merged) == sorted(it.id for it in items) and len(merged) == sum(map(len, shards))
    assert synthesize_items(items, tmp_path, workers=1, progress=False) == {it.id: merged[it.id] for it in items}
    with pytest.raises(ValueError, match="rank 2 is not in"):
        synthesize_items(items, tmp_path, rank=2, world_size=2)


def test_process_pool_matches_in_process(tmp_path):
    items = make_items()
    serial = synthesize_items(items, tmp_path / "serial", workers=1, progress=False)
    pooled = synthesize_items(items, tmp_path / "pool", workers=2, progress=False)
    assert pooled == serial
    for item in items:
        assert np.array_equal(sf.read(tmp_path / "serial" / item.audio)[0], sf.read(tmp_path / "pool" / item.audio)[0])


def test_manifest_rows_round_trip_through_the_loader(tmp_path):
    items = make_items()[:2]
    results = synthesize_items(items, tmp_path, workers=1, progress=False)
    rows = manifest_rows(items, results, {"b": {"topic": "pets", "n_words": 4}})
    assert list(rows[0]) == ["id", "audio", "duration", "text", "speaker"]
    assert list(rows[1]) == ["id", "audio", "duration", "text", "speaker", "words", "topic", "n_words"]
    assert rows[1]["duration"] == round(results["b"]["duration"], 4) and rows[1]["audio"] == "wav/b.wav"
    write_manifest(tmp_path / "m.jsonl", rows)
    loaded = load_manifest(tmp_path / "m.jsonl", require_audio=True)
    assert loaded[1].words == results["b"]["words"] and loaded[1].meta == {"topic": "pets", "n_words": 4}
    assert loaded[0].audio == tmp_path / "wav" / "a.wav" and loaded[0].speaker == VOICE
    with pytest.raises(ValueError, match="no synthesis result for item 'c'"):
        manifest_rows(make_items()[:3], results)


def test_bad_items_and_failing_voices_are_named(tmp_path):
    with pytest.raises(ValueError, match="item 'x': its chunks .* do not join up to its text"):
        SynthesisItem("x", "one two three", VOICE, chunks=("one", "three"))
    with pytest.raises(ValueError, match="share the id 'a'"):
        synthesize_items([SynthesisItem("a", "one", VOICE), SynthesisItem("a", "two", VOICE)], tmp_path)
    with pytest.raises(ValueError, match="share the audio 'x.wav'"):
        synthesize_items([SynthesisItem("a", "one", VOICE, audio="x.wav"),
                          SynthesisItem("b", "two", VOICE, audio="x.wav")], tmp_path)  # fmt: skip
    bad = SynthesisItem("q7", "hello there", "espeak-ng:xx-nope")
    with pytest.raises(RuntimeError, match=r"espeak-ng:xx-nope failed on item q7 \('hello there'\): .*no voice"):
        synthesize_items([bad], tmp_path, workers=1, progress=False)


def test_chunk_words():
    rng = random.Random(0)
    sizes = set()
    for n in [1, 2, 3, 5, 6, 7, 12, 40, 80]:
        text = " ".join(f"w{i}" for i in range(n))
        chunks = chunk_words(text, (3, 6), rng)
        assert " ".join(chunks) == text
        lengths = [len(c.split()) for c in chunks]
        assert all(3 <= k <= 6 for k in lengths) if n >= 3 else lengths == [n]
        sizes.update(lengths)
    assert sizes >= {3, 4, 5, 6}  # random sizes, not one fixed size
    # punctuation-only tokens stick to a word and are not counted
    chunks = chunk_words("-- one two ... three four five six seven !", (3, 6), random.Random(0))
    assert " ".join(chunks) == "-- one two ... three four five six seven !"
    assert all(any(c.isalnum() for c in chunk) for chunk in chunks) and chunks[0].startswith("-- one")
    with pytest.raises(ValueError, match="chunk sizes"):
        chunk_words("a b c", (3, 4), rng)  # 5 words cannot be cut into chunks of 3-4
