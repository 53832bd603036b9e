"""Learning-rate schedules against hand computations; optimiser parameter groups; 8-bit AdamW."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from lightning_modules.base import lr_lambda
from speechllm.config import OptimConfig, StageConfig


def test_warmup_then_cosine():
    f = lr_lambda(OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.0), max_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)  # half way through the cosine
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    assert f(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 25 / 100)))


def test_warmup_stable_decay():
    f = lr_lambda(OptimConfig(warmup_steps=5, schedule="wsd", decay_fraction=0.2), max_steps=100)
    assert f(4) == pytest.approx(1.0) and f(50) == 1.0 and f(80) == pytest.approx(1.0)
    assert f(90) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_param_groups_and_adamw8bit(tiny_model_cfg):
    from lightning_modules.alignment import AlignModule

    cfg = OmegaConf.structured(StageConfig)
    cfg.model = tiny_model_cfg
    cfg.model.llm.lora.enabled = True
    cfg.optim.optimizer, cfg.optim.lr, cfg.optim.lr_llm = "adamw8bit", 1e-3, 1e-4
    module = AlignModule(cfg)
    opt = module.configure_optimizers()["optimizer"]
    assert type(opt).__name__ == "AdamW8bit"
    lrs = {g["name"]: g["initial_lr"] for g in opt.param_groups}  # "lr" already has the warm-up factor
    assert lrs == {"projector": 1e-3, "llm": 1e-4}
    feats, lengths = module.model.encoder.encode_text(["the cat"])
    before = module.model.projector.fc1.weight.detach().clone()
    module.model(feats, lengths, module.model.target_ids(["the cat"]))["loss"].backward()
    opt.step()
    assert not torch.equal(before, module.model.projector.fc1.weight)


def test_four_bit_llm_with_lora_trains(tmp_path, tiny_model_cfg):
    """QLoRA path on the CPU: a saved tiny Llama loaded in NF4, LoRA on top, one backward pass."""
    from speechllm.llm import build_llm
    from speechllm.model import SpeechLLM

    llm, tok = build_llm(tiny_model_cfg.llm)
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    cfg = tiny_model_cfg
    cfg.llm.from_config, cfg.llm.pretrained = None, str(tmp_path / "llm")
    cfg.llm.load_in_4bit = True
    cfg.llm.lora.enabled = True
    model = SpeechLLM.build(cfg)
    assert any("4bit" in type(m).__name__ for m in model.llm.modules())
    feats, lengths = model.encoder.encode_text(["we go"])
    loss = model(feats, lengths, model.target_ids(["we go"]))["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
