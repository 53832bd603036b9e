"""The papers' recipes (configs/pipeline/*_paper.yaml): every stage resolves through the validation pass
with its Hub ids (nothing is downloaded, no data file needs to exist), keeps the papers' values, and
builds at tiny size with the same model families; the memory/time estimator's formulas."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from speechllm.model import SpeechLLM
from stages import estimate as est
from stages.runner import resolve_stage_configs

REPO = Path(__file__).resolve().parents[1]
RECIPES = {p.stem: p for p in sorted((REPO / "configs" / "pipeline").glob("*_paper.yaml"))}
STAGES = {"tasu_paper": ["align", "asr"], "salad_paper": ["distill", "select"], "tesu_paper": ["align"]}

TINY_LLM = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}
VOCAB = ["<blank>", " ", *"abcdefghijklmnopqrstuvwxyz", "'"]
TINY_ENCODERS = {  # the same families as the recipes' Hub encoders, at tiny size
    "ctc": {"pretrained": None, "vocab": VOCAB, "blank_id": 0, "from_config": {
        "model_type": "parakeet_ctc", "encoder_config": {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "subsampling_conv_channels": 8, "conv_kernel_size": 3}}},
    "whisper": {"pretrained": None, "from_config": {
        "d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "num_mel_bins": 128}},
    "dual_tower": {"pretrained": None, "from_config": {
        "hidden_size": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
        "speech_encoder_layers": 1, "speech_encoder_attention_heads": 2, "speech_encoder_intermediate_size": 64,
        "conv_depthwise_kernel_size": 3, "decoder_layers": 1, "decoder_attention_heads": 2, "decoder_ffn_dim": 64,
        "t2u_encoder_layers": 1, "t2u_decoder_layers": 1, "upsample_initial_channel": 64}},
}


def tiny_overrides(kind: str) -> list[str]:
    """key=value overrides that turn a recipe's Hub models into the same families at tiny size."""
    out = ["model.llm.pretrained=null", "model.llm.dtype=float32", f"model.llm.from_config={json.dumps(TINY_LLM)}",
           "model.projector.hidden_dim=64", "model.generation.num_beams=1", "model.generation.max_new_tokens=4"]
    for key, value in TINY_ENCODERS[kind].items():
        out.append(f"model.encoder.{key}={json.dumps(value)}")
    return out


def test_every_recipe_is_tested():
    assert set(RECIPES) == set(STAGES)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_recipe_resolves_with_its_hub_ids(name):
    stages = resolve_stage_configs(RECIPES[name], [])  # the validation pass runs on every stage
    assert [s for s, _, cfg in stages if cfg.enabled] == STAGES[name]
    for _, _, cfg in stages:
        for model_id in (cfg.model.llm.pretrained, cfg.model.encoder.pretrained):
            assert model_id and not model_id.startswith((".", "/")) and "/" in model_id  # Hub ids, no local asset
        assert cfg.model.llm.from_config is None and cfg.model.encoder.from_config is None


@pytest.mark.parametrize("name", sorted(STAGES))
def test_recipe_builds_at_tiny_size(name, tmp_path):
    kind = resolve_stage_configs(RECIPES[name], [])[0][2].model.encoder.kind
    stages = resolve_stage_configs(RECIPES[name], tiny_overrides(kind), run_dir=str(tmp_path))
    for stage, _, cfg in stages:
        torch.manual_seed(0)
        model = SpeechLLM.build(cfg.model)
        if cfg.kind == "align":
            feats, lengths = model.encoder.encode_text(["hello there", "ok"])
        else:
            feats, lengths = model.encoder.encode_speech([torch.randn(16000) * 0.1, torch.randn(12000) * 0.1])
        out = model(feats, lengths, model.target_ids(["hello there", "ok"]))
        out["loss"].backward()
        assert torch.isfinite(out["loss"]), stage
        assert model.projector.fc1.weight.grad is not None
        llm_trained = any(p.requires_grad for p in model.llm.parameters())
        assert llm_trained == (not cfg.model.llm.freeze or cfg.model.llm.lora.enabled), stage
        assert model.projector.fc1.in_features == model.encoder.output_dim * cfg.model.projector.stack_frames


def _stage(name: str, stage: str, overrides: list[str] | None = None):
    return next(cfg for s, _, cfg in resolve_stage_configs(RECIPES[name], overrides or []) if s == stage)


def test_tasu_recipe_keeps_the_papers_values():
    for stage in ("align", "asr"):
        cfg = _stage("tasu_paper", stage)
        assert cfg.model.llm.pretrained == "Qwen/Qwen2.5-1.5B-Instruct" and cfg.model.llm.freeze
        assert not cfg.model.llm.lora.enabled and cfg.model.projector.hidden_dim == 2048
        assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule, cfg.optim.weight_decay) == (5e-5, 200, "cosine", 0.0)
        assert list(cfg.optim.betas) == [0.9, 0.999] and cfg.optim.eps == 1e-6 and cfg.trainer.max_steps == 15000
        assert cfg.model.generation.num_beams == 4 and cfg.model.generation.max_new_tokens == 200
        assert cfg.data.batching.max_seconds == 180 and cfg.trainer.devices == 8
        assert cfg.model.encoder.cps.keep_prob == 0.95 and cfg.model.encoder.cps.smoothing_max == 0.1
        assert set(cfg.data.test) == {"test_clean", "test_other"} and cfg.data.wer_normalizer == "tasu"
    align, asr = _stage("tasu_paper", "align"), _stage("tasu_paper", "asr")
    assert align.data.train == "data/librispeech/lm-text.jsonl" and align.trainer.evaluate_before_training
    assert asr.init_from.endswith("tasu_paper/align/model")
    assert asr.data.sources.speech.manifest == "data/librispeech/train-960.jsonl"


def test_salad_recipe_keeps_the_papers_values():
    distill, select = _stage("salad_paper", "distill"), _stage("salad_paper", "select")
    for cfg in (distill, select):
        llm = cfg.model.llm
        assert llm.pretrained == "Qwen/Qwen2.5-3B" and not llm.freeze and not llm.lora.enabled
        assert cfg.trainer.strategy == "fsdp" and cfg.distill.alpha == 1.0
        assert (cfg.optim.lr, cfg.optim.lr_llm, cfg.optim.weight_decay, cfg.optim.schedule) == (1e-3, 5e-5, 0.1, "wsd")
        assert list(cfg.distill.text_span_words) == [10, 30] and list(cfg.distill.speech_span_words) == [5, 15]
    assert distill.optim.warmup_steps == 500 and distill.trainer.max_steps == 24000
    assert {n: s.share.start for n, s in distill.data.sources.items()} == {"speech": 2.0, "text": 1.0}
    assert select.trainer.max_steps == 1900 and select.optim.decay_fraction == 1.0 and select.optim.warmup_steps == 0
    assert {n: s.share.start for n, s in select.data.sources.items()} == {"natural": 1.0, "synthetic": 1.0, "text": 1.0}
    sel = select.selection
    assert (sel.embedder, sel.clusters, sel.balanced, sel.gamma) == ("BAAI/bge-large-en-v1.5", 128, True, 5.0)
    assert (sel.budget_unit, sel.budget) == ("fraction", 0.01)
    assert list(sel.voices) == ["transformers:facebook/mms-tts-eng"] and "fineweb-edu" in sel.pool
    # about 1 M positions a step (SALAD's batch), by the estimator's row model
    assert 0.9e6 < est.estimate_stage("distill", distill).positions_per_step < 1.2e6


def test_tesu_recipe_uses_the_unified_encoder_on_text_only():
    cfg = _stage("tesu_paper", "align")
    assert cfg.model.encoder.kind == "dual_tower" and cfg.model.encoder.pretrained == "facebook/seamless-m4t-v2-large"
    assert cfg.kind == "align" and not cfg.data.sources and cfg.data.train.endswith("lm-text.jsonl")
    assert "cv_test" in cfg.data.test


# ------------------------------------------------------------------------------- the estimator


@pytest.mark.parametrize("hub_id", sorted(est.LLM_SHAPES))
def test_llm_parameter_formula_equals_transformers_count(hub_id):
    from transformers import AutoModelForCausalLM, Qwen2Config

    s = est.LLM_SHAPES[hub_id]
    cfg = Qwen2Config(hidden_size=s.hidden, num_hidden_layers=s.layers, intermediate_size=s.intermediate,
                      num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, vocab_size=s.vocab,
                      tie_word_embeddings=s.tied)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert s.params() == sum(p.numel() for p in model.parameters())
    assert s.body_params() == sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n
                                  and "lm_head" not in n)


def test_shapes_match_the_published_sizes():
    published = {"Qwen/Qwen2.5-1.5B": 1.54e9, "Qwen/Qwen2.5-3B": 3.09e9, "Qwen/Qwen2.5-7B": 7.61e9}
    for hub_id, size in published.items():
        assert abs(est.LLM_SHAPES[hub_id].params() / size - 1) < 0.01, hub_id
    assert abs(est.ENCODER_SHAPES["nvidia/parakeet-ctc-1.1b"].counts()["speech"] / 1.1e9 - 1) < 0.05
    # Whisper large-v3: 1.55 B in all, the encoder about 0.64 B of it
    assert abs(est.ENCODER_SHAPES["openai/whisper-large-v3"].counts()["speech"] / 0.637e9 - 1) < 0.01


def test_lora_parameter_formula_equals_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = {k: v for k, v in TINY_LLM.items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(Qwen2Config(**cfg, vocab_size=100))
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    shape = est.LLMShape(32, 2, 64, 4, 2, 100, tied=False)
    assert shape.lora_params(4, targets) == trained


def test_memory_follows_the_stated_bytes_per_parameter():
    """SALAD's stage I by the documented rule: 16 bytes per trained float32 parameter, 4 per frozen
    float32 parameter (teacher, encoder), all but the encoder's divided by the FSDP devices, plus two gathered
    layers."""
    cfg = _stage("salad_paper", "distill")
    e = est.estimate_stage("distill", cfg)
    llm = est.LLM_SHAPES["Qwen/Qwen2.5-3B"]
    p = e.params
    sharded = ((llm.params() + p["projector"]) * 16 + llm.params() * 4) / 64
    expected = sharded + 2 * llm.layer_params() * 4 + p["encoder"] * 4
    assert e.memory_gib["weights_states"] == pytest.approx(expected / est.GIB)
    # DDP keeps it all on every device; bf16 frozen LLM with LoRA (TASU2's stage 2): 2 bytes per LLM weight
    ddp = est.estimate_stage("distill", _stage("salad_paper", "distill", ["trainer.strategy=ddp"]))
    assert ddp.memory_gib["weights_states"] == pytest.approx((sharded * 64 + p["encoder"] * 4) / est.GIB)
    asr = _stage("tasu_paper", "asr", ["model.llm.lora.enabled=true"])
    lora = est.estimate_stage("asr", asr)
    tasu_llm = est.LLM_SHAPES["Qwen/Qwen2.5-1.5B-Instruct"]
    assert lora.params["lora"] == tasu_llm.lora_params(16, ["q_proj", "v_proj"])
    assert lora.memory_gib["weights_states"] == pytest.approx(
        ((lora.params["projector"] + lora.params["lora"]) * 16 + tasu_llm.params() * 2 + lora.params["encoder"] * 4) / est.GIB)


def test_activation_checkpointing_keeps_only_layer_inputs():
    on = est.estimate_stage("distill", _stage("salad_paper", "distill"))
    off = est.estimate_stage("distill", _stage("salad_paper", "distill", ["model.llm.gradient_checkpointing=false"]))
    llm = est.LLM_SHAPES["Qwen/Qwen2.5-3B"]
    h, kv, i, L = llm.hidden, llm.kv_dim, llm.intermediate, llm.layers
    full_layer = 2 * h * 4 + 2 * (4 * h + 2 * kv + 4 * i)  # float32 residual stream, bf16 autocast
    assert off.memory_gib["activations"] / on.memory_gib["activations"] == pytest.approx(
        L * full_layer / (L * h * 4 + full_layer))
    assert on.flops_per_step > off.flops_per_step  # one more forward


def test_time_of_a_text_only_stage_by_hand():
    """TASU's align stage: simulated rows only (no encoder runs), a frozen LLM that gradients pass through."""
    cfg = _stage("tasu_paper", "align")
    rows = est.RowModel()
    e = est.estimate_stage("align", cfg, rows)
    llm = est.LLM_SHAPES["Qwen/Qwen2.5-1.5B-Instruct"]
    target = rows.text_words * rows.tokens_per_word + 1
    vectors = rows.text_words * rows.units_per_word * 0.95
    positions = rows.prompt_tokens + vectors + target
    per_device = min(64, int(640 // target))
    projector = 2 * 1025 + 1025 * 2048 + 2048 + 2048 * 1536 + 1536
    per_row = (positions * (4 * llm.body_params() + 3 * 2 * llm.layers * llm.hidden * positions)
               + target * 3 * 2 * llm.vocab * llm.hidden + 6 * projector * vectors)
    flops = per_device * 8 * per_row
    assert e.params["projector"] == projector and e.rows_per_step == per_device * 8
    assert e.flops_per_step == pytest.approx(flops)
    assert e.hours_per_1k == pytest.approx(1000 * flops / (8 * 989e12 * 0.40) / 3600)
    slower = est.estimate_stage("align", cfg, rows, est.Hardware(mfu=0.2))
    assert slower.hours_per_1k == pytest.approx(2 * e.hours_per_1k)


def test_estimate_command_prints_every_stage(capsys):
    from stages.__main__ import main

    for name, stages in STAGES.items():
        assert main(["estimate", str(RECIPES[name]), "--mfu", "0.3"]) == 0
        out = capsys.readouterr().out
        assert "Estimates, not measurements" in out and "MFU 30%" in out
        for stage in stages:
            assert f"| {stage} |" in out
    assert not math.isnan(est.estimate_stage("select", _stage("salad_paper", "select")).hours_per_1k)
