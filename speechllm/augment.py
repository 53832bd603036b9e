"""Waveform augmentation: speed, reverberation, noise, telephone band and gain on mono clips.

The training clips are TTS voices and the test speakers are real people, recorded in rooms, over
phones, with noise; these transforms put some of that variability in front of the frozen speech
encoder so the layers trained after it learn not to rely on studio-clean synthetic audio.

Every random number comes from the ``torch.Generator`` the caller passes in, never from the global
RNG. ``augment_seeded`` builds that generator from one integer, which callers derive per sample
(e.g. from the run seed and the sample index): a sample is then augmented the same way whatever
the worker, the batch or the point a run resumed from, so a resumed run is bit-identical to an
uninterrupted one.

Contract of ``augment``: mono float32 1-D in, float32 1-D out at the same sample rate, finite and
clamped to [-1, 1]. Every transform keeps the length except speed perturbation by ``factor``, which
gives ``round(len / factor)`` samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch

from speechllm.tts import resample

NOISE_COLOURS = ("white", "pink", "brown")
TELEPHONE_RATE = 8000
TELEPHONE_BAND_HZ = (300.0, 3400.0)
TELEPHONE_EDGE_HZ = 100.0  # width of the raised-cosine skirts of the band-pass (no hard-edge ringing)
BAND_PASS_PAD = 512  # zero-padding before the FFT mask: longer than the mask's response (~50 ms at 8 kHz)
MU_LAW_MU = 255  # G.711 mu-law: 8 bits per sample
SPEED_MAX_DENOMINATOR = 100  # the factor becomes p/q with q <= 100: small polyphase kernels, error < 1e-4
_DECAY_60_DB = math.log(1000.0)  # amplitude falls by 10**3 (60 dB) over one RT60


def _setting(default: Any = None, help: str = "", *, factory: Any = None) -> Any:
    """A field with the help text ``speechllm.config`` shows (the same shape as its ``setting``)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class AugmentConfig:
    """Which transforms fire and how strongly; ranges are ``[low, high]``, drawn uniformly per clip."""

    prob: float = _setting(0.0, "probability that a clip is augmented at all (0 = off)")
    speed_prob: float = _setting(0.5, "probability of speed perturbation (changes the length)")
    speed_range: list[float] = _setting(
        help="[min, max] speed factor (>1 = faster, shorter)", factory=lambda: [0.9, 1.1])
    reverb_prob: float = _setting(0.3, "probability of a synthetic room impulse response")
    rt60: list[float] = _setting(help="[min, max] reverberation time in seconds", factory=lambda: [0.2, 0.8])
    drr_db: list[float] = _setting(
        help="[min, max] direct-to-reverberant energy ratio in dB", factory=lambda: [0.0, 10.0])
    noise_prob: float = _setting(0.5, "probability of additive white / pink / brown noise")
    snr_db: list[float] = _setting(help="[min, max] signal-to-noise ratio in dB", factory=lambda: [5.0, 30.0])
    telephone_prob: float = _setting(0.2, "probability of the telephone channel (300-3400 Hz, 8 kHz mu-law)")
    gain_prob: float = _setting(0.5, "probability of a gain change (then clipped to [-1, 1])")
    gain_db: list[float] = _setting(help="[min, max] gain in dB", factory=lambda: [-10.0, 6.0])

    def __post_init__(self) -> None:
        for name in ("prob", "speed_prob", "reverb_prob", "noise_prob", "telephone_prob", "gain_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"AugmentConfig.{name} must be a probability in [0, 1], got {value}")
        for name in ("speed_range", "rt60", "drr_db", "snr_db", "gain_db"):
            _check_range(name, getattr(self, name))
        for name in ("speed_range", "rt60"):
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"AugmentConfig.{name} must be positive, got {list(getattr(self, name))}")


def _check_range(name: str, value: Any) -> None:
    """Two finite numbers, low <= high (equal ends give a fixed value)."""
    ends = list(value) if hasattr(value, "__len__") and not isinstance(value, str) else None  # list or ListConfig
    if ends is None or len(ends) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in ends):
        raise ValueError(f"AugmentConfig.{name} must be [low, high], two finite numbers, got {value!r}")
    if ends[0] > ends[1]:
        raise ValueError(f"AugmentConfig.{name} must be increasing ([low, high]), got {ends}")


# ------------------------------------------------------------------------------------ transforms


def speed_perturb(wave: torch.Tensor, sample_rate: int, factor: float) -> torch.Tensor:
    """Play ``wave`` ``factor`` times faster (pitch and tempo together, as in Kaldi's speed
    perturbation): a frequency f becomes f * factor and the clip has ``round(len / factor)`` samples.

    Done by resampling from rate p to rate q where p/q is ``factor`` rounded to a fraction with
    q <= 100, so the polyphase kernel stays small; the exact length is then set by trimming or
    zero-padding at most one sample. ``sample_rate`` is unchanged (accepted for a uniform signature).
    """
    if factor <= 0:
        raise ValueError(f"speed factor must be positive, got {factor}")
    target = round(wave.shape[-1] / factor)
    if wave.numel() == 0 or target == 0:
        return wave.new_zeros(target)
    ratio = Fraction(factor).limit_denominator(SPEED_MAX_DENOMINATOR)
    out = resample(wave, ratio.numerator, ratio.denominator)
    return _fit_length(out, target)


def reverberate(wave: torch.Tensor, sample_rate: int, rt60: float, generator: torch.Generator,
                drr_db: float = 5.0) -> torch.Tensor:
    """Convolve with a synthetic room impulse response; the output keeps the input's length (the
    tail past the end is cut, as a recording of fixed duration would).

    The response is a direct-path impulse followed by Gaussian noise whose amplitude decays by 60 dB
    over ``rt60`` seconds; the tail is scaled to ``drr_db`` below the direct path and the whole
    response normalised to unit energy, so the clip's loudness is roughly kept.
    """
    if wave.numel() == 0:
        return wave.clone()
    rir = room_impulse_response(sample_rate, rt60, drr_db, generator, max_len=wave.shape[-1]).to(wave.device)
    return _fft_convolve(wave, rir)[: wave.shape[-1]]


def room_impulse_response(sample_rate: int, rt60: float, drr_db: float, generator: torch.Generator,
                          max_len: int | None = None) -> torch.Tensor:
    """Unit-energy impulse response: 1 at t=0, then exponentially decaying noise, ``rt60`` seconds
    long (or ``max_len`` samples, the most a length-keeping convolution can use)."""
    if rt60 <= 0:
        raise ValueError(f"rt60 must be positive, got {rt60}")
    length = max(1, round(rt60 * sample_rate))
    if max_len is not None:
        length = max(1, min(length, max_len))
    t = torch.arange(length, dtype=torch.float32) / sample_rate
    tail = torch.randn(length, generator=generator) * torch.exp(-_DECAY_60_DB * t / rt60)
    tail[0] = 0.0
    tail_energy = float(tail.square().sum())
    if tail_energy > 0:
        tail *= math.sqrt(10.0 ** (-drr_db / 10.0) / tail_energy)
    rir = tail
    rir[0] = 1.0
    return rir / rir.norm()


def add_noise(wave: torch.Tensor, snr_db: float, colour: str, generator: torch.Generator) -> torch.Tensor:
    """Add generated ``colour`` noise (white, pink = 1/f power, brown = 1/f^2 power) scaled so that
    the clip's power over the noise's is ``snr_db``. A silent clip is returned as is (no SNR is
    defined against zero power, and zeros must not become NaN)."""
    if colour not in NOISE_COLOURS:
        raise ValueError(f"noise colour must be one of {NOISE_COLOURS}, got {colour!r}")
    signal_power = float(wave.double().square().mean()) if wave.numel() else 0.0
    if signal_power == 0.0:
        return wave.clone()
    noise = coloured_noise(wave.shape[-1], colour, generator).to(wave.device)
    noise_power = float(noise.double().square().mean())
    if noise_power == 0.0:  # e.g. one sample of pink noise: only the removed DC bin is left
        return wave.clone()
    scale = math.sqrt(signal_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    return wave + noise * scale


def coloured_noise(length: int, colour: str, generator: torch.Generator) -> torch.Tensor:
    """``length`` samples of zero-mean noise; pink and brown are white noise shaped in the frequency
    domain (amplitude f^-1/2 and f^-1), over a fast FFT length (a prime clip length would be slow)."""
    if colour == "white":
        return torch.randn(length, generator=generator)
    n = _fft_size(length)
    spectrum = torch.fft.rfft(torch.randn(n, generator=generator))
    freq = torch.arange(spectrum.shape[-1], dtype=torch.float32)
    freq[0] = 1.0  # placeholder: the DC bin is zeroed below (1/0 otherwise)
    spectrum *= freq.rsqrt() if colour == "pink" else freq.reciprocal()
    spectrum[0] = 0.0
    return torch.fft.irfft(spectrum, n=n)[:length]


def telephone(wave: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """A narrow-band phone channel: down to 8 kHz, band-pass 300-3400 Hz, mu-law 8-bit quantisation
    round trip (G.711), back to ``sample_rate``; same length. Deterministic."""
    if wave.numel() == 0:
        return wave.clone()
    narrow = resample(wave, sample_rate, TELEPHONE_RATE) if sample_rate > TELEPHONE_RATE else wave
    narrow_rate = min(sample_rate, TELEPHONE_RATE)
    narrow = mu_law_round_trip(band_pass(narrow, narrow_rate, *TELEPHONE_BAND_HZ))
    out = resample(narrow, narrow_rate, sample_rate) if sample_rate > TELEPHONE_RATE else narrow
    return _fit_length(out, wave.shape[-1])


def band_pass(wave: torch.Tensor, sample_rate: int, low_hz: float, high_hz: float) -> torch.Tensor:
    """Zero-phase band-pass by an FFT mask with raised-cosine skirts ``TELEPHONE_EDGE_HZ`` wide outside
    the band (the soft edges keep the ringing of a brick-wall mask down); zero-padded so the circular
    wrap of the filter's short response stays out of the clip."""
    length = wave.shape[-1]
    n = _fft_size(length + BAND_PASS_PAD)
    freq = torch.fft.rfftfreq(n, d=1.0 / sample_rate).to(wave.device)
    below = ((freq - (low_hz - TELEPHONE_EDGE_HZ)) / TELEPHONE_EDGE_HZ).clamp(0.0, 1.0)
    above = (((high_hz + TELEPHONE_EDGE_HZ) - freq) / TELEPHONE_EDGE_HZ).clamp(0.0, 1.0)
    mask = (0.5 - 0.5 * torch.cos(math.pi * below)) * (0.5 - 0.5 * torch.cos(math.pi * above))
    return torch.fft.irfft(torch.fft.rfft(wave, n=n) * mask, n=n)[:length]


def mu_law_round_trip(wave: torch.Tensor, mu: int = MU_LAW_MU) -> torch.Tensor:
    """Encode to ``mu + 1`` mu-law codes and decode: the companded quantisation noise of a phone line."""
    x = wave.clamp(-1.0, 1.0)
    companded = torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)
    codes = torch.round((companded + 1.0) * (mu / 2.0))
    decoded = codes * (2.0 / mu) - 1.0
    return torch.sign(decoded) * torch.expm1(decoded.abs() * math.log1p(mu)) / mu


def apply_gain(wave: torch.Tensor, db: float) -> torch.Tensor:
    """Scale by ``10 ** (db / 20)`` and clip to [-1, 1], as a recorder driven too hot would."""
    return (wave * 10.0 ** (db / 20.0)).clamp(-1.0, 1.0)


# --------------------------------------------------------------------------------------- pipeline


def augment(wave: torch.Tensor, sample_rate: int, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Augment one clip: with probability ``cfg.prob`` apply, in the order speed, reverb, noise,
    telephone, gain, each transform with its own probability and parameters drawn from ``generator``.

    Returns float32 1-D at ``sample_rate``, finite, clamped to [-1, 1]; the same length except after
    speed perturbation by ``factor``, which gives ``round(len / factor)`` samples. A clip that is not
    augmented (``cfg.prob`` 0 or the draw says no) comes back unchanged, as given.
    """
    if wave.dim() != 1:
        raise ValueError(f"augment takes a mono 1-D waveform, got shape {tuple(wave.shape)}")
    if cfg.prob == 0.0:
        return wave
    # A fixed number of draws up front, and one sub-generator per transform: whether one transform
    # fires (or how many samples it draws) never shifts the random numbers another one sees.
    fires = torch.rand(6, generator=generator, dtype=torch.float64).tolist()
    seeds = torch.randint(0, 2**62, (5,), generator=generator).tolist()
    if fires[0] >= cfg.prob:
        return wave
    speed, reverb, noise, phone, gain = (torch.Generator().manual_seed(s) for s in seeds)
    out = wave.to(torch.float32)
    if fires[1] < cfg.speed_prob:
        out = speed_perturb(out, sample_rate, _uniform(cfg.speed_range, speed))
    if fires[2] < cfg.reverb_prob:
        rt60, drr = _uniform(cfg.rt60, reverb), _uniform(cfg.drr_db, reverb)
        out = reverberate(out, sample_rate, rt60, reverb, drr_db=drr)
    if fires[3] < cfg.noise_prob:
        snr = _uniform(cfg.snr_db, noise)
        colour = NOISE_COLOURS[int(torch.randint(len(NOISE_COLOURS), (), generator=noise))]
        out = add_noise(out, snr, colour, noise)
    if fires[4] < cfg.telephone_prob:
        out = telephone(out, sample_rate)
    if fires[5] < cfg.gain_prob:
        out = apply_gain(out, _uniform(cfg.gain_db, gain))
    return out.clamp(-1.0, 1.0).to(torch.float32)


def augment_seeded(wave: torch.Tensor, sample_rate: int, cfg: AugmentConfig, seed: int) -> torch.Tensor:
    """``augment`` with a fresh generator seeded by ``seed`` (derive it per sample for exact resume)."""
    return augment(wave, sample_rate, cfg, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------- helpers


def _uniform(bounds: list[float], generator: torch.Generator) -> float:
    low, high = float(bounds[0]), float(bounds[1])
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _fit_length(wave: torch.Tensor, length: int) -> torch.Tensor:
    """Trim or zero-pad the end to ``length`` samples (resampling rounds lengths up)."""
    if wave.shape[-1] >= length:
        return wave[:length]
    return torch.nn.functional.pad(wave, (0, length - wave.shape[-1]))


def _fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n: FFT sizes pocketfft handles at full speed, seldom far above n
    (a power of two can be almost twice n)."""
    best = 1 << max(0, n - 1).bit_length()
    power_of_5 = 1
    while power_of_5 < best:
        power_of_35 = power_of_5
        while power_of_35 < best:
            size = power_of_35
            while size < n:
                size *= 2
            best = min(best, size)
            power_of_35 *= 3
        power_of_5 *= 5
    return best


def _fft_convolve(signal: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Full linear convolution (``len(signal) + len(kernel) - 1`` samples) by FFT."""
    full = signal.shape[-1] + kernel.shape[-1] - 1
    n = _fft_size(full)
    product = torch.fft.rfft(signal, n=n) * torch.fft.rfft(kernel, n=n)
    return torch.fft.irfft(product, n=n)[:full]
