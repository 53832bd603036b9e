"""``python -m stages prepare real-speech``: one real speaker from Debian's Asterisk prompts -> manifests.

Debian ships the English voice prompts of the Asterisk PBX, recorded by one professional speaker
(Allison Smith, CC-BY-SA-3.0), as two architecture-independent packages of ``main``:

    asterisk-core-sounds-en-g722   usr/share/asterisk/sounds/en_US_f_Allison/[<folder>/]<name>.g722
                                   (G.722 at 64 kbit/s: 16 kHz audio)
    asterisk-core-sounds-en        usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz
                                   (one ``<folder>/<name>: <transcript>`` a line; ``;`` starts a comment)

Both .deb files are looked for in ``--debs`` (default ``.cache/debs``) and fetched there with
``apt-get download`` when missing; they are read here without dpkg (a .deb is an ``ar`` archive whose
``data.tar.*`` holds the files). Every prompt with a transcript is decoded (the ``G722`` module of the
PyPI package ``g722``), its leading and trailing silence trimmed, and written as 16 kHz 16-bit mono
WAV (as the demo's other speech) under ``<out>/wav/``; its transcript is written the way the speech
is read: numerals and symbols spelled out as words, annotations (``[beep tone]``, ``<beep>``,
``(note: ...)``) dropped, lower case with only ``. , ! ? '`` kept. Prompts go to train/dev/test by a
hash of their normalised transcript (80/10/10), so the same sentence recorded twice lands in one split.

Skipped, counted by reason in ``summary.json``: non-speech (tones, beeps, sounds), silence, a
transcript with no words, audio missing or undecodable, a clip shorter than ``MIN_SECONDS`` after
trimming, and audio without a transcript line.

Writes ``<out>/{train,dev,test}.jsonl`` (``id``, ``audio``, ``duration``, ``text``, ``speaker`` =
``asterisk-en``, ``source``, ``prompt``) and ``<out>/summary.json`` (counts, hours, skips, the
packages' versions, checksums and licence). A second run with the same packages and settings finds
the summary's fingerprint unchanged and does nothing.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import logging
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from speechllm.io import atomic_open, atomic_write
from speechllm.tts import normalize_text
from stages.corpus_io import write_if_changed
from stages.prepare_demo_data import text_key

log = logging.getLogger(__name__)

AUDIO_PACKAGE = "asterisk-core-sounds-en-g722"
TEXT_PACKAGE = "asterisk-core-sounds-en"
PACKAGES = (AUDIO_PACKAGE, TEXT_PACKAGE)
KNOWN_VERSION = "1.6.1-1"  # Debian bookworm
G722_PIP = "g722==1.2.8"
SOUNDS_DIR = "usr/share/asterisk/sounds/en_US_f_Allison/"
TRANSCRIPT_NAMES = ("core-sounds-en.txt.gz", "core-sounds-en.txt")
SPEAKER = "asterisk-en"
SAMPLE_RATE = 16000
SPLITS = ("train", "dev", "test")
DEV_FRACTION = TEST_FRACTION = 0.10
MIN_SECONDS = 0.3
MAX_SECONDS = 30.0  # Whisper's window: longer prompts (two, of 31 and 72 s) would not fit any stage
# Trimming: 20 ms frames every 10 ms; speech is a frame within TRIM_BELOW_PEAK_DB of the loudest and
# above TRIM_FLOOR_DB (dBFS); a clip whose loudest frame is under SILENCE_DB is silence. PAD_SECONDS of
# the original audio is kept on each side of the speech (its onsets and releases).
TRIM_BELOW_PEAK_DB = 40.0
TRIM_FLOOR_DB = -60.0
SILENCE_DB = -50.0
PAD_SECONDS = 0.05
# Anything that changes the output: part of the fingerprint that makes a second run a no-op.
SETTINGS = {
    "format": 1, "sample_rate": SAMPLE_RATE, "min_seconds": MIN_SECONDS, "max_seconds": MAX_SECONDS,
    "pad_seconds": PAD_SECONDS,
    "trim_below_peak_db": TRIM_BELOW_PEAK_DB, "trim_floor_db": TRIM_FLOOR_DB, "silence_db": SILENCE_DB,
    "dev_fraction": DEV_FRACTION, "test_fraction": TEST_FRACTION,
}
SKIP_REASONS = ("non_speech", "silence", "no_words", "missing_audio", "undecodable", "too_short", "too_long",
                "no_transcript")


class RealSpeechError(RuntimeError):
    """What the step needs and cannot have (a package, a decoder): the message says how to get it."""


# ---------------------------------------------------------------------------------------------------
# Debian packages, read without dpkg
# ---------------------------------------------------------------------------------------------------


def read_ar(path: Path) -> dict[str, bytes]:
    """The members of an ``ar`` archive (a .deb: ``debian-binary``, ``control.tar.*``, ``data.tar.*``)."""
    data = path.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise RealSpeechError(f"{path}: not a Debian package (no ar archive header)")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        if header[58:60] != b"`\n":
            raise RealSpeechError(f"{path}: damaged ar member header at byte {pos}")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        pos += 60
        members[name] = data[pos:pos + size]
        pos += size + (size & 1)  # members start at even offsets
    return members


def _open_tar(name: str, blob: bytes) -> tarfile.TarFile:
    if name.endswith(".zst"):
        raise RealSpeechError(f"{name}: zstd-compressed package members need dpkg-deb; "
                              "extract it with `dpkg-deb -x` or use a package built with xz")
    if name.endswith(".xz"):
        blob = lzma.decompress(blob)
    elif name.endswith(".gz"):
        blob = gzip.decompress(blob)
    return tarfile.open(fileobj=io.BytesIO(blob), mode="r:*")


@dataclass
class Deb:
    path: Path
    control: dict[str, str]
    files: dict[str, bytes]  # path inside the package without "./" -> content (regular files only)
    sha256: str

    @property
    def package(self) -> str:
        return self.control.get("Package", "")

    @property
    def version(self) -> str:
        return self.control.get("Version", "")


def read_deb(path: Path, wanted=lambda name: True) -> Deb:
    """A .deb's control fields and the regular files of its data archive for which ``wanted(name)``."""
    members = read_ar(path)
    control_name = next((n for n in members if n.startswith("control.tar")), None)
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if control_name is None or data_name is None:
        raise RealSpeechError(f"{path}: a Debian package needs control.tar.* and data.tar.* (found {sorted(members)})")
    control: dict[str, str] = {}
    with _open_tar(control_name, members[control_name]) as tar:
        for member in tar:
            if member.isfile() and member.name.lstrip("./") == "control":
                for line in tar.extractfile(member).read().decode("utf-8", "replace").splitlines():
                    key, sep, value = line.partition(":")
                    if sep and not line[:1].isspace():
                        control[key.strip()] = value.strip()
    files = {}
    with _open_tar(data_name, members[data_name]) as tar:
        for member in tar:
            name = member.name[2:] if member.name.startswith("./") else member.name
            if member.isfile() and wanted(name):
                files[name] = tar.extractfile(member).read()
    return Deb(path, control, files, hashlib.sha256(path.read_bytes()).hexdigest())


def _fetch_hint(debs: Path) -> str:
    return (f"fetch the Debian packages {AUDIO_PACKAGE} and {TEXT_PACKAGE} (version {KNOWN_VERSION} in "
            f"Debian bookworm main, architecture all) into {debs}: on a Debian machine with its package lists "
            f"(`apt-get update`), run `cd {debs} && apt-get download {AUDIO_PACKAGE} {TEXT_PACKAGE}`, "
            "or copy the two .deb files there (or point --debs at them)")


def find_debs(debs: Path) -> dict[str, Path]:
    """The .deb file of each package found in ``debs`` (``<package>_<version>_<arch>.deb``)."""
    found = {}
    for package in PACKAGES:
        paths = sorted(debs.glob(f"{package}_*.deb"))
        if len(paths) > 1:
            raise RealSpeechError(f"{debs}: several versions of {package}: "
                                  f"{', '.join(p.name for p in paths)}; keep one")
        if paths:
            found[package] = paths[0]
    return found


def fetch_debs(debs: Path) -> dict[str, Path]:
    """The two packages' .deb files in ``debs``, downloaded with ``apt-get download`` when missing."""
    found = find_debs(debs)
    missing = [p for p in PACKAGES if p not in found]
    if not missing:
        return found
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        raise RealSpeechError(f"{', '.join(missing)} not found in {debs} and apt-get is not available: "
                              + _fetch_hint(debs))
    debs.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s into %s with apt-get download", " ".join(missing), debs)
    try:
        done = subprocess.run([apt_get, "download", *missing], cwd=debs, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RealSpeechError(f"`apt-get download {' '.join(missing)}` failed ({err}): " + _fetch_hint(debs)) from None
    found = find_debs(debs)
    still = [p for p in PACKAGES if p not in found]
    if done.returncode != 0 or still:
        said = " ".join((done.stderr or done.stdout or "").strip().splitlines()[-3:])
        raise RealSpeechError(f"`apt-get download {' '.join(missing)}` failed (exit {done.returncode}"
                              + (f": {said}" if said else "") + "): " + _fetch_hint(debs))
    return found


def licence_of(copyright_text: str) -> dict[str, str]:
    """The ``Files: *`` paragraph of a machine-readable debian/copyright: its licence and copyright."""
    for paragraph in re.split(r"\n\s*\n", copyright_text):
        fields: dict[str, str] = {}
        for line in paragraph.splitlines():
            if line[:1].isspace():
                continue
            key, sep, value = line.partition(":")
            if sep and key not in fields:
                fields[key.strip()] = value.strip()
        if fields.get("Files") == "*":
            return {"license": fields.get("License", ""), "copyright": fields.get("Copyright", "")}
    return {"license": "unknown (no 'Files: *' paragraph)", "copyright": ""}


# ---------------------------------------------------------------------------------------------------
# Transcripts
# ---------------------------------------------------------------------------------------------------


def read_transcripts(text: str) -> dict[str, str]:
    """``{prompt name: transcript}`` of core-sounds-en.txt (``name: transcript`` lines, ``;`` comments)."""
    out = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(";"):
            continue
        name, sep, transcript = line.partition(":")
        if sep and name.strip() and " " not in name.strip():
            out.setdefault(name.strip(), transcript.strip())
    return out


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**9, "billion"), (10**6, "million"), (1000, "thousand"), (100, "hundred"))


def number_words(n: int) -> str:
    """A cardinal in words: 28 -> "twenty eight", 1200 -> "one thousand two hundred"."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    for value, name in _SCALES:
        if n >= value:
            head, rest = divmod(n, value)
            return f"{number_words(head)} {name}" + ("" if rest == 0 else " " + number_words(rest))
    raise AssertionError(n)


def numeral_words(digits: str) -> str:
    """How an IVR prompt reads a numeral: up to three digits as a number ("500" -> "five hundred"),
    longer ones (extensions, PINs: "1234") digit by digit, a leading zero digit by digit."""
    if len(digits) > 3 or (len(digits) > 1 and digits.startswith("0")):
        return " ".join(_ONES[int(d)] for d in digits)
    return number_words(int(digits))


_ANNOTATION = re.compile(r"\[[^\]]*\]|<[^>]*>|\([^)]*\)")
_NON_SPEECH = re.compile(r"^\s*(?:\[[^\]]*\]|<[^>]*>)\s*$")
_SILENCE = re.compile(r"^\s*\(?[^()]*\bsilence\b[^()]*\)?\s*$", re.IGNORECASE)
_SYMBOLS = {"*": "star", "#": "pound", "&": "and", "%": "percent", "@": "at", "+": "plus", "=": "equals",
            "$": "dollar"}
# misspellings in core-sounds-en.txt, written as spoken
_TYPOS = {"exclaimation": "exclamation", "fourtieth": "fortieth", "umute": "unmute", "thru": "through"}
_DECIMAL = re.compile(r"(\d+)\.(\d+)")
_NUMERAL = re.compile(r"\d+")


def classify_transcript(raw: str) -> str | None:
    """The skip reason a transcript alone gives (``non_speech``, ``silence``), or None for speech."""
    if _NON_SPEECH.match(raw):
        return "non_speech"
    if _SILENCE.match(raw) and "(" in raw:
        return "silence"
    return None


def normalise_transcript(raw: str) -> str:
    """The transcript as it is spoken, lower case: numerals and symbols in words, annotations and
    ellipses dropped, hyphens as spaces, only ``. , ! ? '`` kept as punctuation ("" if no words)."""
    text = _ANNOTATION.sub(" ", raw)
    text = re.sub(r"(?<=[A-Za-z])\.(\d+)", lambda m: " " + " ".join(m[1]), text)  # "H.323": "h three two three"
    text = re.sub(r"(?<=\d)(?=[A-Za-z])|(?<=[A-Za-z])(?=\d)", " ", text)  # "3D" -> "3 D"
    text = _DECIMAL.sub(lambda m: f"{numeral_words(m[1])} point {' '.join(_ONES[int(d)] for d in m[2])}", text)
    text = _NUMERAL.sub(lambda m: f" {numeral_words(m[0])} ", text)
    text = "".join(f" {_SYMBOLS[c]} " if c in _SYMBOLS else c for c in text)
    text = re.sub(r"\.{2,}|\u2026", " ", text)
    text = re.sub(r"[;:]", ",", text)
    text = re.sub(r"(?<=\w)-(?=\w)|[-_/]", " ", text)
    text = re.sub(r"[^A-Za-z0-9.,!?' ]", " ", text).lower()
    text = re.sub(r"\s+([.,!?])", r"\1", normalize_text(text))  # no space before punctuation
    text = re.sub(r"([.,!?])[.,!?]+", r"\1", text)
    text = re.sub(r"^[\s.,!?']+", "", text).strip()
    text = re.sub(r"[a-z]+", lambda m: _TYPOS.get(m[0], m[0]), text)
    return text if re.search(r"[a-z]", text) else ""


# ---------------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------------


def g722_module():
    """The ``G722`` extension of the PyPI package ``g722``; a clear error naming the package if absent."""
    try:
        import G722
    except ImportError:
        raise RealSpeechError(f"decoding the Asterisk prompts needs the G.722 codec of the PyPI package g722: "
                              f"`pip install {G722_PIP}` (or `make setup`, which installs the project's "
                              "dependencies)") from None
    return G722


def decode_g722(data: bytes, codec=None) -> np.ndarray:
    """G.722 at 64 kbit/s -> 16 kHz mono float32 in [-1, 1] (a new decoder each call: it has state)."""
    codec = codec or g722_module()
    pcm = np.asarray(codec.G722(SAMPLE_RATE, 64000).decode(data), dtype=np.int16)
    return pcm.astype(np.float32) / 32768.0


def frame_db(wav: np.ndarray, frame: int = 320, hop: int = 160) -> np.ndarray:
    """RMS level in dBFS of each ``frame``-sample window every ``hop`` samples."""
    if len(wav) < frame:
        wav = np.pad(wav, (0, frame - len(wav)))
    windows = np.lib.stride_tricks.sliding_window_view(wav, frame)[::hop]
    return 10 * np.log10(np.mean(windows.astype(np.float64) ** 2, axis=1) + 1e-12)


def trim_silence(wav: np.ndarray) -> np.ndarray | None:
    """``wav`` without its leading and trailing silence (``PAD_SECONDS`` kept), or None if all silence."""
    levels = frame_db(wav)
    peak = float(levels.max())
    if peak < SILENCE_DB:
        return None
    loud = np.flatnonzero(levels >= max(peak - TRIM_BELOW_PEAK_DB, TRIM_FLOOR_DB))
    pad = int(PAD_SECONDS * SAMPLE_RATE)
    start = max(0, loud[0] * 160 - pad)
    end = min(len(wav), loud[-1] * 160 + 320 + pad)
    return wav[start:end]


def wav_bytes(wav: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wav, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def write_wav_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and path.read_bytes() == data:
        return False
    with atomic_open(path, "wb", fsync=False) as f:
        f.write(data)
    return True


# ---------------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------------


def split_of(text: str) -> str:
    """train/dev/test from a hash of the normalised transcript (case and punctuation blind)."""
    u = int.from_bytes(hashlib.sha256(text_key(text).encode()).digest()[:8], "big") / 2**64
    return "test" if u < TEST_FRACTION else "dev" if u < TEST_FRACTION + DEV_FRACTION else "train"


def utterance_id(prompt: str) -> str:
    return "asterisk-en-" + prompt.replace("/", "-")


def fingerprint(debs: dict[str, Path]) -> dict:
    """What the output depends on: the packages' checksums, the settings and this module's code (a
    changed normaliser or trimmer makes the next run redo the work; unchanged files are not rewritten)."""
    return {"packages": {p: hashlib.sha256(debs[p].read_bytes()).hexdigest() for p in PACKAGES},
            "settings": SETTINGS, "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]}


def up_to_date(out: Path, inputs: dict) -> bool:
    """Whether ``out`` holds a finished run on exactly these inputs (summary, manifests and every clip)."""
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if summary.get("inputs") != inputs:
        return False
    for split in SPLITS:
        manifest = out / f"{split}.jsonl"
        if not manifest.is_file():
            return False
        for line in manifest.read_text(encoding="utf-8").splitlines():
            if line.strip() and not (out / json.loads(line)["audio"]).is_file():
                return False
    return True


def prepare_real_speech(out: str | Path, debs_dir: str | Path = ".cache/debs", progress: bool = True) -> dict:
    """Build the manifests under ``out`` (see the module docstring) and return the summary; a finished
    run on the same inputs is left as it is (the summary says ``"unchanged": true``)."""
    start = time.perf_counter()
    out, debs_dir = Path(out), Path(debs_dir)
    codec = g722_module()
    debs = fetch_debs(debs_dir)
    inputs = fingerprint(debs)
    if up_to_date(out, inputs):
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        return {**summary, "unchanged": True}

    audio_deb = read_deb(debs[AUDIO_PACKAGE], lambda n: (n.startswith(SOUNDS_DIR) and n.endswith(".g722"))
                         or n.endswith("/copyright"))
    text_deb = read_deb(debs[TEXT_PACKAGE], lambda n: n.rsplit("/", 1)[-1] in TRANSCRIPT_NAMES
                        or n.endswith("/copyright"))
    for deb, package in ((audio_deb, AUDIO_PACKAGE), (text_deb, TEXT_PACKAGE)):
        if deb.package != package:
            raise RealSpeechError(f"{deb.path}: holds package {deb.package!r}, expected {package!r}")
    transcript_file = next((n for n in sorted(text_deb.files) if n.rsplit("/", 1)[-1] in TRANSCRIPT_NAMES), None)
    if transcript_file is None:
        raise RealSpeechError(f"{text_deb.path}: no {' or '.join(TRANSCRIPT_NAMES)} in the package")
    raw = text_deb.files[transcript_file]
    transcripts = read_transcripts((gzip.decompress(raw) if transcript_file.endswith(".gz") else raw).decode("utf-8"))
    audio = {n[len(SOUNDS_DIR):-len(".g722")]: b for n, b in audio_deb.files.items() if n.endswith(".g722")}
    if not audio:
        raise RealSpeechError(f"{audio_deb.path}: no .g722 files under {SOUNDS_DIR}")
    copyright_file = next((n for n in audio_deb.files if n.endswith(f"doc/{AUDIO_PACKAGE}/copyright")), None)
    licence = licence_of(audio_deb.files[copyright_file].decode("utf-8", "replace")) if copyright_file else {
        "license": "unknown (no debian/copyright in the package)", "copyright": ""}

    skipped: dict[str, list[str]] = {reason: [] for reason in SKIP_REASONS}
    skipped["no_transcript"] = sorted(set(audio) - set(transcripts))
    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    ids: dict[str, str] = {}
    wav_dir = out / "wav"
    written = raw_seconds = 0
    source = f"debian:{AUDIO_PACKAGE}={audio_deb.version}"
    for prompt in tqdm(sorted(transcripts), desc="asterisk prompts", unit="prompt", disable=not progress):
        transcript = transcripts[prompt]
        reason = classify_transcript(transcript)
        text = normalise_transcript(transcript) if reason is None else ""
        if reason is None and not text:
            reason = "no_words"
        if reason is None and prompt not in audio:
            reason = "missing_audio"
        wav = None
        if reason is None:
            try:
                wav = decode_g722(audio[prompt], codec)
            except Exception as err:  # the extension raises its own errors on bad input
                log.warning("%s: cannot decode: %s", prompt, err)
            if wav is None or len(wav) == 0:
                reason = "undecodable"
        if reason is None:
            raw_seconds += len(wav) / SAMPLE_RATE
            wav = trim_silence(wav)
            if wav is None:
                reason = "silence"
            elif len(wav) / SAMPLE_RATE < MIN_SECONDS:
                reason = "too_short"
            elif len(wav) / SAMPLE_RATE > MAX_SECONDS:
                reason = "too_long"
        if reason is not None:
            skipped[reason].append(prompt)
            continue
        uid = utterance_id(prompt)
        if uid in ids:
            raise RealSpeechError(f"prompts {ids[uid]!r} and {prompt!r} would share the id {uid!r}")
        ids[uid] = prompt
        written += write_wav_if_changed(wav_dir / f"{uid}.wav", wav_bytes(wav))
        rows[split_of(text)].append({
            "id": uid, "audio": f"wav/{uid}.wav", "duration": round(len(wav) / SAMPLE_RATE, 4), "text": text,
            "speaker": SPEAKER, "source": source, "prompt": prompt,
        })
    stale = [p for p in wav_dir.glob("*.wav") if p.stem not in ids]
    for path in stale:
        path.unlink()
    for reason, prompts in skipped.items():
        if prompts:
            log.info("skipped %d prompt(s): %s (%s%s)", len(prompts), reason, ", ".join(prompts[:5]),
                     ", ..." if len(prompts) > 5 else "")
    for split in SPLITS:
        if not rows[split]:
            raise RealSpeechError(f"no utterance fell into the {split} split ({sum(map(len, rows.values()))} in all)")
        write_if_changed(out / f"{split}.jsonl", rows[split])

    def hours(split_rows: list[dict]) -> float:
        return round(sum(r["duration"] for r in split_rows) / 3600, 4)

    summary = {
        "inputs": inputs,
        "speaker": SPEAKER,
        "packages": {d.package: {"version": d.version, "file": d.path.name, "sha256": d.sha256}
                     for d in (audio_deb, text_deb)},
        "license": licence["license"],
        "copyright": licence["copyright"],
        "recorded_by": "Allison Smith",
        "transcripts": len(transcripts),
        "audio_files": len(audio),
        "utterances": {split: len(rows[split]) for split in SPLITS},
        "hours": {split: hours(rows[split]) for split in SPLITS},
        "total_utterances": sum(len(r) for r in rows.values()),
        "total_hours": hours([r for split_rows in rows.values() for r in split_rows]),
        "hours_before_trimming": round(raw_seconds / 3600, 4),
        "skipped": {reason: len(prompts) for reason, prompts in skipped.items()},
        "skipped_prompts": skipped,
        "wavs_written": written,
        "wavs_removed": len(stale),
        "seconds": round(time.perf_counter() - start, 2),
    }
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return {**summary, "unchanged": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder: train.jsonl, dev.jsonl, test.jsonl, summary.json, wav/")
    parser.add_argument("--debs", type=Path, default=Path(".cache/debs"),
                        help=f"folder of the {AUDIO_PACKAGE} and {TEXT_PACKAGE} .deb files, fetched there with "
                             "`apt-get download` when missing (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = prepare_real_speech(args.out, args.debs, progress=not args.no_progress)
    except RealSpeechError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if summary["unchanged"]:
        print(f"{args.out}: up to date ({summary['total_utterances']} utterances, {summary['total_hours']:.3f} h "
              "from the same packages, settings and code); nothing to do")
        return 0
    for split in SPLITS:
        print(f"{args.out / (split + '.jsonl')}: {summary['utterances'][split]} utterances, "
              f"{summary['hours'][split]:.3f} h")
    skipped = ", ".join(f"{reason} {n}" for reason, n in summary["skipped"].items() if n)
    print(f"{summary['total_utterances']} utterances, {summary['total_hours']:.3f} h of one speaker "
          f"({summary['license']}); skipped: {skipped or 'none'}; {summary['wavs_written']} wav files written "
          f"in {summary['seconds']:.1f} s")
    return 0
