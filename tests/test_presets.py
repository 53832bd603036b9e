"""Each shipped model preset builds with its own architecture at tiny dimensions.

The presets name Hub ids or asset paths that cannot be loaded here, so each is rebuilt with the
same model families from tiny configs (random weights), then one training step and one
generation run through the real code paths.
"""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from speechllm.config import ModelConfig
from speechllm.model import SpeechLLM

REPO = Path(__file__).resolve().parents[1]
TINY_LLM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 1024}
VOCAB = ["<blank>", " ", *"abcdefghijklmnopqrstuvwxyz", "'"]


def load_preset(name: str):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(REPO / "configs/model" / f"{name}.yaml").model)


def tiny_whisper_dir(tmp_path: Path) -> Path:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    cfg = WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=51864)
    WhisperForConditionalGeneration(cfg).save_pretrained(tmp_path / "whisper")
    WhisperFeatureExtractor().save_pretrained(tmp_path / "whisper")
    return tmp_path / "whisper"


def shrink(name: str, cfg, tmp_path: Path):
    """Replace Hub ids / asset paths by the same architectures at tiny size."""
    enc, llm = cfg.encoder, cfg.llm
    if name == "tasu_paper":
        enc.pretrained, enc.vocab, enc.blank_id = None, VOCAB, 0
        enc.from_config = {"model_type": "parakeet_ctc", "encoder_config": {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "subsampling_conv_channels": 8, "conv_kernel_size": 3}}
        llm_type = "qwen2"
    elif name == "tesu":
        enc.pretrained, enc.vocab = None, None
        enc.from_config = {"hidden_size": 32, "encoder_layers": 1, "encoder_attention_heads": 2,
                           "encoder_ffn_dim": 64, "speech_encoder_layers": 1, "speech_encoder_attention_heads": 2,
                           "speech_encoder_intermediate_size": 64, "conv_depthwise_kernel_size": 3,
                           "decoder_layers": 1, "decoder_attention_heads": 2, "decoder_ffn_dim": 64,
                           "t2u_encoder_layers": 1, "t2u_decoder_layers": 1, "upsample_initial_channel": 64}
        llm_type = "qwen2"
    elif name == "demo":
        from speechllm.encoders.ctc import CTCHead

        enc.pretrained = str(tiny_whisper_dir(tmp_path))
        CTCHead(32, VOCAB, 0, kind="bilstm", hidden=16).save(tmp_path / "head")
        enc.ctc_head = str(tmp_path / "head")
        enc.text_side = "cps"  # the posterior statistics are measured by `make demo` (tested in test_posterior_stats)
        llm_type = "llama"  # SmolLM2 is a Llama
    else:
        raise AssertionError(f"add a tiny variant for the new preset {name!r}")
    llm.pretrained, llm.dtype = None, "float32"
    llm.from_config = {"model_type": llm_type, **TINY_LLM}
    cfg.projector.hidden_dim = 64
    cfg.generation.max_new_tokens, cfg.generation.num_beams = 4, min(cfg.generation.num_beams, 2)
    return cfg


PRESETS = sorted(p.stem for p in (REPO / "configs/model").glob("*.yaml") if p.stem != "tiny")


@pytest.mark.parametrize("name", PRESETS)
def test_preset_architecture_at_tiny_size(name, tmp_path):
    model = SpeechLLM.build(shrink(name, load_preset(name), tmp_path))
    feats, lengths = model.encoder.encode_text(["hello there", "ok"])
    out = model(feats, lengths, model.target_ids(["hello there", "ok"]))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.projector.fc1.weight.grad is not None
    hyps = model.transcribe([torch.randn(16000) * 0.1, torch.randn(12000) * 0.1])
    assert len(hyps) == 2
