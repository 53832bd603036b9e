"""DualTowerEncoder on tiny random SeamlessM4Tv2 towers: lengths and faithfulness (the contract every
encoder passes, batch invariance included, is tests/encoders/test_contract.py)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import (
    PreTrainedTokenizerFast,
    SeamlessM4TFeatureExtractor,
    SeamlessM4Tv2Config,
    SeamlessM4Tv2Model,
)

from speechllm.config import EncoderConfig
from speechllm.encoders import build_encoder
from speechllm.encoders.dual_tower import DualTowerEncoder

SR = 16000
TINY = {
    "hidden_size": 32,
    "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
    "speech_encoder_layers": 2, "speech_encoder_attention_heads": 2, "speech_encoder_intermediate_size": 64,
    "conv_depthwise_kernel_size": 5, "left_max_position_embeddings": 8, "right_max_position_embeddings": 2,
}
# What else must shrink to build (and save) a whole tiny SeamlessM4Tv2Model checkpoint.
TINY_REST = {
    "decoder_layers": 1, "decoder_attention_heads": 2, "decoder_ffn_dim": 64,
    "t2u_vocab_size": 16, "char_vocab_size": 16, "t2u_encoder_layers": 1, "t2u_decoder_layers": 1,
    "t2u_encoder_ffn_dim": 32, "t2u_decoder_ffn_dim": 32, "t2u_encoder_attention_heads": 2,
    "t2u_decoder_attention_heads": 2, "t2u_variance_predictor_embed_dim": 16, "t2u_variance_predictor_hidden_dim": 16,
    "upsample_initial_channel": 64, "unit_embed_dim": 16, "lang_embed_dim": 4, "spkr_embed_dim": 4,
    "unit_hifi_gan_vocab_size": 16, "t2u_max_position_embeddings": 64,
}
# 32, 17, 25 and 9 stacked frames: 35 fbanks is odd, so that clip carries a padded pair even alone,
# and 17, 25 and 9 end in the first half of the adaptor's last stride-8 window (L % 8 < 4), which
# then reads past the clip: padding there would leak into valid frames unless masked.
SPEECH_FBANKS = [64, 35, 50, 19]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Characters as tokens, pad/unk/bos/eos at Seamless's ids 0-3, "<s> text </s>" like Seamless."""
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(" abcdefghijklmnopqrstuvwxyz'.,?!"))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def fbank_clip(n_fbanks: int, seed: int) -> torch.Tensor:
    """A clip giving exactly n_fbanks 25 ms / 10 ms fbank frames (the extractor stacks them in pairs)."""
    return 0.1 * torch.randn(400 + 160 * (n_fbanks - 1), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def encoder() -> DualTowerEncoder:
    return DualTowerEncoder.from_config(TINY, seed=0, tokenizer=char_tokenizer())


def test_speech_lengths_follow_the_adaptor_stride(encoder):
    feats, lengths = encoder.encode_speech([fbank_clip(n, i) for i, n in enumerate(SPEECH_FBANKS)])
    assert lengths.tolist() == [5, 3, 4, 2]  # floor(stacked / 8) + 1
    assert feats.shape == (4, 5, 32)


def test_speech_matches_stock_forward_without_padding(encoder):
    wave = fbank_clip(64, 7)  # even fbank count: no padding at all, so the stock forward is exact
    batch = encoder.feature_extractor([wave.numpy()], sampling_rate=SR, return_tensors="pt")
    assert batch["attention_mask"].all()
    with torch.no_grad():
        stock = encoder.speech_encoder(input_features=batch["input_features"]).last_hidden_state
    feats, lengths = encoder.encode_speech([wave])
    assert lengths.tolist() == [stock.shape[1]]
    torch.testing.assert_close(feats, stock, atol=1e-5, rtol=1e-5)


def test_text_lengths_count_the_tokenizer_specials(encoder):
    texts = ["hello world", "hi", "a somewhat longer sentence, isn't it?"]
    feats, lengths = encoder.encode_text(texts, generators=[torch.Generator() for _ in texts])
    assert lengths.tolist() == [len(t) + 2 for t in texts]  # + <s> and </s>
    assert feats.shape == (3, max(lengths), 32)


def test_eager_attention_is_refused():
    with pytest.raises(ValueError, match="only 'sdpa'"):
        DualTowerEncoder.from_config({**TINY, "attn_implementation": "eager"}, seed=0, tokenizer=char_tokenizer())


def test_from_pretrained_loads_only_the_towers(tmp_path):
    tokenizer = char_tokenizer()
    model = SeamlessM4Tv2Model(SeamlessM4Tv2Config(**TINY, **TINY_REST, vocab_size=len(tokenizer)))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    SeamlessM4TFeatureExtractor().save_pretrained(tmp_path)
    loaded = DualTowerEncoder.from_pretrained(tmp_path)
    for mine, theirs in [(loaded.text_encoder, model.text_encoder), (loaded.speech_encoder, model.speech_encoder)]:
        expected = theirs.state_dict()
        assert mine.state_dict().keys() == expected.keys()
        for name, tensor in mine.state_dict().items():
            assert torch.equal(tensor, expected[name]), name
    assert {name for name, _ in loaded.named_children()} == {"text_encoder", "speech_encoder"}
    assert loaded.encode_text(["hi"])[0].shape == (1, 4, 32)


def test_build_encoder_from_config():
    built = build_encoder(EncoderConfig(kind="dual_tower", from_config=TINY, init_seed=3))
    assert isinstance(built, DualTowerEncoder)
    feats, lengths = built.encode_text(["abc"])
    assert lengths.tolist() == [3] and feats.shape == (1, 3, 32)
