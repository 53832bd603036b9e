"""The corpus preparers on fake trees in the real layouts (a few generated clips): manifests that load
with their audio, a clear error naming the file (and line) on a missing transcript or clip, and a
second run that writes nothing."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechllm.manifest import load_manifest
from stages.__main__ import main as cli

RATE = 16000


def tone(seconds: float, rate: int = RATE, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (0.2 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def snapshot(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its modification time (a rewrite changes it)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def prepare(*argv: str) -> int:
    return cli(["prepare", *map(str, argv)])


# ----------------------------------------------------------------------------------- LibriSpeech

UTTERANCES = {  # subset -> speaker -> chapter -> [(utt, seconds, text)]
    "train-clean-100": {"103": {"1240": [("0000", 0.5, "CHAPTER ONE MISSUS RACHEL LYNDE IS SURPRISED"),
                                         ("0001", 0.7, "THAT HAD ITS SOURCE AWAY BACK IN THE WOODS")]},
                        "1034": {"121119": [("0000", 0.4, "THE LITTLE GIRL WAS THINKING")]}},
    "train-clean-360": {"100": {"121669": [("0000", 0.3, "TOM THE PIPER'S SON")]}},
    "dev-clean": {"84": {"121123": [("0000", 0.6, "GO DO YOU HEAR")]}},
    "test-clean": {"1089": {"134686": [("0000", 0.5, "HE HOPED THERE WOULD BE STEW FOR DINNER")]}},
}
LM_LINES = ["A SENTENCE FROM THE LM CORPUS", "GO DO YOU HEAR", "ANOTHER ONE HERE", "",
            "HE HOPED THERE WOULD BE STEW FOR DINNER", "THE THIRD SENTENCE OF THE CORPUS", "FOUR WORDS ARE HERE"]


@pytest.fixture
def librispeech(tmp_path) -> Path:
    root = tmp_path / "corpus" / "LibriSpeech"
    for subset, speakers in UTTERANCES.items():
        for speaker, chapters in speakers.items():
            for chapter, utts in chapters.items():
                folder = root / subset / speaker / chapter
                folder.mkdir(parents=True)
                lines = []
                for utt, seconds, text in utts:
                    sf.write(folder / f"{speaker}-{chapter}-{utt}.flac", tone(seconds), RATE)
                    lines.append(f"{speaker}-{chapter}-{utt} {text}\n")
                (folder / f"{speaker}-{chapter}.trans.txt").write_text("".join(lines))
    with gzip.open(tmp_path / "corpus" / "librispeech-lm-norm.txt.gz", "wt") as f:
        f.write("\n".join(LM_LINES) + "\n")
    return tmp_path / "corpus"


def test_librispeech_subsets_combined_and_lm_text(librispeech, tmp_path, capsys):
    out = tmp_path / "data" / "librispeech"
    assert prepare("librispeech", "--root", librispeech, "--out", out,
                   "--combine", "train-460=train-clean-100,train-clean-360",
                   "--lm-text", librispeech / "librispeech-lm-norm.txt.gz") == 0
    assert sorted(p.name for p in out.glob("*.jsonl")) == [
        "dev-clean.jsonl", "lm-text.jsonl", "test-clean.jsonl", "train-460.jsonl", "train-clean-100.jsonl",
        "train-clean-360.jsonl"]
    for subset, speakers in UTTERANCES.items():
        items = load_manifest(out / f"{subset}.jsonl", require_audio=True)
        expected = sorted((f"{s}-{c}-{u}", sec, text, s) for s, chapters in speakers.items()
                          for c, utts in chapters.items() for u, sec, text in utts)
        assert [(u.id, u.duration, u.text, u.speaker) for u in items] == expected
        for utt in items:  # the path resolves to the flac it names, whose length is the duration
            assert utt.audio.name == f"{utt.id}.flac" and sf.info(str(utt.audio)).duration == utt.duration
    combined = load_manifest(out / "train-460.jsonl", require_audio=True)
    assert [u.id for u in combined] == [u.id for s in ("train-clean-100", "train-clean-360")
                                        for u in load_manifest(out / f"{s}.jsonl")]
    lm = load_manifest(out / "lm-text.jsonl")
    # the dev and test transcripts are left out; line numbers make the ids
    assert [(u.id, u.text) for u in lm] == [("lm-000000001", LM_LINES[0]), ("lm-000000003", LM_LINES[2]),
                                           ("lm-000000006", LM_LINES[5]), ("lm-000000007", LM_LINES[6])]
    assert "2 left out as dev/test transcripts" in capsys.readouterr().out


def test_librispeech_second_run_writes_nothing(librispeech, tmp_path, capsys):
    out = tmp_path / "ls"
    argv = ["librispeech", "--root", librispeech, "--out", out, "--lm-text", librispeech / "librispeech-lm-norm.txt.gz"]
    assert prepare(*argv) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert prepare(*argv) == 0
    assert snapshot(out) == before
    assert "written" not in capsys.readouterr().out


def test_librispeech_lm_sample_is_seeded_and_capped(librispeech, tmp_path):
    lm = librispeech / "librispeech-lm-norm.txt.gz"
    picks = []
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        assert prepare("librispeech", "--root", librispeech, "--out", tmp_path / name, "--subsets",
                       "--lm-text", lm, "--lm-max-sentences", 2, "--lm-seed", seed) == 0
        picks.append([u.id for u in load_manifest(tmp_path / name / "lm-text.jsonl")])
        assert not list((tmp_path / name).glob("train-*"))  # --subsets with no names: only the LM text
    assert len(picks[0]) == 2 and picks[0] == picks[1]
    assert picks[0] == sorted(picks[0])  # kept in file order
    seeds = [sorted(u.id for u in load_manifest(tmp_path / n / "lm-text.jsonl")) for n in "ac"]
    assert all(set(s) <= {"lm-000000001", "lm-000000003", "lm-000000006", "lm-000000007"} for s in seeds)


def test_librispeech_missing_transcript_line_names_the_flac(librispeech, tmp_path, capsys):
    trans = librispeech / "LibriSpeech/train-clean-100/103/1240/103-1240.trans.txt"
    trans.write_text(trans.read_text().splitlines()[0] + "\n")  # the line of 103-1240-0001 is gone
    assert prepare("librispeech", "--root", librispeech, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "103-1240-0001.flac: no transcript line for '103-1240-0001'" in err and str(trans) in err


def test_librispeech_missing_flac_names_transcript_line(librispeech, tmp_path, capsys):
    chapter = librispeech / "LibriSpeech/dev-clean/84/121123"
    (chapter / "84-121123-0000.flac").unlink()
    assert prepare("librispeech", "--root", librispeech, "--out", tmp_path / "o", "--subsets", "dev-clean") == 2
    err = capsys.readouterr().err
    assert f"{chapter / '84-121123.trans.txt'}:1: audio file {chapter / '84-121123-0000.flac'} does not exist" in err


def test_librispeech_missing_transcript_file(librispeech, tmp_path, capsys):
    trans = librispeech / "LibriSpeech/test-clean/1089/134686/1089-134686.trans.txt"
    trans.unlink()
    assert prepare("librispeech", "--root", librispeech, "--out", tmp_path / "o", "--subsets", "test-clean") == 2
    assert f"{trans}: transcript file is missing (the chapter has 1 flac files)" in capsys.readouterr().err
    assert not (tmp_path / "o" / "test-clean.jsonl").exists()


# ----------------------------------------------------------------------------------- Common Voice

CV_HEADER = ["client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes", "down_votes", "age",
             "gender", "accents", "variant", "locale", "segment"]
CV_CLIPS = {  # split -> [(clip, seconds, sentence, gender)]
    "train": [("common_voice_en_1.mp3", 1.0, 'He said "hello" to them.', "male_masculine"),
              ("common_voice_en_2.mp3", 0.8, "A second sentence.", "")],
    "dev": [("common_voice_en_3.mp3", 0.9, "Dev clip here.", "female_feminine")],
    "test": [("common_voice_en_4.mp3", 1.2, "Test clip, with a comma.", "")],
}


def write_cv_tsv(path: Path, rows: list[list[str]]) -> None:
    path.write_text("\t".join(CV_HEADER) + "\n" + "".join("\t".join(r) + "\n" for r in rows))


@pytest.fixture
def common_voice(tmp_path) -> Path:
    """A release folder with MP3 clips at 48 kHz, as Common Voice ships them (soundfile writes MP3)."""
    root = tmp_path / "cv-corpus" / "en"
    (root / "clips").mkdir(parents=True)
    for split, clips in CV_CLIPS.items():
        rows = []
        for i, (clip, seconds, sentence, gender) in enumerate(clips):
            sf.write(root / "clips" / clip, tone(seconds, 48000), 48000, format="MP3")
            rows.append([f"client{i}", clip, f"s{i}", sentence, "", "2", "0", "twenties" if gender else "", gender,
                         "", "", "en", ""])
        write_cv_tsv(root / f"{split}.tsv", rows)
    return root


def test_common_voice_keeps_the_mp3_paths_and_warns_about_their_rate(common_voice, tmp_path, capsys):
    out = tmp_path / "cv"
    assert prepare("common-voice", "--root", common_voice, "--out", out) == 0
    for split, clips in CV_CLIPS.items():
        items = load_manifest(out / f"{split}.jsonl", require_audio=True)
        assert [(u.id, u.text, u.speaker) for u in items] == [
            (c[:-4], s, f"client{i}") for i, (c, _, s, _) in enumerate(clips)]
        for utt, (clip, seconds, _, gender) in zip(items, clips):
            assert utt.audio == out / ".." / "cv-corpus" / "en" / "clips" / clip or utt.audio.resolve() == \
                (common_voice / "clips" / clip).resolve()
            assert abs(utt.duration - seconds) < 0.06  # MP3 frames pad the end
            assert utt.meta.get("gender", "") == gender and utt.meta["locale"] == "en"
    assert "warning: 2 clips of train are at [48000] Hz, not 16000" in capsys.readouterr().out


def test_common_voice_resample_writes_16k_flacs_once(common_voice, tmp_path, capsys):
    out = tmp_path / "cv"
    argv = ["common-voice", "--root", common_voice, "--out", out, "--resample", 16000]
    assert prepare(*argv) == 0
    items = load_manifest(out / "train.jsonl", require_audio=True)
    for utt, (_, seconds, _, _) in zip(items, CV_CLIPS["train"]):
        assert utt.audio.resolve() == (out / "clips-16000" / f"{utt.id}.flac").resolve()
        info = sf.info(str(utt.audio))
        assert info.samplerate == 16000 and info.format == "FLAC" and abs(utt.duration - seconds) < 0.06
    assert "warning" not in capsys.readouterr().out
    before = snapshot(out)
    assert prepare(*argv) == 0
    assert snapshot(out) == before


def test_common_voice_missing_clip_names_tsv_line(common_voice, tmp_path, capsys):
    (common_voice / "clips" / "common_voice_en_2.mp3").unlink()
    assert prepare("common-voice", "--root", common_voice, "--out", tmp_path / "cv", "--splits", "train") == 2
    assert (f"{common_voice / 'train.tsv'}:3: audio file {common_voice / 'clips' / 'common_voice_en_2.mp3'} "
            "does not exist") in capsys.readouterr().err


def test_common_voice_empty_sentence_and_missing_column(common_voice, tmp_path, capsys):
    write_cv_tsv(common_voice / "dev.tsv", [["c", "common_voice_en_3.mp3", "s", "  ", "", "1", "0", "", "", "", "",
                                             "en", ""]])
    assert prepare("common-voice", "--root", common_voice, "--out", tmp_path / "cv", "--splits", "dev") == 2
    assert f"{common_voice / 'dev.tsv'}:2: field 'sentence' is empty" in capsys.readouterr().err
    (common_voice / "test.tsv").write_text("client_id\tpath\n")
    assert prepare("common-voice", "--root", common_voice, "--out", tmp_path / "cv", "--splits", "test") == 2
    assert f"{common_voice / 'test.tsv'}:1: header has no column 'sentence'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- LibriHeavy


def cut(cut_id: str, source: str, start: float, duration: float, texts: list[str], speaker: str = "100") -> dict:
    return {"id": cut_id, "start": start, "duration": duration, "channel": 0,
            "supervisions": [{"id": cut_id, "recording_id": source, "start": 0.0, "duration": duration,
                              "speaker": speaker, "custom": {"texts": texts, "pre_texts": ["..."]}}],
            "recording": {"id": source, "sources": [{"type": "file", "channels": [0], "source": source}],
                          "sampling_rate": RATE, "duration": 3.0}, "type": "MonoCut"}


@pytest.fixture
def libriheavy(tmp_path) -> Path:
    root = tmp_path / "libriheavy"
    chapter = root / "download/librilight/small/100/sea_fairies/01_sea_fairies.flac"
    chapter.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sf.write(chapter, (0.1 * rng.standard_normal(3 * RATE)).astype(np.float32), RATE)
    sf.write(root / "download/short.flac", tone(0.75), RATE)
    cuts = [cut("small/100/sea_fairies/01_0", "download/librilight/small/100/sea_fairies/01_sea_fairies.flac",
                0.5, 1.25, ["Oh, the sea!", "OH THE SEA"]),
            cut("small/100/sea_fairies/01_1", "download/librilight/small/100/sea_fairies/01_sea_fairies.flac",
                2.0, 0.8, ["Trot said.", "TROT SAID"], speaker="101"),
            cut("small/7/whole", "download/short.flac", 0.0, 0.75, ["A whole file.", "A WHOLE FILE"])]
    with gzip.open(root / "libriheavy_cuts_small.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(c) + "\n" for c in cuts))
    return root


def test_libriheavy_segments_become_clips(libriheavy, tmp_path, capsys):
    out = tmp_path / "data" / "libriheavy" / "small.jsonl"
    assert prepare("libriheavy", "--cuts", libriheavy / "libriheavy_cuts_small.jsonl.gz", "--out", out) == 0
    items = load_manifest(out, require_audio=True)
    assert [(u.id, u.text, u.speaker, u.duration) for u in items] == [
        ("small/100/sea_fairies/01_0", "Oh, the sea!", "100", 1.25),
        ("small/100/sea_fairies/01_1", "Trot said.", "101", 0.8),
        ("small/7/whole", "A whole file.", "100", 0.75)]
    recording, _ = sf.read(libriheavy / "download/librilight/small/100/sea_fairies/01_sea_fairies.flac", dtype="float32")
    for utt, start in zip(items[:2], (0.5, 2.0)):  # segments are written as their own (lossless) clips
        assert utt.audio.parent == out.parent / "small-audio"
        clip, rate = sf.read(utt.audio, dtype="float32")
        first = int(start * RATE)
        np.testing.assert_array_equal(clip, recording[first:first + int(utt.duration * RATE)])
    assert items[2].audio.resolve() == (libriheavy / "download/short.flac").resolve()  # a whole recording: itself

    assert prepare("libriheavy", "--cuts", libriheavy / "libriheavy_cuts_small.jsonl.gz", "--out",
                   tmp_path / "norm.jsonl", "--text-index", 1) == 0
    assert [u.text for u in load_manifest(tmp_path / "norm.jsonl")] == ["OH THE SEA", "TROT SAID", "A WHOLE FILE"]


def test_libriheavy_second_run_writes_nothing(libriheavy, tmp_path):
    argv = ["libriheavy", "--cuts", libriheavy / "libriheavy_cuts_small.jsonl.gz", "--out", tmp_path / "lh" / "small.jsonl"]
    assert prepare(*argv) == 0
    before = snapshot(tmp_path / "lh")
    assert len(before) == 3  # the manifest and two segment clips
    assert prepare(*argv) == 0
    assert snapshot(tmp_path / "lh") == before


def test_libriheavy_missing_recording_and_text_name_the_line(libriheavy, tmp_path, capsys):
    cuts = libriheavy / "cuts.jsonl"
    bad = cut("x/1", "download/nowhere.flac", 0.0, 1.0, ["Text."])
    cuts.write_text(json.dumps(cut("small/7/whole", "download/short.flac", 0.0, 0.75, ["A."])) + "\n" + json.dumps(bad) + "\n")
    assert prepare("libriheavy", "--cuts", cuts, "--out", tmp_path / "o.jsonl") == 2
    assert f"{cuts}:2: audio file {libriheavy / 'download/nowhere.flac'} does not exist" in capsys.readouterr().err
    del bad["supervisions"][0]["custom"]
    cuts.write_text(json.dumps(bad) + "\n")
    assert prepare("libriheavy", "--cuts", cuts, "--out", tmp_path / "o.jsonl") == 2
    assert f"{cuts}:1: supervisions[0] has neither custom.texts[0] nor text" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- text corpora

DOCS = [{"text": f"Document number {i} starts here. It has a second sentence about topic {i % 3}! "
                 f"And a third one, which is longer than the others by a few words.",
         "url": f"https://example.org/{i}", "topic": ["science", "history", "health"][i % 3]} for i in range(40)]


@pytest.fixture
def web_text(tmp_path) -> Path:
    path = tmp_path / "fineweb-edu-sample.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(d) + "\n" for d in DOCS))
    return path


def test_text_corpus_documents_sampled_with_a_seed(web_text, tmp_path):
    outs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert prepare("text-corpus", "--input", web_text, "--out", tmp_path / f"{name}.jsonl", "--n", 10,
                       "--seed", seed, "--source-field", "url", "--id-prefix", "fw") == 0
        outs[name] = load_manifest(tmp_path / f"{name}.jsonl")
    a = outs["a"]
    assert len(a) == 10 and [u.id for u in a] == [u.id for u in outs["b"]] != [u.id for u in outs["c"]]
    for utt in a:
        i = int(utt.id.split("-")[1]) - 1  # record number = line number
        assert utt.text == DOCS[i]["text"] and utt.meta == {"source": DOCS[i]["url"], "topic": DOCS[i]["topic"]}


def test_text_corpus_sentences_exclusion_and_max_words(web_text, tmp_path):
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"id": "h", "text": "document NUMBER 3   starts here."}) + "\n")
    out = tmp_path / "sentences.jsonl"
    assert prepare("text-corpus", "--input", web_text, "--out", out, "--unit", "sentences", "--exclude", heldout,
                   "--max-words", 12) == 0
    items = load_manifest(out)
    texts = [u.text for u in items]
    assert "Document number 3 starts here." not in texts and "Document number 4 starts here." in texts
    assert "It has a second sentence about topic 0!" in texts
    assert not any(t.startswith("And a third one") for t in texts)  # 15 words > 12: left out
    assert [u.id for u in items][:2] == ["sentences-000000001-s000", "sentences-000000001-s001"]
    assert items[0].meta == {"source": web_text.name, "topic": "science"}
    docs = tmp_path / "docs.jsonl"
    assert prepare("text-corpus", "--input", web_text, "--out", docs, "--max-words", 13, "--n", 3) == 0
    # documents are cut at a sentence boundary: the first two sentences hold 5 + 8 words, the third 15
    for utt in load_manifest(docs):
        i = int(utt.id.split("-")[1]) - 1
        assert utt.text == f"Document number {i} starts here. It has a second sentence about topic {i % 3}!"


def test_text_corpus_plain_text_and_idempotence(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("first document line\n\nsecond document line\nthird\n")
    out = tmp_path / "out" / "plain.jsonl"
    argv = ["text-corpus", "--input", txt, "--out", out, "--min-words", 2]
    assert prepare(*argv) == 0
    assert [(u.id, u.text) for u in load_manifest(out)] == [("plain-000000001", "first document line"),
                                                           ("plain-000000003", "second document line")]
    before = snapshot(out.parent)
    assert prepare(*argv) == 0
    assert snapshot(out.parent) == before


def test_text_corpus_bad_record_names_the_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text field"}) + "\n")
    assert prepare("text-corpus", "--input", path, "--out", tmp_path / "o.jsonl") == 2
    assert f"{path}:2: no field 'text' (fields: body)" in capsys.readouterr().err


def test_text_corpus_hub_id_that_cannot_be_read_is_a_clear_error(tmp_path, capsys):
    """Without `datasets` the message names the extra; with it (offline here) it names the dataset."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        installed = False
    else:
        installed = True
    assert prepare("text-corpus", "--input", "HuggingFaceFW/fineweb-edu", "--config", "sample-10BT",
                   "--out", tmp_path / "o.jsonl", "--n", 5) == 2
    err = capsys.readouterr().err
    if installed:
        assert "error: --input 'HuggingFaceFW/fineweb-edu': cannot open the Hugging Face dataset (" in err
    else:
        assert "'HuggingFaceFW/fineweb-edu' is not a local file" in err and "the `hf` extra" in err
    assert not (tmp_path / "o.jsonl").exists()


def test_text_corpus_parquet_and_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(DOCS)
    ds.to_parquet(str(tmp_path / "docs.parquet"))
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(5))}).save_to_disk(str(tmp_path / "saved"))
    runs = {"parquet": ["--input", tmp_path / "docs.parquet"],
            "saved": ["--input", tmp_path / "saved", "--split", "validation"]}
    for name, argv in runs.items():
        assert prepare("text-corpus", *argv, "--out", tmp_path / f"{name}.jsonl", "--n", 4, "--seed", 3) == 0
    parquet = load_manifest(tmp_path / "parquet.jsonl")
    assert len(parquet) == 4
    assert [(u.text, u.meta["topic"]) for u in parquet] == [
        (DOCS[int(u.id.split("-")[1]) - 1]["text"], DOCS[int(u.id.split("-")[1]) - 1]["topic"]) for u in parquet]
    saved = load_manifest(tmp_path / "saved.jsonl")
    assert len(saved) == 4 and all(int(u.id.split("-")[1]) <= 5 for u in saved)  # the validation split's 5
    assert prepare("text-corpus", "--input", tmp_path / "saved", "--split", "dev", "--out", tmp_path / "x.jsonl") == 2
