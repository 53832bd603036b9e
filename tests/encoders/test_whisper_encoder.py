"""WhisperSpeechEncoder on a tiny random Whisper: real-length and faithful to HF (the contract every
encoder passes, batch invariance included, is tests/encoders/test_contract.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from speechllm.encoders.whisper import WhisperSpeechEncoder

SR = 16000
TINY = {"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64}


def tiny_encoder(attn: str = "sdpa", seed: int = 0) -> WhisperSpeechEncoder:
    return WhisperSpeechEncoder.from_config({**TINY, "attn_implementation": attn}, seed=seed)


def clip(n_samples: int, seed: int) -> torch.Tensor:
    return 0.1 * torch.randn(n_samples, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def encoder() -> WhisperSpeechEncoder:
    return tiny_encoder()


def test_lengths_follow_the_conv_strides(encoder):
    clips = [clip(16000, 0), clip(5920, 1), clip(36800, 2)]  # 100, 37 and 230 mel frames
    feats, lengths = encoder.encode_speech(clips)
    assert lengths.tolist() == [50, 19, 115]  # conv2 has stride 2: ceil(frames / 2)
    assert feats.shape == (3, 115, 32)


def test_30_seconds_matches_stock_forward(encoder):
    wave = clip(30 * SR, 3)
    # Per-clip log-mel at 30 s is exactly the feature extractor's default (padded to 30 s) input.
    mel = encoder.log_mel(wave)
    stock_mel = encoder.feature_extractor(wave.numpy(), sampling_rate=SR, return_tensors="pt").input_features
    assert mel.shape == (80, 3000)
    torch.testing.assert_close(mel, stock_mel[0])
    feats, lengths = encoder.encode_speech([wave])
    with torch.no_grad():
        stock = encoder.encoder(input_features=stock_mel).last_hidden_state
    assert lengths.tolist() == [1500]
    torch.testing.assert_close(feats, stock, atol=1e-5, rtol=1e-5)


def test_too_long_or_too_short_clip_raises(encoder):
    with pytest.raises(ValueError, match=r"longer than Whisper's limit of 30 s \(3000 mel frames\)"):
        encoder.encode_speech([clip(30 * SR + 160, 0)])
    with pytest.raises(ValueError, match="too short"):
        encoder.encode_speech([clip(200, 0)])


def test_from_pretrained_loads_only_the_encoder(tmp_path, encoder):
    config = WhisperConfig(**TINY, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, max_target_positions=16)
    model = WhisperForConditionalGeneration(config)
    model.save_pretrained(tmp_path)
    encoder.feature_extractor.save_pretrained(tmp_path)
    loaded = WhisperSpeechEncoder.from_pretrained(tmp_path)
    expected = model.get_encoder().state_dict()
    assert loaded.encoder.state_dict().keys() == expected.keys()
    for name, tensor in loaded.encoder.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert not any("decoder" in name for name, _ in loaded.named_parameters())
    assert not any(p.requires_grad for p in loaded.parameters())


def test_log_mel_is_float32_under_a_bf16_autocast(encoder):
    """Lightning's bf16-mixed wraps the whole step in an autocast; the log-mel must not come out bf16."""
    wave = clip(8000, 3)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mel = encoder.log_mel(wave)
    assert mel.dtype == torch.float32 and torch.equal(mel, encoder.log_mel(wave))
