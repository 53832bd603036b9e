"""``prepare real-speech`` on a fake pair of Debian packages laid out as the real ones (ar archives with
data.tar.xz; G.722 prompts made by the g722 encoder from a synthetic signal, and a transcript file in
the real format): manifests with the expected counts, a deterministic and disjoint split, trimmed
durations, skips counted by reason, a second run that does nothing; and the clear messages when the
decoder or the packages are missing. One slow test runs on the real packages when they are in
``.cache/debs``."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechllm.manifest import load_manifest
from stages import prepare_real_speech as prs
from stages.__main__ import main as cli

try:
    import G722
except ImportError:  # a project dependency: under CI=true this skip fails (conftest)
    G722 = None
needs_g722 = pytest.mark.skipif(G722 is None, reason=f"G722 not installed (pip install {prs.G722_PIP})")

RATE = 16000
REPO = Path(__file__).resolve().parents[1]
COPYRIGHT = """Format: http://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: asterisk-core-sounds

Files: *
Copyright: 2003-2010, Allison Smith
License: CC-BY-SA-3.0

Files: debian/*
Copyright: 2010, Tzafrir Cohen
License: GPL-2+
"""


def voice(seconds: float, lead: float = 0.3, tail: float = 0.4) -> np.ndarray:
    """A speech-like signal (harmonics of 150 Hz, syllable-rate envelope) between silences."""
    t = np.arange(int(seconds * RATE)) / RATE
    tone = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 6))
    signal = 0.25 * tone * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)) / 2.3
    return np.concatenate([np.zeros(int(lead * RATE)), signal, np.zeros(int(tail * RATE))])


def encode(wav: np.ndarray) -> bytes:
    pcm = np.clip(np.round(wav * 32767), -32768, 32767).astype(np.int16)
    return G722.G722(RATE, 64000).encode(pcm)


def tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return lzma.compress(buf.getvalue())


def write_deb(path: Path, package: str, files: dict[str, bytes], version: str = "1.6.1-1") -> Path:
    """A .deb as dpkg builds it: ar archive of debian-binary, control.tar.xz and data.tar.xz."""
    control = f"Package: {package}\nVersion: {version}\nArchitecture: all\nDescription: fake\n".encode()
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", tar_xz({"control": control})),
               ("data.tar.xz", tar_xz(files))]
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(bytes(out))
    return path


def texts_per_split(n: int) -> dict[str, list[str]]:
    """``n`` transcripts that the split hash sends to each split (so every split has some)."""
    chosen: dict[str, list[str]] = {s: [] for s in prs.SPLITS}
    k = 0
    while any(len(v) < n for v in chosen.values()):
        text = f"Please press {k % 10} for the {['red', 'green', 'blue', 'gold'][k % 4]} menu number {k}."
        split = prs.split_of(prs.normalise_transcript(text))
        if len(chosen[split]) < n:
            chosen[split].append(text)
        k += 1
    return chosen


SPEECH_SECONDS = 1.2  # each speech prompt's signal (between 0.3 s and 0.4 s of silence)


def build_fake_debs(folder: Path) -> dict:
    """Both packages in ``folder``; returns what the step should make of them."""
    sounds, speech = prs.SOUNDS_DIR, {}
    transcript = ["; Core Asterisk Sounds in English", ""]
    audio: dict[str, bytes] = {}
    for split, texts in texts_per_split(2).items():
        for i, text in enumerate(texts):
            name = f"{split}-prompt-{i}" if i else f"digits/{split}-{i}"  # one in a sub-folder
            transcript.append(f"{name}: {text}")
            audio[name] = encode(voice(SPEECH_SECONDS))
            speech[name] = split
    skips = {
        "beep": ("[this is a simple beep tone]", encode(0.3 * np.sin(2 * np.pi * 1000 * np.arange(6000) / RATE)),
                 "non_speech"),
        "silence/1": ("(1 second of silence)", encode(np.zeros(RATE)), "silence"),
        "vm-quiet": ("You are very quiet.", encode(np.zeros(RATE)), "silence"),
        "hi": ("Hi.", encode(voice(0.1)), "too_short"),
        "vm-long-message": ("A message longer than Whisper can hear.", encode(voice(30.5)), "too_long"),
        "dir-multi2": ("... ...", encode(voice(0.8)), "no_words"),
        "pls-try-call-later": ("Please try your call again later.", None, "missing_audio"),
        "broken": ("This one is broken.", b"", "undecodable"),
    }
    for name, (text, data, _) in skips.items():
        transcript.append(f"{name}: {text}")
        if data is not None:
            audio[name] = data
    audio["orphan"] = encode(voice(0.8))  # audio without a transcript line
    g722_files = {f"{sounds}{name}.g722": data for name, data in audio.items()}
    doc = "usr/share/doc/{}/"
    write_deb(folder / "asterisk-core-sounds-en-g722_1.6.1-1_all.deb", prs.AUDIO_PACKAGE,
              {**g722_files, doc.format(prs.AUDIO_PACKAGE) + "copyright": COPYRIGHT.encode()})
    write_deb(folder / "asterisk-core-sounds-en_1.6.1-1_all.deb", prs.TEXT_PACKAGE, {
        doc.format(prs.TEXT_PACKAGE) + "core-sounds-en.txt.gz": gzip.compress(("\n".join(transcript) + "\n").encode()),
        doc.format(prs.TEXT_PACKAGE) + "copyright": COPYRIGHT.encode()})
    reasons: dict[str, int] = {r: 0 for r in prs.SKIP_REASONS}
    for _, _, reason in skips.values():
        reasons[reason] += 1
    reasons["no_transcript"] = 1
    return {"speech": speech, "skipped": reasons}


@pytest.fixture
def fake_debs(tmp_path) -> tuple[Path, dict]:
    folder = tmp_path / "debs"
    folder.mkdir()
    return folder, build_fake_debs(folder)


def prepare(out: Path, debs: Path, *extra: str) -> int:
    return cli(["prepare", "real-speech", "--out", str(out), "--debs", str(debs), "--no-progress", *extra])


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@needs_g722
def test_fake_packages_give_manifests_splits_and_skips(fake_debs, tmp_path, capsys):
    debs, expected = fake_debs
    out = tmp_path / "real"
    assert prepare(out, debs) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == expected["skipped"]
    assert summary["skipped_prompts"]["missing_audio"] == ["pls-try-call-later"]
    assert summary["license"] == "CC-BY-SA-3.0" and summary["copyright"] == "2003-2010, Allison Smith"
    assert summary["packages"][prs.AUDIO_PACKAGE]["version"] == "1.6.1-1"

    seen: dict[str, str] = {}
    for split in prs.SPLITS:
        items = load_manifest(out / f"{split}.jsonl", require_audio=True)
        assert summary["utterances"][split] == len(items) == 2
        for utt in items:
            assert utt.id not in seen  # disjoint
            seen[utt.id] = split
            prompt = utt.meta["prompt"]
            assert expected["speech"][prompt] == split == prs.split_of(utt.text)
            assert utt.speaker == "asterisk-en" and utt.meta["source"] == "debian:asterisk-core-sounds-en-g722=1.6.1-1"
            assert utt.text == utt.text.lower() and not any(c.isdigit() for c in utt.text)
            assert utt.text.startswith("please press ") and " for the " in utt.text
            wav, rate = sf.read(utt.audio, dtype="float32")
            assert rate == RATE and wav.ndim == 1 and sf.info(str(utt.audio)).subtype == "PCM_16"
            assert utt.duration == pytest.approx(len(wav) / RATE, abs=1e-4)
            # 0.7 s of silence trimmed; the padding (2 x 50 ms) and one frame are kept
            assert SPEECH_SECONDS + 0.05 <= utt.duration <= SPEECH_SECONDS + 0.16
    assert set(seen.values()) == set(prs.SPLITS) and len(seen) == len(expected["speech"])
    assert summary["total_utterances"] == len(seen)
    assert summary["total_hours"] == pytest.approx(sum(
        u.duration for s in prs.SPLITS for u in load_manifest(out / f"{s}.jsonl")) / 3600, abs=1e-4)
    assert sorted(p.stem for p in (out / "wav").glob("*.wav")) == sorted(seen)
    printed = capsys.readouterr().out
    assert "6 utterances" in printed and "written" in printed

    # the same packages again: nothing is rewritten, and the step says so
    before = snapshot(out)
    assert prepare(out, debs) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert snapshot(out) == before

    # deterministic: a fresh folder gets the same manifests and clips
    again = tmp_path / "again"
    assert prepare(again, debs) == 0
    for split in prs.SPLITS:
        assert (again / f"{split}.jsonl").read_bytes() == (out / f"{split}.jsonl").read_bytes()
    for wav in (out / "wav").glob("*.wav"):
        assert (again / "wav" / wav.name).read_bytes() == wav.read_bytes()


@needs_g722
def test_a_lost_clip_is_written_again(fake_debs, tmp_path, capsys):
    debs, _ = fake_debs
    out = tmp_path / "real"
    assert prepare(out, debs) == 0
    lost = sorted((out / "wav").glob("*.wav"))[0]
    data = lost.read_bytes()
    lost.unlink()
    assert prepare(out, debs) == 0
    assert "nothing to do" not in capsys.readouterr().out
    assert lost.read_bytes() == data


def test_transcripts_are_written_as_spoken():
    norm = prs.normalise_transcript
    assert norm("Press 1 for #, or * to exit.") == "press one for pound, or star to exit."
    assert norm("...to lock, or unlock the conference.") == "to lock, or unlock the conference."
    assert norm("3D audio enabled") == "three d audio enabled"
    assert norm("H.323") == "h three two three"
    assert norm("dial 500, at least a 28.8 kilobit modem, extension 1234") == (
        "dial five hundred, at least a twenty eight point eight kilobit modem, extension one two three four")
    assert norm("IAX (note: does not say \"2\")") == "iax"
    assert norm("letters/at: at [@]".partition(": ")[2]) == "at"
    assert norm("Call-Forward on No Answer.") == "call forward on no answer."
    assert norm("You have these options: Dial 1") == "you have these options, dial one"
    assert norm("exclaimation-point [!]") == "exclamation point"
    assert norm("... ...") == "" and norm("[this is a simple beep tone]") == ""
    assert prs.classify_transcript("[ascending tones]") == "non_speech"
    assert prs.classify_transcript("<beep ascending>") == "non_speech"
    assert prs.classify_transcript("(10 seconds of silence)") == "silence"
    assert prs.classify_transcript("Please leave your message after the tone. (simple tone sound plays)") is None
    assert [prs.number_words(n) for n in (0, 13, 40, 99, 101, 1200, 2_000_005)] == [
        "zero", "thirteen", "forty", "ninety nine", "one hundred one", "one thousand two hundred",
        "two million five"]


def test_transcript_file_format():
    text = "; Core Asterisk Sounds in English\n\nactivated: Activated.\ndigits/1: one\nvm-leavemsg:  Press 5\n"
    assert prs.read_transcripts(text) == {"activated": "Activated.", "digits/1": "one", "vm-leavemsg": "Press 5"}


def test_missing_g722_names_the_package(fake_debs, tmp_path, monkeypatch, capsys):
    debs, _ = fake_debs
    monkeypatch.setitem(sys.modules, "G722", None)  # `import G722` raises ImportError
    assert prepare(tmp_path / "real", debs) == 2
    err = capsys.readouterr().err
    assert "pip install g722==1.2.8" in err and "make setup" in err
    assert not (tmp_path / "real").exists()


@needs_g722
def test_missing_debs_without_apt_get_say_what_to_fetch(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prs.shutil, "which", lambda name: None)
    assert prepare(tmp_path / "real", tmp_path / "debs") == 2
    err = capsys.readouterr().err
    assert "apt-get is not available" in err
    assert f"apt-get download {prs.AUDIO_PACKAGE} {prs.TEXT_PACKAGE}" in err and str(tmp_path / "debs") in err


def fake_apt_get(tmp_path: Path, monkeypatch, script: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text("#!/bin/sh\n" + script)
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")


@needs_g722
def test_failing_apt_get_says_what_to_fetch(tmp_path, monkeypatch, capsys):
    fake_apt_get(tmp_path, monkeypatch, "echo 'E: Unable to locate package asterisk-core-sounds-en' >&2\nexit 100\n")
    assert prepare(tmp_path / "real", tmp_path / "debs") == 2
    err = capsys.readouterr().err
    assert "exit 100" in err and "Unable to locate package" in err and "apt-get update" in err
    assert f"apt-get download {prs.AUDIO_PACKAGE} {prs.TEXT_PACKAGE}" in err


@needs_g722
def test_missing_debs_are_fetched_with_apt_get(tmp_path, monkeypatch):
    store = tmp_path / "mirror"
    store.mkdir()
    build_fake_debs(store)
    # apt-get download PKG...: each package's .deb into the current folder
    fake_apt_get(tmp_path, monkeypatch, f'[ "$1" = download ] || exit 1\nshift\n'
                 f'for p in "$@"; do cp {store}/"$p"_*.deb . || exit 100; done\n')
    debs = tmp_path / "cache" / "debs"
    assert prepare(tmp_path / "real", debs) == 0
    assert sorted(p.name for p in debs.iterdir()) == sorted(p.name for p in store.iterdir())


@pytest.mark.slow
@needs_g722
def test_real_asterisk_packages(tmp_path):
    debs = REPO / ".cache" / "debs"
    if not debs.is_dir() or set(prs.find_debs(debs)) != set(prs.PACKAGES):
        pytest.skip(f"the Asterisk .deb files are not in {debs} (`python -m stages prepare real-speech "
                    "--out data/demo/real` fetches them)")
    summary = prs.prepare_real_speech(tmp_path / "real", debs, progress=False)
    assert summary["total_utterances"] >= 500 and 0.3 < summary["total_hours"] < 0.5
    assert all(summary["utterances"][s] >= 30 for s in prs.SPLITS)
    assert summary["license"] == "CC-BY-SA-3.0"
    assert summary["skipped"]["non_speech"] >= 5 and summary["skipped"]["silence"] >= 10
    rows = {u.meta["prompt"]: u for s in prs.SPLITS for u in load_manifest(tmp_path / "real" / f"{s}.jsonl")}
    assert rows["hello-world"].text == "hello world." and 0.8 < rows["hello-world"].duration < 1.5
    assert rows["digits/7"].text == "seven"
