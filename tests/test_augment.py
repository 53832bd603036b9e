"""Waveform augmentation (speechllm.augment): seeded reproducibility, the length and range contract,
and each transform measured on its own against what it claims (SNR, gain, telephone band, reverb
tail, speed-shifted frequency)."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch
from omegaconf import OmegaConf

from speechllm.augment import (
    NOISE_COLOURS,
    AugmentConfig,
    add_noise,
    apply_gain,
    augment,
    augment_seeded,
    reverberate,
    speed_perturb,
    telephone,
)

SR = 16000
LENGTHS = [0, 1, 2, 3, 101, 4001]


def only(transform: str, **ranges) -> AugmentConfig:
    """Every clip augmented, with exactly one transform always on."""
    probs = {name: 0.0 for name in ("speed_prob", "reverb_prob", "noise_prob", "telephone_prob", "gain_prob")}
    probs[f"{transform}_prob"] = 1.0
    return AugmentConfig(prob=1.0, **probs, **ranges)


def everything(**ranges) -> AugmentConfig:
    return AugmentConfig(prob=1.0, speed_prob=1.0, reverb_prob=1.0, noise_prob=1.0, telephone_prob=1.0,
                         gain_prob=1.0, **ranges)


def speech_like(length: int, seed: int = 0, amplitude: float = 0.3) -> torch.Tensor:
    """A few harmonics under a slow envelope plus a little noise: nonzero, in range, not periodic."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float64) / SR
    tone = sum(torch.sin(2 * math.pi * f * t + p) for f, p in ((180, 0.0), (540, 1.0), (1300, 2.0), (2900, 0.5)))
    envelope = 0.6 + 0.4 * torch.sin(2 * math.pi * 3 * t)
    wave = amplitude / 4 * tone * envelope + 0.01 * torch.randn(length, generator=g, dtype=torch.float64)
    return wave.to(torch.float32)


def sine(freq: float, seconds: float = 1.0, amplitude: float = 0.5) -> torch.Tensor:
    t = torch.arange(round(seconds * SR), dtype=torch.float64) / SR
    return (amplitude * torch.sin(2 * math.pi * freq * t)).to(torch.float32)


def energy(x: torch.Tensor) -> float:
    return float(x.double().square().sum())


def snr_db(clean: torch.Tensor, noisy: torch.Tensor) -> float:
    return 10 * math.log10(energy(clean) / energy(noisy - clean))


def dominant_hz(x: torch.Tensor) -> float:
    spectrum = torch.fft.rfft(x.double() * torch.hann_window(x.shape[-1], dtype=torch.float64)).abs()
    return float(spectrum.argmax()) * SR / x.shape[-1]


# ------------------------------------------------------------------------------- reproducibility

TRANSFORMS = ["speed", "reverb", "noise", "telephone", "gain"]


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_same_seed_is_bit_identical_and_other_seeds_differ(transform):
    wave, cfg = speech_like(8000), only(transform)
    first = augment_seeded(wave, SR, cfg, seed=7)
    assert torch.equal(first, augment_seeded(wave, SR, cfg, seed=7))
    assert torch.equal(first, augment(wave, SR, cfg, torch.Generator().manual_seed(7)))
    others = [augment_seeded(wave, SR, cfg, seed=s) for s in range(8, 12)]
    if transform == "telephone":  # a fixed channel: nothing to draw
        assert all(torch.equal(first, other) for other in others)
        assert not torch.equal(first, wave)
    else:
        assert not any(first.shape == other.shape and torch.equal(first, other) for other in others)


def test_all_transforms_together_reproduce_and_leave_the_global_rng_alone():
    wave, cfg = speech_like(8000), everything()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = augment_seeded(wave, SR, cfg, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, augment_seeded(wave, SR, cfg, seed=3))
    assert not torch.equal(first, augment_seeded(wave, SR, cfg, seed=4))


@pytest.mark.parametrize("transform", ["reverb", "noise"])
def test_public_random_transforms_draw_only_from_their_generator(transform):
    wave = speech_like(4000)

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return reverberate(wave, SR, 0.4, g) if transform == "reverb" else add_noise(wave, 10.0, "pink", g)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_one_transform_firing_does_not_shift_another_transforms_draws():
    # Speed's factor (seen in the length) is the same whether or not noise and reverb also run.
    wave = speech_like(4000)
    alone = AugmentConfig(prob=1.0, speed_prob=1.0, reverb_prob=0.0, noise_prob=0.0, telephone_prob=0.0, gain_prob=0.0)
    with_more = dataclasses.replace(alone, reverb_prob=1.0, noise_prob=1.0)
    lengths = [augment_seeded(wave, SR, alone, s).shape[0] for s in range(10)]
    assert lengths == [augment_seeded(wave, SR, with_more, s).shape[0] for s in range(10)]
    assert len(set(lengths)) > 1


# ---------------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("factor", [0.9, 0.937, 1.1, 1.25])
def test_speed_gives_round_length_over_factor(length, factor):
    wave = speech_like(length)
    assert speed_perturb(wave, SR, factor).shape == (round(length / factor),)
    cfg = only("speed", speed_range=[factor, factor])
    out = augment_seeded(wave, SR, cfg, seed=0)
    assert out.shape == (round(length / factor),) and out.dtype == torch.float32


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("transform", ["reverb", "noise", "telephone", "gain"])
def test_other_transforms_keep_the_length(length, transform):
    wave = speech_like(length)
    out = augment_seeded(wave, SR, only(transform), seed=1)
    assert out.shape == (length,)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("length", LENGTHS)
def test_telephone_keeps_the_length_at_other_rates(length):
    for rate in (8000, 22050, 44100):
        assert telephone(speech_like(length), rate).shape == (length,)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("seed", range(3))
def test_output_is_float32_finite_and_within_unit_range(length, seed):
    loud = 3.0 * speech_like(length, seed=seed)  # out of range on purpose: the output must still be clamped
    cfg = everything(gain_db=[6.0, 6.0])
    for wave in (loud, torch.zeros(length), speech_like(length, seed=seed).double()):
        out = augment_seeded(wave, SR, cfg, seed=seed)
        assert out.dtype == torch.float32 and out.dim() == 1
        assert torch.isfinite(out).all()
        assert out.numel() == 0 or float(out.abs().max()) <= 1.0


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_silence_stays_finite(transform):
    for length in (0, 1, 1600):
        out = augment_seeded(torch.zeros(length), SR, only(transform), seed=0)
        assert torch.isfinite(out).all()
        assert out.numel() == 0 or float(out.abs().max()) < 1e-3


def test_prob_zero_returns_the_input_unchanged_and_draws_nothing():
    wave = speech_like(1000)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    out = augment(wave, SR, AugmentConfig(prob=0.0), g)
    assert out is wave
    assert torch.equal(g.get_state(), state)


def test_clips_the_draw_passes_over_come_back_unchanged():
    wave, cfg = speech_like(1000), dataclasses.replace(everything(), prob=0.5)
    outputs = [augment_seeded(wave, SR, cfg, seed=s) for s in range(40)]
    unchanged = sum(out is wave for out in outputs)
    assert 5 < unchanged < 35


def test_rejects_input_that_is_not_mono():
    with pytest.raises(ValueError, match="1-D"):
        augment_seeded(torch.zeros(2, 100), SR, everything(), seed=0)


# ----------------------------------------------------------------------------- one lever at a time


@pytest.mark.parametrize("colour", NOISE_COLOURS)
@pytest.mark.parametrize("target", [0.0, 5.0, 17.5, 30.0])
def test_add_noise_reaches_the_requested_snr(colour, target):
    clean = speech_like(16000, amplitude=0.1)  # quiet: no clamping anywhere near
    noisy = add_noise(clean, target, colour, torch.Generator().manual_seed(0))
    assert abs(snr_db(clean, noisy) - target) < 0.5


def test_noise_colours_differ_in_spectral_tilt():
    # Energy share below 1 kHz: white ~1/8 of the band, pink and brown far more.
    clean = speech_like(16000, amplitude=0.1)
    share = {}
    for colour in NOISE_COLOURS:
        noise = add_noise(clean, 0.0, colour, torch.Generator().manual_seed(0)) - clean
        power = torch.fft.rfft(noise.double()).abs().square()
        share[colour] = float(power[:1000].sum() / power.sum())
    assert share["white"] < 0.2 < share["pink"] < share["brown"]


@pytest.mark.parametrize("db", [-10.0, -3.0, 0.0, 4.5])
def test_apply_gain_scales_rms(db):
    wave = speech_like(8000, amplitude=0.2)
    out = apply_gain(wave, db)
    ratio = math.sqrt(energy(out) / energy(wave))
    assert ratio == pytest.approx(10 ** (db / 20), rel=1e-5)


def test_apply_gain_clips_to_unit_range():
    out = apply_gain(sine(440.0, amplitude=0.9), 6.0)
    assert float(out.abs().max()) == 1.0


def test_telephone_removes_6khz_and_keeps_1khz():
    middle = slice(2000, -2000)  # away from the edges, where the filters start and stop
    high, low = sine(6000.0), sine(1000.0)
    assert energy(telephone(high, SR)[middle]) < 0.01 * energy(high[middle])
    kept = telephone(low, SR)[middle]
    assert energy(kept) > 0.8 * energy(low[middle])
    assert abs(dominant_hz(kept) - 1000.0) < 5.0


def test_telephone_removes_low_rumble():
    rumble = sine(100.0)
    assert energy(telephone(rumble, SR)[2000:-2000]) < 0.05 * energy(rumble[2000:-2000])


def test_reverberate_tail_decays_and_grows_with_rt60():
    impulse = torch.zeros(SR // 2)
    impulse[0] = 0.5
    last_share = []  # the response stops at one RT60 (60 dB down), so compare a part all three reach
    for rt60 in (0.1, 0.3, 0.8):
        out = reverberate(impulse, SR, rt60, torch.Generator().manual_seed(0), drr_db=0.0)
        assert out.shape == impulse.shape
        span = [energy(part) for part in out[1 : round(rt60 * SR)].chunk(4)]  # the response's own length
        assert span == sorted(span, reverse=True) and span[-1] > 0  # a decaying tail, not just the direct path
        last_share.append(energy(out[SR // 20 :]) / energy(out))  # after the first 50 ms
    assert last_share == sorted(last_share) and last_share[-1] > 10 * last_share[0]


def test_reverberate_keeps_loudness_roughly():
    wave = speech_like(16000)
    out = reverberate(wave, SR, 0.5, torch.Generator().manual_seed(0), drr_db=3.0)
    assert 0.3 < energy(out) / energy(wave) < 3.0


@pytest.mark.parametrize("factor", [0.9, 0.95, 1.1, 1.2])
def test_speed_perturb_shifts_frequency_by_the_factor(factor):
    out = speed_perturb(sine(1000.0), SR, factor)
    assert abs(dominant_hz(out) - 1000.0 * factor) < 5.0


# ----------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "override, field",
    [
        ({"prob": 1.5}, "prob"),
        ({"speed_prob": -0.1}, "speed_prob"),
        ({"telephone_prob": 2.0}, "telephone_prob"),
        ({"snr_db": [30.0, 5.0]}, "snr_db"),
        ({"gain_db": [6.0, -10.0]}, "gain_db"),
        ({"rt60": [0.8]}, "rt60"),
        ({"speed_range": [0.0, 1.1]}, "speed_range"),
        ({"rt60": [-0.1, 0.5]}, "rt60"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(override, field):
    with pytest.raises(ValueError, match=rf"AugmentConfig\.{field}\b"):
        AugmentConfig(**override)


def test_config_embeds_in_omegaconf():
    cfg = OmegaConf.merge(OmegaConf.structured(AugmentConfig), {"prob": 0.5, "snr_db": [0.0, 10.0]})
    built = OmegaConf.to_object(cfg)
    assert isinstance(built, AugmentConfig) and built.snr_db == [0.0, 10.0]
    out = augment_seeded(speech_like(800), SR, cfg, seed=0)  # a DictConfig works as the config too
    assert out.dtype == torch.float32


def test_ten_seconds_with_every_transform_is_fast():
    # One thread's CPU time, not wall time: on a busy shared machine the wall clock mostly measures
    # the wait for a core (and a second intra-op thread, spinning, its wait for the first). About
    # 20 ms on one free core; the bound is loose and only catches an algorithmic slip.
    wave, cfg = speech_like(10 * SR), everything()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        augment_seeded(wave, SR, cfg, seed=0)
        times = []
        for seed in range(3):
            start = time.thread_time()
            augment_seeded(wave, SR, cfg, seed=seed)
            times.append(time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    assert sorted(times)[1] < 0.25, times
