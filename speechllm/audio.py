"""Audio as the encoders take it: one mono float32 waveform at the encoder's rate, from a file or an array.

``transcribe`` (the API and the CLI) reads any file soundfile can read, at any rate and channel count:
``read_audio`` reads it, ``to_mono_resampled`` averages the channels and resamples in torch
(``speechllm.tts.resample``, a windowed sinc). Arrays go through the same function. Training
manifests are different on purpose: ``speechllm.manifest.load_audio`` refuses a file at another rate,
so a data set is resampled once, not on every read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import soundfile as sf
import torch

from speechllm.tts import resample

AudioInput = Union[str, Path, np.ndarray, torch.Tensor]


class AudioError(ValueError):
    """An audio input that cannot be read or is not a waveform; the message names the file."""


def check_audio_file(path: str | Path) -> None:
    """Fail with the file's name if it is missing or not audio soundfile can read (reads the header only)."""
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if not path.is_file():
        raise AudioError(f"{path}: not a file")
    try:
        info = sf.info(str(path))
    except Exception as err:  # soundfile raises its own error types (and RuntimeError on old versions)
        raise AudioError(f"{path}: not an audio file soundfile can read ({_reason(err)})") from None
    if info.frames == 0:
        raise AudioError(f"{path}: holds no audio samples")


def _reason(err: Exception) -> str:
    """libsndfile's own words ("Format not recognised."), without soundfile's "Error opening '...'" prefix."""
    return (getattr(err, "error_string", None) or str(err) or type(err).__name__).strip().rstrip(".")


def read_audio(path: str | Path) -> tuple[torch.Tensor, int]:
    """(channels, samples) float32 and the file's sample rate."""
    check_audio_file(path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:
        raise AudioError(f"{path}: cannot read audio ({_reason(err)})") from None
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(rate)


def as_float_tensor(wave: np.ndarray | torch.Tensor) -> torch.Tensor:
    """float32 tensor of the same shape; integer PCM is scaled to [-1, 1)."""
    if isinstance(wave, np.ndarray):
        if np.issubdtype(wave.dtype, np.integer):
            wave = wave.astype(np.float32) / float(np.iinfo(wave.dtype).max + 1)
        wave = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    elif isinstance(wave, torch.Tensor):
        if not wave.is_floating_point():
            wave = wave.float() / float(torch.iinfo(wave.dtype).max + 1)
        wave = wave.detach().float()
    else:
        raise AudioError(f"audio must be a file path, a numpy array or a torch tensor, not {type(wave).__name__}")
    return wave


def to_mono_resampled(wave: np.ndarray | torch.Tensor, rate: int, target: int) -> torch.Tensor:
    """A 1-D float32 waveform at ``target`` Hz: channels averaged, then resampled from ``rate``.

    A 2-D input's shorter axis is its channels, so both soundfile's (samples, channels) and torch's
    (channels, samples) layouts work.
    """
    x = as_float_tensor(wave)
    if x.dim() == 2:
        x = x.mean(dim=0 if x.shape[0] <= x.shape[1] else 1)
    if x.dim() != 1:
        raise AudioError(f"a waveform must be 1-D (samples) or 2-D (channels x samples), not shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise AudioError("a waveform holds no samples")
    if not isinstance(rate, int) or rate <= 0:
        raise AudioError(f"sample rate must be a positive integer number of Hz, not {rate!r}")
    if rate == target:
        return x.contiguous()
    return resample(x.cpu().contiguous(), rate, target).contiguous()  # the filter bank lives on the CPU


def load_waveform(path: str | Path, target: int) -> torch.Tensor:
    """A file as a mono float32 waveform at ``target`` Hz (any rate, any number of channels)."""
    wave, rate = read_audio(path)
    return to_mono_resampled(wave, rate, target)


def prepare_waveforms(audio: AudioInput | list[AudioInput], target: int, sample_rate: int | None = None
                      ) -> list[torch.Tensor]:
    """Paths and arrays (one, or a list) as mono waveforms at ``target`` Hz.

    Paths are read at their own rate; arrays are at ``sample_rate`` (default ``target``). A single
    array is one clip, whatever its channels; a batch of clips is a list.
    """
    items = audio if isinstance(audio, (list, tuple)) else [audio]
    rate = target if sample_rate is None else sample_rate
    return [load_waveform(a, target) if isinstance(a, (str, Path)) else to_mono_resampled(a, rate, target) for a in items]
