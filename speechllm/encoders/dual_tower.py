"""TESU-LLM-style unified encoder: a text tower and a speech tower that share one space.

TESU-LLM's own unified encoder is not public; this is one configurable stand-in. SeamlessM4Tv2
has a text encoder and a conformer speech encoder that both feed the same text decoder through
cross-attention, so their outputs live in one space; we keep only those two towers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    SeamlessM4TFeatureExtractor,
    SeamlessM4Tv2Config,
)
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.seamless_m4t_v2.modeling_seamless_m4t_v2 import (
    SeamlessM4Tv2ConformerAdapterLayer,
    SeamlessM4Tv2Encoder,
    SeamlessM4Tv2SpeechEncoder,
)

from speechllm.config import EncoderConfig, LLMConfig, plain
from speechllm.encoders.base import UnifiedEncoder, lengths_to_mask, load_tower

# The conformer's chunk-attention mask is boolean and transformers' eager attention *adds* the mask
# to the scores, so under "eager" padded frames are not masked at all; sdpa handles it correctly.
ATTN_IMPLEMENTATION = "sdpa"


class DualTowerEncoder(UnifiedEncoder):
    """Frozen SeamlessM4Tv2 text + speech towers: texts or waveforms -> (B, T, hidden_size)."""

    def __init__(
        self,
        text_encoder: SeamlessM4Tv2Encoder,
        speech_encoder: SeamlessM4Tv2SpeechEncoder,
        tokenizer: PreTrainedTokenizerBase,
        feature_extractor: SeamlessM4TFeatureExtractor,
    ) -> None:
        super().__init__()
        config = text_encoder.config
        for tower in (text_encoder, speech_encoder):
            if tower.config._attn_implementation != ATTN_IMPLEMENTATION:
                raise ValueError(
                    f"{type(tower).__name__} uses attention {tower.config._attn_implementation!r}; "
                    f"only {ATTN_IMPLEMENTATION!r} masks the speech tower's padding correctly"
                )
        # Positions come from input_ids != pad_token_id, so the tokenizer must pad with the model's id.
        if tokenizer.pad_token_id != config.pad_token_id:
            raise ValueError(f"tokenizer pads with id {tokenizer.pad_token_id}, the text tower with {config.pad_token_id}")
        if len(tokenizer) > config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the text tower only {config.vocab_size}")
        if feature_extractor.sampling_rate != self.sample_rate:
            raise ValueError(f"feature extractor runs at {feature_extractor.sampling_rate} Hz, expected {self.sample_rate}")
        self.text_encoder = text_encoder
        self.speech_encoder = speech_encoder
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.output_dim = config.hidden_size
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, dtype: torch.dtype = torch.float32) -> DualTowerEncoder:
        """The two towers of a SeamlessM4Tv2 checkpoint, e.g. ``facebook/seamless-m4t-v2-large``.

        Only the towers' weights are materialised (the decoder, text-to-unit model and vocoder are
        skipped); the whole checkpoint is still downloaded.
        """
        common = {"dtype": dtype, "attn_implementation": ATTN_IMPLEMENTATION}
        # The text tower's embedding is tied to `shared`; checkpoints may store only that copy.
        text_encoder = load_tower(
            SeamlessM4Tv2Encoder, path_or_id, {r"^text_encoder\.": "", r"^shared\.weight$": "embed_tokens.weight"}, **common
        )
        speech_encoder = load_tower(SeamlessM4Tv2SpeechEncoder, path_or_id, {r"^speech_encoder\.": ""}, **common)
        return cls(
            text_encoder, speech_encoder,
            AutoTokenizer.from_pretrained(path_or_id), SeamlessM4TFeatureExtractor.from_pretrained(path_or_id),
        )

    @classmethod
    def from_config(cls, config_kwargs: dict, seed: int, tokenizer: PreTrainedTokenizerBase) -> DualTowerEncoder:
        """Random towers, identical for a given seed; vocabulary and pad id default to the tokenizer's."""
        defaults = {
            "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "attn_implementation": ATTN_IMPLEMENTATION,
        }
        config = SeamlessM4Tv2Config(**{**defaults, **config_kwargs})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            text_encoder = SeamlessM4Tv2Encoder(config)
            speech_encoder = SeamlessM4Tv2SpeechEncoder(config)
        # The extractor is pure numpy (80 Kaldi fbanks, stacked in pairs): nothing to download.
        return cls(text_encoder, speech_encoder, tokenizer, SeamlessM4TFeatureExtractor())

    @torch.no_grad()
    def encode_text(
        self, texts: list[str], generators: list[torch.Generator] | None = None, cps=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tower states; ``generators`` and ``cps`` are ignored (the tower is deterministic)."""
        batch = self.tokenizer(texts, padding="longest", padding_side="right", return_tensors="pt")
        device = self.text_encoder.layer_norm.weight.device
        valid = batch["attention_mask"].to(device).bool()
        states = self.text_encoder(input_ids=batch["input_ids"].to(device), attention_mask=valid).last_hidden_state
        return states.masked_fill(~valid[..., None], 0.0), valid.sum(1)

    @torch.no_grad()
    def encode_speech(self, waveforms: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Speech tower states at 160 ms per frame (10 ms fbanks, stacked by 2, adaptor stride 8)."""
        min_samples = 400 + 160  # two 25 ms fbank frames at a 10 ms hop make the first stacked frame
        for w in waveforms:
            if w.dim() != 1 or w.shape[0] < min_samples:
                raise ValueError(f"expected 1-D waveforms of at least {min_samples} samples, got shape {tuple(w.shape)}")
        # The extractor normalises each clip on its own, then zero-pads: batching does not change it.
        batch = self.feature_extractor(
            [w.detach().float().cpu().numpy() for w in waveforms], sampling_rate=self.sample_rate,
            padding="longest", return_tensors="pt",
        )
        param = self.speech_encoder.inner_layer_norm.weight
        features = batch["input_features"].to(param)
        lengths = batch["attention_mask"].to(param.device).sum(1)
        return self.forward_features(features, lengths)

    def forward_features(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``SeamlessM4Tv2SpeechEncoder.forward`` on (B, T, 160) stacked fbanks, padding masked.

        The conformer already masks padding (and its depthwise conv is causal, so right padding
        cannot reach valid frames); the adaptor's strided convs do not, hence the re-implementation.
        """
        tower = self.speech_encoder
        x = tower.feature_projection(features)
        x = tower.encoder(x, attention_mask=lengths_to_mask(lengths, x.shape[1]))
        x = x + 0.5 * tower.intermediate_ffn(x)
        if tower.adapter is not None:
            for layer in tower.adapter.layers:
                x, lengths = self._adapter_layer(layer, x, lengths)
        x = tower.inner_layer_norm(x)
        return x.masked_fill(~lengths_to_mask(lengths, x.shape[1])[..., None], 0.0), lengths

    @staticmethod
    def _adapter_layer(
        layer: SeamlessM4Tv2ConformerAdapterLayer, x: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``SeamlessM4Tv2ConformerAdapterLayer.forward`` (eval: dropout is the identity) with the
        conv inputs zeroed beyond each length, as a clip alone sees only the conv's zero padding."""
        padded = ~lengths_to_mask(lengths, x.shape[1])[..., None]
        residual = layer.residual_layer_norm(x).masked_fill(padded, 0.0)
        residual = layer.activation(layer.residual_conv(residual.transpose(1, 2))).transpose(1, 2)
        h = layer.self_attn_layer_norm(x).masked_fill(padded, 0.0)
        h = layer.activation(layer.self_attn_conv(h.transpose(1, 2))).transpose(1, 2)
        # The model's own length rule, floor((L + 2 * (kernel // 2) - kernel) / stride + 1).
        lengths = layer._compute_sub_sample_lengths_from_attention_mask(padded[..., 0].logical_not()).long()
        valid = lengths_to_mask(lengths, h.shape[1])
        attention_mask = create_bidirectional_mask(config=layer.config, inputs_embeds=h, attention_mask=valid)
        h, _ = layer.self_attn(h, attention_mask=attention_mask)
        h = h + residual
        h = layer.ffn(layer.ffn_layer_norm(h)) + h
        return h, lengths


def build_dual_tower_encoder(cfg: EncoderConfig) -> DualTowerEncoder:
    """From a SeamlessM4Tv2 checkpoint, or random towers with a character tokenizer (tests)."""
    if cfg.from_config is not None:
        from speechllm.llm import build_char_tokenizer

        alphabet = "".join(plain(cfg.vocab)) if cfg.vocab else LLMConfig.char_alphabet
        return DualTowerEncoder.from_config(plain(cfg.from_config), seed=cfg.init_seed, tokenizer=build_char_tokenizer(alphabet))
    if not cfg.pretrained:
        raise ValueError("encoder: set `pretrained` (Hub id or path) or `from_config`")
    return DualTowerEncoder.from_pretrained(cfg.pretrained)
