"""Manifests are validated on load: errors name the file, the line and the field."""

import json

import pytest

from speechllm.manifest import ManifestError, load_manifest, normalize_target


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write(tmp_path / "m.jsonl", [json.dumps({"id": "a", "audio": "a.wav", "text": "hi"}),
                                        json.dumps({"id": "b", "audio": "b.wav"})])
    with pytest.raises(ManifestError) as err:
        load_manifest(path, require_audio=True)
    assert f"{path}:2" in str(err.value) and "'text'" in str(err.value)


def test_missing_audio_only_matters_for_speech(tmp_path):
    path = write(tmp_path / "t.jsonl", [json.dumps({"id": "a", "text": "hello"})])
    assert load_manifest(path)[0].audio is None
    with pytest.raises(ManifestError, match=r"t.jsonl:1: field 'audio'"):
        load_manifest(path, require_audio=True)


def test_nemo_alias_relative_paths_and_extra_fields(tmp_path):
    path = write(tmp_path / "n.jsonl", [json.dumps({"id": 1, "audio_filepath": "w/x.wav", "duration": 1.5,
                                                    "text": "Hi there", "topic": "food"})])
    utt = load_manifest(path)[0]
    assert utt.audio == tmp_path / "w" / "x.wav" and utt.id == "1" and utt.meta == {"topic": "food"}


@pytest.mark.parametrize("line,field", [
    ('{"id": "a", "text": ""}', "text"),
    ('{"id": "a", "text": 5}', "text"),
    ('{"id": "a", "text": "x", "duration": -1}', "duration"),
    ('{"id": "a", "text": "x", "words": [{"w": "x"}]}', "words"),
    ('{"text": "x"}', "id"),
])
def test_bad_fields(tmp_path, line, field):
    path = write(tmp_path / "b.jsonl", [line])
    with pytest.raises(ManifestError, match=rf"b.jsonl:1: field '{field}'"):
        load_manifest(path)


def test_bad_json_and_duplicate_ids(tmp_path):
    with pytest.raises(ManifestError, match=r"j.jsonl:2: not valid JSON"):
        load_manifest(write(tmp_path / "j.jsonl", ['{"id": "a", "text": "x"}', '{"id": "b", "text": ']))
    with pytest.raises(ManifestError, match=r"d.jsonl:2: field 'id' repeats"):
        load_manifest(write(tmp_path / "d.jsonl", ['{"id": "a", "text": "x"}', '{"id": "a", "text": "y"}']))


def test_tasu_target_normalisation():
    assert normalize_target("Hello, World! 42 times -- 'OK'?", "tasu") == "hello, world! times 'ok'?"
