"""Frozen Whisper encoder over real-length clips.

Stock ``WhisperEncoder.forward`` insists on 30 s of (padded) log-mel input, so a 2 s clip would
cost as much as a 30 s one and its states would depend on the padding. Here each clip gets its
log-mel at its own length, the batch is padded only to its longest clip, and the encoder's own
submodules are run with padding masked out of both the convolutions and the self-attention: a
clip's output is the same whatever it is batched with (so training and inference agree), and on
a full 30 s clip it equals the stock forward.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from speechllm.config import EncoderConfig, plain
from speechllm.encoders.base import SpeechEncoder, lengths_to_mask, load_tower, pad_sequences


class WhisperSpeechEncoder(SpeechEncoder):
    """Frozen Whisper encoder: waveforms -> (B, T, d_model) states at 50 Hz, T = mel frames / 2."""

    def __init__(self, encoder: WhisperEncoder, feature_extractor: WhisperFeatureExtractor) -> None:
        super().__init__()
        config = encoder.config
        if feature_extractor.sampling_rate != self.sample_rate:
            raise ValueError(f"feature extractor runs at {feature_extractor.sampling_rate} Hz, expected {self.sample_rate}")
        if feature_extractor.feature_size != config.num_mel_bins:
            raise ValueError(f"feature extractor gives {feature_extractor.feature_size} mel bins, encoder expects {config.num_mel_bins}")
        self.encoder = encoder
        self.feature_extractor = feature_extractor
        self.output_dim = config.d_model
        # The positional table has max_source_positions rows after conv2's stride 2 (1500 = 30 s).
        self.max_mel_frames = config.max_source_positions * encoder.conv1.stride[0] * encoder.conv2.stride[0]
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, dtype: torch.dtype = torch.float32) -> WhisperSpeechEncoder:
        """Encoder weights of a ``WhisperModel`` / ``WhisperForConditionalGeneration`` checkpoint (no decoder)."""
        # WhisperForConditionalGeneration stores "model.encoder.*", WhisperModel "encoder.*".
        encoder = load_tower(WhisperEncoder, path_or_id, {r"^(model\.)?encoder\.": ""}, dtype=dtype)
        return cls(encoder, WhisperFeatureExtractor.from_pretrained(path_or_id))

    @classmethod
    def from_config(cls, config_kwargs: dict, seed: int) -> WhisperSpeechEncoder:
        """Random weights, identical for a given seed in every process (tests, smoke runs)."""
        config = WhisperConfig(**config_kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = WhisperEncoder(config)
        return cls(encoder, WhisperFeatureExtractor(feature_size=config.num_mel_bins))

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """One clip's (n_mels, n_samples // hop) log-mel, computed at its own length.

        Whisper's log-mel clamps at (clip max - 8) and pads with silence to 30 s by default; one
        clip at a time with ``padding="longest"`` means no padding at all, so a clip's features
        never depend on its batch mates. Against the stock 30 s padding this differs at most in the
        last frame, whose window sees up to 40 reflected samples instead of silence (the silence
        never raises the max).
        """
        if waveform.dim() != 1:
            raise ValueError(f"expected a 1-D waveform, got shape {tuple(waveform.shape)}")
        fe = self.feature_extractor
        n = waveform.shape[0]
        if n <= fe.n_fft // 2:  # torch.stft's reflect padding needs more samples than n_fft / 2
            raise ValueError(f"clip of {n} samples is too short for Whisper's log-mel (needs > {fe.n_fft // 2})")
        if n // fe.hop_length > self.max_mel_frames:
            raise ValueError(
                f"clip of {n / self.sample_rate:.2f} s is longer than Whisper's limit of "
                f"{self.max_mel_frames * fe.hop_length / self.sample_rate:g} s ({self.max_mel_frames} mel frames); "
                "split or trim it first"
            )
        # The extractor computes in torch and hands back numpy: under a bf16 autocast its output
        # would be bf16, which numpy cannot hold. The log-mel is float32 in every precision.
        with torch.autocast(device_type="cpu", enabled=False):
            features = fe(
                waveform.detach().float().cpu().numpy(), sampling_rate=self.sample_rate,
                padding="longest", truncation=False, return_tensors="pt",
            ).input_features
        return features[0]

    @torch.no_grad()
    def encode_speech(self, waveforms: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mel, mel_lengths = pad_sequences([self.log_mel(w).T for w in waveforms])
        param = self.encoder.conv1.weight
        return self.forward_mel(mel.transpose(1, 2).to(param), mel_lengths.to(param.device))

    def forward_mel(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``WhisperEncoder.forward`` on (B, n_mels, T) log-mel padded to any T <= 3000, padding masked.

        Returns (B, ceil(T / 2), d_model) states, zero beyond each length, and the lengths.
        """
        enc = self.encoder
        mel_valid = lengths_to_mask(mel_lengths, mel.shape[-1])[:, None, :]
        # Zero the padded frames after each conv so that, like the zero padding of a clip encoded
        # alone, they contribute nothing to the kernel windows that straddle a clip's end.
        x = nn.functional.gelu(enc.conv1(mel)).masked_fill(~mel_valid, 0.0)
        x = nn.functional.gelu(enc.conv2(x))
        lengths = enc._get_feat_extract_output_lengths(mel_lengths)
        valid = lengths_to_mask(lengths, x.shape[-1])
        x = x.masked_fill(~valid[:, None, :], 0.0).transpose(1, 2)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        # transformers' own factory builds the 4-D mask the configured attention wants (additive
        # float for eager, boolean for sdpa, None when nothing is padded).
        attention_mask = create_bidirectional_mask(config=enc.config, inputs_embeds=x, attention_mask=valid)
        for layer in enc.layers:
            x = layer(x, attention_mask)
        x = enc.layer_norm(x)
        return x.masked_fill(~valid[..., None], 0.0), lengths


def build_whisper_encoder(cfg: EncoderConfig) -> WhisperSpeechEncoder:
    """From a Whisper checkpoint (its encoder only), or random weights from ``from_config`` (tests)."""
    if cfg.from_config is not None:
        return WhisperSpeechEncoder.from_config(plain(cfg.from_config), seed=cfg.init_seed)
    if not cfg.pretrained:
        raise ValueError("encoder: set `pretrained` (Hub id or path) or `from_config`")
    return WhisperSpeechEncoder.from_pretrained(cfg.pretrained)
