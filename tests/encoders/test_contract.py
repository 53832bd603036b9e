"""The contract every registered encoder kind passes, at tiny size with random weights.

Speech (and text, for kinds with a text side): a batch equals its items encoded one by one, lengths
are int64 and the features zero beyond them, the feature size is ``output_dim``, and a bf16 autocast
(Lightning's bf16-mixed) gives finite float features. The encoder is frozen, rebuilds identically from
its seed, and is what its registry entry declares. A kind without a tiny case here fails: add one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from speechllm.config import EncoderConfig
from speechllm.encoders import (
    COMMON_FIELDS,
    ENCODER_KINDS,
    EncoderKind,
    SpeechEncoder,
    UnifiedEncoder,
    build_encoder,
    register_encoder,
)
from speechllm.encoders.base import pad_sequences

REPO = Path(__file__).resolve().parents[2]


class ToyEncoder(UnifiedEncoder):
    """The smallest encoder there is: 10 ms frames through a fixed random map; text: a vector per character."""

    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.frame_map = nn.Parameter(torch.randn(160, dim, generator=g) / 160**0.5)
        self.char_table = nn.Parameter(torch.randn(128, dim, generator=g))
        self.output_dim = dim
        self.requires_grad_(False)
        self.eval()

    def encode_speech(self, waveforms: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_sequences([w[: len(w) // 160 * 160].float().reshape(-1, 160) @ self.frame_map for w in waveforms])

    def encode_text(self, texts, generators=None, cps=None) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_sequences([self.char_table[[min(ord(c), 127) for c in text]] for text in texts])


# A new kind needs only its module and this one line (plus a tiny case below for the contract).
register_encoder("toy", EncoderKind(lambda cfg: ToyEncoder(cfg.from_config["dim"], cfg.init_seed), has_text_side=True, is_ctc=False))


def encoder_config(**settings) -> EncoderConfig:
    return OmegaConf.merge(OmegaConf.structured(EncoderConfig), settings)


WHISPER = {"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64}
DUAL_TOWER = {
    "hidden_size": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
    "speech_encoder_layers": 2, "speech_encoder_attention_heads": 2, "speech_encoder_intermediate_size": 64,
    "conv_depthwise_kernel_size": 5, "left_max_position_embeddings": 8, "right_max_position_embeddings": 2,
}


def ctc_preset(tmp) -> EncoderConfig:
    """The tiny model preset's CTC encoder (a random wav2vec2 CTC model)."""
    return encoder_config(**OmegaConf.to_container(OmegaConf.load(REPO / "configs/model/tiny.yaml").model.encoder))


def ctc_whisper_head(tmp) -> EncoderConfig:
    """A saved tiny Whisper under a saved random BiLSTM CTC head (the embedded default's layout)."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from speechllm.encoders.ctc import CTCHead

    folder = tmp.mktemp("ctc-whisper-head")
    torch.manual_seed(0)
    config = WhisperConfig(**WHISPER, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
                           max_target_positions=16)
    WhisperForConditionalGeneration(config).save_pretrained(folder / "whisper")
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(folder / "whisper")
    CTCHead(32, ["<blank>", " ", *"abcdefghijklmnopqrstuvwxyz'"], kind="bilstm", hidden=8).save(folder / "head")
    return encoder_config(kind="ctc", pretrained=str(folder / "whisper"), backbone="whisper",
                          ctc_head=str(folder / "head"), lsd_blank_threshold=1.01)


# Case name -> (kind, its tiny config); the argument is pytest's tmp_path_factory.
CASES: dict[str, tuple[str, Callable]] = {
    "ctc": ("ctc", ctc_preset),
    "ctc-whisper-head": ("ctc", ctc_whisper_head),
    "whisper": ("whisper", lambda tmp: encoder_config(kind="whisper", from_config=WHISPER)),
    "whisper-eager": ("whisper", lambda tmp: encoder_config(kind="whisper", from_config={**WHISPER, "attn_implementation": "eager"})),
    "dual_tower": ("dual_tower", lambda tmp: encoder_config(kind="dual_tower", from_config=DUAL_TOWER)),
    "toy": ("toy", lambda tmp: encoder_config(kind="toy", from_config={"dim": 8})),
}
PARAMS = [pytest.param((kind, case), id=case) for kind in ENCODER_KINDS
          for case in ([c for c, (k, _) in CASES.items() if k == kind] or [f"{kind}-has-no-case"])]
# The text-side contract runs on the kinds that have one; the seed contract on the cases built from a
# config (these are built from saved weights, so a seed does not apply).
TEXT_PARAMS = [p for p in PARAMS if ENCODER_KINDS[p.values[0][0]].has_text_side]
FROM_SAVED_WEIGHTS = {"ctc-whisper-head"}
SEEDED_PARAMS = [p for p in PARAMS if p.values[0][1] not in FROM_SAVED_WEIGHTS]

# Whisper's conv2 (stride 2) and the dual tower's fbank pairs and stride-8 adaptor see both parities
# here, so their last windows straddle the end of some clips.
CLIP_SAMPLES = [16000, 10480, 5840, 8240, 3280]
TEXTS = ["hello world", "hi", "a somewhat longer sentence, isn't it?"]


def clips() -> list[torch.Tensor]:
    return [0.1 * torch.randn(n, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(CLIP_SAMPLES)]


def generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@dataclasses.dataclass
class Case:
    kind: EncoderKind
    cfg: EncoderConfig
    encoder: SpeechEncoder


@pytest.fixture(scope="module", params=PARAMS)
def case(request, tmp_path_factory) -> Case:
    kind, name = request.param
    if name not in CASES:
        pytest.fail(f"encoder kind {kind!r} has no tiny case in {__name__}.CASES: add one so the contract runs on it")
    cfg = CASES[name][1](tmp_path_factory)
    return Case(ENCODER_KINDS[kind], cfg, build_encoder(cfg))


def check_padded(feats: torch.Tensor, lengths: torch.Tensor, batch: int, dim: int) -> None:
    assert lengths.dtype == torch.int64 and lengths.shape == (batch,) and (lengths >= 1).all()
    assert feats.is_floating_point() and feats.shape == (batch, int(lengths.max()), dim)
    assert torch.isfinite(feats).all()
    for row, n in zip(feats, lengths.tolist()):
        assert row[n:].eq(0).all(), "features must be zero beyond each length"
        assert row[:n].abs().sum(-1).gt(0).all(), "a valid frame is all zeros"


def check_batched_equals_one_by_one(encode: Callable, inputs: list, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    feats, lengths = encode(inputs, range(len(inputs)))
    check_padded(feats, lengths, len(inputs), dim)
    for i, item in enumerate(inputs):
        alone, n = encode([item], [i])
        assert n.tolist() == [lengths[i].item()], f"item {i}: length {n.item()} alone, {lengths[i].item()} in a batch"
        torch.testing.assert_close(feats[i, : lengths[i]], alone[0], atol=1e-5, rtol=1e-5)
    return feats, lengths


def encode_speech(encoder: SpeechEncoder) -> Callable:
    return lambda waves, seeds: encoder.encode_speech(waves)


def encode_text(encoder: UnifiedEncoder) -> Callable:
    return lambda texts, seeds: encoder.encode_text(texts, generators(seeds))


def test_is_what_its_registry_entry_declares(case):
    enc, kind = case.encoder, case.kind
    assert isinstance(enc, SpeechEncoder) and enc.output_dim > 0
    assert isinstance(enc, UnifiedEncoder) == kind.has_text_side
    if kind.is_ctc:  # posteriors over units that have strings
        assert len(enc.vocab) == enc.output_dim and 0 <= enc.vocab.blank_id < enc.output_dim


def test_frozen_and_stays_in_eval(case):
    assert not any(p.requires_grad for p in case.encoder.parameters())
    case.encoder.train()
    assert not any(m.training for m in case.encoder.modules())


def test_speech_batched_equals_one_by_one(case):
    feats, lengths = check_batched_equals_one_by_one(encode_speech(case.encoder), clips(), case.encoder.output_dim)
    if case.kind.is_ctc:
        for row, n in zip(feats, lengths.tolist()):
            torch.testing.assert_close(row[:n].sum(-1), torch.ones(n))


@pytest.mark.parametrize("case", TEXT_PARAMS, indirect=True)
def test_text_batched_equals_one_by_one(case):
    feats, lengths = check_batched_equals_one_by_one(encode_text(case.encoder), TEXTS, case.encoder.output_dim)
    if case.kind.is_ctc:
        for row, n in zip(feats, lengths.tolist()):
            torch.testing.assert_close(row[:n].sum(-1), torch.ones(n))


def test_bf16_autocast_gives_finite_float_features(case):
    """Lightning's bf16-mixed wraps the whole step in a CPU/GPU autocast; the encoder must run inside it."""
    enc = case.encoder
    calls = [encode_speech(enc)] + ([encode_text(enc)] if case.kind.has_text_side else [])
    for encode, inputs in zip(calls, [clips(), TEXTS]):
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            feats, lengths = encode(inputs, range(len(inputs)))
        check_padded(feats, lengths, len(inputs), enc.output_dim)
        assert feats.dtype in (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("case", SEEDED_PARAMS, indirect=True)
def test_rebuilds_identically_from_its_seed(case):
    assert case.cfg.from_config is not None, "a case built from saved weights belongs in FROM_SAVED_WEIGHTS"
    wave = clips()[:1]
    same = build_encoder(case.cfg).encode_speech(wave)[0]
    other = build_encoder(OmegaConf.merge(case.cfg, {"init_seed": case.cfg.init_seed + 1})).encode_speech(wave)[0]
    assert torch.equal(case.encoder.encode_speech(wave)[0], same)
    assert other.shape != same.shape or not torch.equal(other, same)


def test_every_kind_declares_real_config_fields():
    names = {f.name for f in dataclasses.fields(EncoderConfig)}
    assert set(COMMON_FIELDS) <= names
    for name, kind in ENCODER_KINDS.items():
        assert set(kind.fields) <= names - set(COMMON_FIELDS), f"{name}: {sorted(set(kind.fields) - names)}"


def test_an_unknown_kind_or_a_second_registration_is_refused():
    with pytest.raises(ValueError, match=r"unknown encoder.kind 'wisper' \(ctc \| whisper \| dual_tower"):
        build_encoder(encoder_config(kind="wisper"))
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("whisper", ENCODER_KINDS["toy"])
