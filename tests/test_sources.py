"""Data sources beyond our JSONL (speechllm.sources): real datasets / Lhotse / TASU corpora from generated
audio give the items and waveforms the clips hold; typos fail naming what is allowed; streams shard by
rank, shuffle by epoch and are read by position; bad rows are the same errors or counted skips as in
our manifests."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf
from source_fixtures import build_all, clips, cutset, hf_dataset

from datamodules.speech_text import SpeechTextDataModule, check_audio, check_clip
from speechllm.config import StageConfig
from speechllm.manifest import ManifestError, load_audio, load_manifest
from speechllm.sources import (
    SOURCE_FORMATS,
    SourceError,
    SourceFormat,
    imported,
    open_source,
    parse_source,
    register_source_format,
    source_problems,
)
from speechllm.sources.base import FileAudio
from speechllm.sources.stream import StreamReader
from speechllm.tts import resample


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return root, build_all(root)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def expected_waveform(path: str, rate: int = 16000, channel: int | None = None) -> torch.Tensor:
    """The file's channels averaged (or one channel), resampled: what load_audio must return."""
    data, sr = sf.read(path, dtype="float32", always_2d=True)
    return resample(torch.from_numpy(data.mean(axis=1) if channel is None else data[:, channel].copy()), sr, rate)


def source_rows(root: Path) -> list[dict]:
    return clips(root / "again", 10, seed=1)  # the clips build_all wrote (same seed), paths aside


# ---------------------------------------------------------------------------------------------- parsing


def test_a_source_string_parses_into_a_typed_spec():
    spec = parse_source("hf:openslr/librispeech_asr?name=clean&split=test&streaming=true&shuffle_buffer=64&text=sentence")
    assert (spec.format, spec.location) == ("hf", "openslr/librispeech_asr")
    assert spec.options["name"] == "clean" and spec.options["split"] == "test" and spec.options["text"] == "sentence"
    assert spec.options["streaming"] is True and spec.options["shuffle_buffer"] == 64
    assert spec.options["audio"] is None and spec.options["revision"] is None  # defaults filled
    assert parse_source("hf:parquet?data_files=a%26b.parquet").options["data_files"] == "a&b.parquet"
    assert parse_source("hf:d").options["split"] == "train" and parse_source("hf:d").options["streaming"] is False
    assert parse_source("data/x.jsonl").format == "jsonl" and parse_source("jsonl:data/x.jsonl").location == "data/x.jsonl"
    assert parse_source("lhotse-shar:dir").format == "lhotse-shar"


@pytest.mark.parametrize("text,message", [
    ("hff:x", "unknown source format 'hff' (have: jsonl, hf, lhotse, lhotse-shar, tasu"),
    ("hf:x?splt=a", "unknown option 'splt' (have: name, split,"),
    ("hf:x?streaming=yes2", "option 'streaming' must be true or false, got 'yes2'"),
    ("hf:x?shuffle_buffer=-1", "option 'shuffle_buffer' must be a whole number >= 0"),
    ("hf:x?split=a&split=b", "option 'split' is given twice"),
    ("hf:x?split", "option 'split' needs a value"),
    ("hf:x?split=", "option 'split' is empty"),
    ("hf:?split=a", "no location"),
    ("lhotse-shar:d?streaming=true", "unknown option 'streaming' (have: shuffle_buffer)"),
    ("tasu:f.jsonl?text=t", "unknown option 'text' (have: none)"),
])
def test_typos_fail_naming_what_is_allowed(text, message):
    with pytest.raises(SourceError) as err:
        parse_source(text)
    assert message in str(err.value) and text in str(err.value)


def stage_cfg(**data):
    return OmegaConf.merge(OmegaConf.structured(StageConfig), {"kind": "asr", **data})


def test_the_validation_pass_names_the_key_of_every_bad_source():
    from stages.validation import stage_problems

    cfg = stage_cfg(data={"sources": {"speech": {"manifest": "hf:ds?splt=train"}, "simulated": {"manifest": "t.jsonl", "kind": "simulated"}},
                          "val": {"dev": "lhotse:cuts.jsonl.gz?streaming=maybe"}, "test": {"clean": "hf:ds?split=test"}},
                    measures={"sets": {"m": "tasux:f.jsonl"}, "multiple_choice": {"mc": "hf:mc?text=ctx"}})
    problems = dict(stage_problems(cfg))
    assert "unknown option 'splt'" in problems["data.sources.speech.manifest"]
    assert "'streaming' must be true or false" in problems["data.val.dev"]
    assert "unknown source format 'tasux'" in problems["measures.sets.m"]
    for fine in ("data.sources.simulated.manifest", "data.test.clean", "measures.multiple_choice.mc"):
        assert fine not in problems
    assert dict(source_problems(stage_cfg(data={"train": "hf:ds?name=x"}, selection={"pool": "hff:p"}))) == {
        "selection.pool": "'hff:p': unknown source format 'hff' (have: jsonl, hf, lhotse, lhotse-shar, tasu; "
                          "a plain path is our JSONL manifest)"}


def test_a_format_whose_package_is_missing_names_its_extra():
    register_source_format("toyfmt", SourceFormat(imported("speechllm.sources.jsonl:JSONLSource"),
                                                  requires=("speechllm_no_such_package",), extra="toy"))
    try:
        problems = source_problems(stage_cfg(data={"train": "toyfmt:x.jsonl"}))
        assert problems == [("data.train", "toyfmt: sources need the `speechllm_no_such_package` package "
                                           "(the `toy` extra: pip install -e '.[toy]')")]
        with pytest.raises(SourceError, match=r"pip install -e '\.\[toy\]'"):
            open_source("toyfmt:x.jsonl")
    finally:
        SOURCE_FORMATS.pop("toyfmt")
    assert SOURCE_FORMATS["hf"].extra == "hf" and SOURCE_FORMATS["lhotse"].extra == "lhotse"


# ---------------------------------------------------------------------------------------------- items


@pytest.mark.parametrize("name,streaming", [("hf_map", False), ("hf_stream", True), ("hf_saved_stream", True),
                                            ("lhotse", False), ("lhotse_shar", True)])
def test_each_format_gives_the_clips_texts_words_and_resampled_mono_audio(corpus, name, streaming):
    root, sources = corpus
    rows = {r["id"]: r for r in source_rows(root)}
    source = open_source(sources[name])
    assert source.streaming is streaming
    items = source.items(require_audio=True)
    assert [u.id for u in items] == sorted(rows)  # source order
    for utt in items:
        row = rows[utt.id]
        assert (utt.text, utt.speaker) == (row["text"], row["speaker"])
        assert [w["w"] for w in utt.words] == [w["w"] for w in row["words"]]
        assert np.allclose([w["start"] for w in utt.words], [w["start"] for w in row["words"]], atol=1e-4)
        wave = load_audio(utt.audio, 16000)  # 22.05 kHz stereo flac -> 16 kHz mono
        # a MonoCut reads its one channel (0); datasets' rows hold the whole file, averaged to mono
        expected = expected_waveform(str(root / "audio" / f"{utt.id}.flac"), channel=0 if "lhotse" in name else None)
        # a cut's length comes from its duration in seconds: one sample either way, and the resampling
        # filter's last few samples see the cut's end, not the file's
        n = min(len(wave), len(expected)) - (16 if "lhotse" in name else 0)
        assert wave.dtype == torch.float32 and abs(len(wave) - len(expected)) <= (1 if "lhotse" in name else 0)
        assert torch.allclose(wave[:n], expected[:n], atol=2e-4), (utt.id, (wave[:n] - expected[:n]).abs().max())
    assert [u.id for u in source.items(require_audio=True, limit=3)] == [u.id for u in items[:3]]


@pytest.mark.parametrize("name", ["hf_map", "hf_saved_stream"])
def test_text_from_a_speech_dataset_reads_no_audio(corpus, name):
    _, sources = corpus
    # datasets would decode the Audio column (with torchcodec, not installed) if it were left in
    items = open_source(sources[name]).items(require_audio=False)
    assert [u.audio for u in items] == [None] * 10 and items[0].text and "audio" not in items[0].meta


def test_lhotse_word_times_are_made_relative_to_the_cut(tmp_path):
    rows = clips(tmp_path, 2, seed=5, rate=16000, channels=1)
    path = tmp_path / "cuts.jsonl.gz"
    cutset(rows, offset=0.1).to_file(path)
    utt = open_source(f"lhotse:{path}").items(True)[0]
    assert utt.task == "ASR" and utt.duration == pytest.approx(rows[0]["seconds"] - 0.1, abs=1e-4)
    assert [w["start"] for w in utt.words] == pytest.approx([w["start"] for w in rows[0]["words"]], abs=1e-4)
    full, _ = sf.read(rows[0]["path"], dtype="float32")
    assert torch.allclose(load_audio(utt.audio, 16000), torch.from_numpy(full[1600:1600 + len(load_audio(utt.audio, 16000))]),
                          atol=1e-4)  # the cut's audio starts 0.1 s in


def test_tasu_jsonl_reads_kaldi_ark_and_relative_paths(corpus):
    root, sources = corpus
    rows = {r["id"]: r for r in source_rows(root)}
    items = open_source(sources["tasu"]).items(require_audio=True)
    assert sorted(u.id for u in items) == sorted(rows)
    for utt in items:
        assert utt.text == utt.target == rows[utt.id]["text"]
        data, rate = sf.read(str(root / "audio" / f"{utt.id}.flac"), dtype="float32", always_2d=True)
        if utt.task == "ASR":  # int16 channel 0 in a Kaldi ark, scaled as TASU's loader does
            assert ".ark:" in str(utt.audio)
            pcm = sf.read(str(root / "audio" / f"{utt.id}.flac"), dtype="int16")[0][:, 0] / 32768.0
            expected = resample(torch.from_numpy(pcm.astype(np.float32)), rate, 16000)
        else:
            assert utt.task == "QA" and utt.meta == {"GT": utt.text} and isinstance(utt.audio, FileAudio)
            expected = resample(torch.from_numpy(data.mean(axis=1)), rate, 16000)
        assert torch.allclose(load_audio(utt.audio, 16000), expected, atol=1e-5)
    text_only = open_source(sources["tasu"]).items(require_audio=False)
    assert [u.text for u in text_only] == [u.text for u in items]


def test_load_manifest_takes_a_source_string_and_a_path_keeps_its_rate_rule(corpus):
    root, sources = corpus
    assert [u.id for u in load_manifest(sources["hf_map"], require_audio=True)][:2] == ["u000", "u001"]
    wav = root / "audio" / "u000.flac"  # 22.05 kHz: our manifests must hold clips at the encoder's rate
    with pytest.raises(ManifestError, match="sample rate 22050 Hz, expected 16000 Hz"):
        load_audio(wav, 16000)
    assert torch.allclose(load_audio(FileAudio(wav), 16000), expected_waveform(str(wav)), atol=1e-6)


def test_hf_audio_given_as_paths_resolves_them_against_the_data_file(tmp_path):
    rows = clips(tmp_path, 3, seed=3)
    data = tmp_path / "meta.jsonl"
    data.write_text("".join(json.dumps({"audio": f"audio/{r['id']}.flac", "text": r["text"]}) + "\n" for r in rows))
    for streaming in ("false", "true"):
        items = open_source(f"hf:json?data_files={data}&streaming={streaming}").items(True)
        assert [u.id for u in items] == ["0", "1", "2"]  # no id column: the row index
        assert torch.allclose(load_audio(items[2].audio, 16000), expected_waveform(rows[2]["path"]), atol=2e-4)


# ---------------------------------------------------------------------------------------------- streams


@pytest.mark.parametrize("name", ["hf_saved_stream", "lhotse_shar"])
def test_streams_shard_by_rank_and_shuffle_by_epoch(corpus, name):
    _, sources = corpus
    spec = sources[name] + ("&" if "?" in sources[name] else "?") + "shuffle_buffer=4"

    def ids(rank=0, world=1, epoch=0, shuffle=True):
        return [u.id for u in open_source(spec).rows(True, rank=rank, world_size=world, epoch=epoch, seed=7, shuffle=shuffle)]

    ordered = ids(shuffle=False)
    assert ordered == sorted(ordered) and len(ordered) == 10
    epoch0, epoch1 = ids(epoch=0), ids(epoch=1)
    assert sorted(epoch0) == sorted(epoch1) == ordered and epoch0 != ordered and epoch0 != epoch1
    assert ids(epoch=1) == epoch1  # a fresh source, the same (seed, epoch): the same order
    shards = [ids(rank, 2, epoch=3) for rank in range(2)]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == ordered


def hf_table(rows: list[dict]) -> dict[str, list]:
    """The columns of ``hf_dataset(rows)`` as plain lists, audio as {bytes, path}, to edit and cast back
    (datasets' own Audio encoder needs torchcodec; a cast from bytes does not)."""
    return {"audio": [{"bytes": Path(r["path"]).read_bytes(), "path": Path(r["path"]).name} for r in rows],
            "sentence": [r["text"] for r in rows], "utt": [r["id"] for r in rows], "spk": [r["speaker"] for r in rows],
            "words": [r["words"] for r in rows]}


def garbage_stream(tmp_path: Path) -> str:
    """A stream of 8 clips (a saved dataset, streamed) where row 2 has an empty transcript and row 5
    undecodable audio."""
    from datasets import Audio, Dataset

    table = hf_table(clips(tmp_path, 8, seed=4))
    table["sentence"][2] = ""
    table["audio"][5] = {"bytes": b"not audio at all" * 64, "path": "broken.flac"}
    Dataset.from_dict(table).cast_column("audio", Audio()).save_to_disk(str(tmp_path / "bad"))
    return f"hf:{tmp_path / 'bad'}?streaming=true&text=sentence&id=utt"


def test_a_stream_reader_gives_each_position_the_same_item_whatever_was_read_before(tmp_path):
    spec = garbage_stream(tmp_path) + "&shuffle_buffer=3"

    def reader(counts):
        return StreamReader(open_source(spec), require_audio=True, seed=3,
                            keep=lambda u: check_clip(u, 16000, 30.0), count=lambda reason, message: counts.update([reason]))

    counts_seq, counts_jump = Counter(), Counter()
    sequential = reader(counts_seq)
    ids = [sequential[p].id for p in range(20)]  # 6 usable items an epoch: several epochs
    usable = sorted(f"u{i:03d}" for i in (0, 1, 3, 4, 6, 7))
    assert all(sorted(ids[e * 6:(e + 1) * 6]) == usable for e in range(3))
    assert ids[:6] != ids[6:12] != ids[12:18]  # every epoch shuffled anew
    jumping = reader(counts_jump)
    assert [jumping[p].id for p in (19, 4, 13, 0, 18)] == [ids[p] for p in (19, 4, 13, 0, 18)]
    assert sequential[2].id == ids[2] and sequential[19].id == ids[19]  # going back, then forward again
    # each bad row counted once, however the reader got there
    assert counts_seq == counts_jump == Counter({"bad_row": 1, "unreadable_audio": 1})


def test_bad_rows_of_a_stream_are_an_error_for_an_evaluation_set(tmp_path):
    with pytest.raises(SourceError, match=r"/bad\?streaming=true.* row 2: column 'sentence' must be a non-empty string"):
        open_source(garbage_stream(tmp_path)).items(require_audio=True)


# ---------------------------------------------------------------------------------------------- bad rows


def test_hf_bad_rows_name_the_dataset_row_and_column(tmp_path, corpus):
    root, _ = corpus
    with pytest.raises(SourceError, match=r"split 'dev' not in the saved DatasetDict \(have: train, test\)"):
        open_source(f"hf:{root / 'hf_saved'}?split=dev&text=sentence").items(True)
    rows = clips(tmp_path, 4, seed=6)
    ds = hf_dataset(rows)
    ds.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(SourceError, match=r"hf:.*/ds: row 0: column 'text' is missing \(columns: audio, sentence, "
                                          r"utt, spk, words\); name the text column with text=<column>"):
        open_source(f"hf:{tmp_path / 'ds'}").items(True)
    with pytest.raises(SourceError, match=r"no column speaker=client_id \(columns: audio, sentence"):
        open_source(f"hf:{tmp_path / 'ds'}?text=sentence&speaker=client_id").items(True)
    from datasets import Audio, Dataset

    table = hf_table(rows)
    table["sentence"][2] = None
    Dataset.from_dict(table).cast_column("audio", Audio()).save_to_disk(str(tmp_path / "ds2"))
    with pytest.raises(SourceError, match=r"/ds2\?text=sentence row 2: column 'sentence' must be a non-empty string"):
        open_source(f"hf:{tmp_path / 'ds2'}?text=sentence").items(True)


def test_hf_unreadable_and_too_long_audio_are_counted_skips(tmp_path):
    from datasets import Audio, Dataset

    rows = clips(tmp_path, 3, seed=7)
    long = tmp_path / "long.flac"
    sf.write(long, np.zeros(22050 * 3, np.float32), 22050)
    audio = [{"bytes": Path(p).read_bytes(), "path": None} for p in [r["path"] for r in rows] + [long]]
    audio.append({"bytes": b"garbage" * 100, "path": "g.flac"})
    Dataset.from_dict({"audio": audio, "text": ["a b"] * 5}).cast_column("audio", Audio()).save_to_disk(str(tmp_path / "ds"))
    items = open_source(f"hf:{tmp_path / 'ds'}").items(True)
    kept, skipped = check_audio(items, 16000, max_seconds=2.0)
    assert [u.id for u in kept] == ["0", "1", "2"] and skipped == {"too_long": 1, "unreadable_audio": 1}
    assert kept[0].duration == pytest.approx(rows[0]["seconds"], abs=1e-4)  # at the clip's own rate


def test_lhotse_bad_cuts(tmp_path):
    rows = clips(tmp_path, 3, seed=8)
    cuts = cutset(rows)
    cuts.to_file(tmp_path / "ok.jsonl.gz")
    Path(rows[1]["path"]).unlink()
    kept, skipped = check_audio(open_source(f"lhotse:{tmp_path / 'ok.jsonl.gz'}").items(True), 16000, 30.0)
    assert [u.id for u in kept] == ["u000", "u002"] and skipped == {"missing_audio": 1}
    from lhotse import CutSet
    from lhotse.utils import fastcopy

    broken = [fastcopy(c, supervisions=[fastcopy(c.supervisions[0], text="  ")]) if c.id == "u002" else c for c in cuts]
    CutSet.from_cuts(broken).to_file(tmp_path / "bad.jsonl.gz")
    with pytest.raises(SourceError, match=r"bad\.jsonl\.gz cut 2: cut 'u002' has no supervision with text"):
        open_source(f"lhotse:{tmp_path / 'bad.jsonl.gz'}").items(True)
    with pytest.raises(SourceError, match="CutSet manifest not found"):
        open_source(f"lhotse:{tmp_path / 'none.jsonl.gz'}").items(True)


def test_tasu_bad_lines(tmp_path):
    good = {"key": "a", "task": "ASR", "target": "hello", "path": "gone.wav"}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"key": "b", "task": "ASR", "path": "x.wav"}) + "\n")
    with pytest.raises(SourceError, match=r"t\.jsonl:2: field 'target' must be a non-empty string"):
        open_source(f"tasu:{path}").items(True)
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(SourceError, match=r"t\.jsonl:2: not valid JSON"):
        open_source(f"tasu:{path}").items(True)
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "path": None, "key": "c"}) + "\n")
    with pytest.raises(SourceError, match=r"t\.jsonl:2: field 'path' is missing \(speech needs it\)"):
        open_source(f"tasu:{path}").items(True)
    assert [u.id for u in open_source(f"tasu:{path}").items(False)] == ["a", "c"]  # text only: no audio needed
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(SourceError, match="id 'a' repeats"):
        open_source(f"tasu:{path}").items(True)
    path.write_text(json.dumps(good) + "\n")
    assert check_audio(open_source(f"tasu:{path}").items(True), 16000, 30.0)[1] == {"missing_audio": 1}


# ---------------------------------------------------------------------------------------------- the data module


def datamodule(sources: dict, **data) -> SpeechTextDataModule:
    cfg = OmegaConf.merge(OmegaConf.structured(StageConfig),
                          {"kind": "asr", "seed": 3, "data": {"batch_size": 2, "sources": sources, **data}})
    return SpeechTextDataModule(cfg, "speech")


def test_the_data_module_streams_a_source_counting_its_skips_and_resumes_at_a_batch(corpus, tmp_path):
    _, sources = corpus
    stream = garbage_stream(tmp_path) + "&shuffle_buffer=3"
    srcs = {"speech": {"manifest": stream}, "simulated": {"manifest": sources["hf_text_stream"], "kind": "simulated"},
            "map": {"manifest": sources["hf_map"]}}
    dm = datamodule(srcs)
    dm.check_sources()
    assert not dm.skipped  # the probe counts nothing: the training reader does
    batches = [b for b, _ in zip(dm.train_dataloader(), range(24))]
    kinds = Counter(b["source"] for b in batches)
    assert set(kinds) == {"speech", "simulated", "map"}
    for b in batches:
        assert len(b["id"]) == 2
        if b["source"] == "speech":
            assert all(w.dim() == 1 and 0.4 * 16000 < len(w) < 1.2 * 16000 for w in b["waveform"])
            assert "u005" not in b["id"] and "u002" not in b["id"]
    assert dm.skipped == {"train/speech/bad_row": 1, "train/speech/unreadable_audio": 1}
    later = datamodule(srcs)
    later.load_state_dict({"global_batches": 9})
    resumed = [b for b, _ in zip(later.train_dataloader(), range(15))]
    assert [b["id"] for b in resumed] == [b["id"] for b in batches[9:]]
    assert [b["text"] for b in resumed] == [b["text"] for b in batches[9:]]
    assert all(torch.equal(x, y) for a, b in zip(resumed, batches[9:]) if a["kind"] == "speech"
               for x, y in zip(a["waveform"], b["waveform"]))


def test_evaluation_sets_from_sources(corpus):
    _, sources = corpus
    dm = datamodule({"speech": {"manifest": sources["hf_map"]}}, val={"clean": sources["hf_test"], "shar": sources["lhotse_shar"]},
                    val_max_samples=3)
    dm.setup("fit")
    assert [len(s) for s in dm.val_sets] == [3, 3]
    item = dm.val_sets[1][0]
    assert item["id"] == "u000" and item["waveform"].dim() == 1 and item["words"]
