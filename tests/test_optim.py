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
    big, small = module.model.projector.fc2.weight, module.model.projector.fc1.weight
    # bitsandbytes keeps 32-bit state for parameters under 4,096 elements: step one above that.
    assert big.numel() >= 4096 > small.numel()
    feats, lengths = module.model.encoder.encode_text(["the cat"])
    before = big.detach().clone()
    module.model(feats, lengths, module.model.target_ids(["the cat"]))["loss"].backward()
    opt.step()
    assert not torch.equal(before, big)
    state = opt.state[big]
    assert state["state1"].dtype == state["state2"].dtype == torch.uint8  # the moments are 8-bit
    assert opt.state[small]["state1"].dtype == torch.float32  # below the threshold: 32-bit
    # ... and they hold AdamW's moments after one step, (1 - beta1) g and (1 - beta2) g^2, to 8-bit precision.
    import bitsandbytes.functional as bnbf

    beta1, beta2 = cfg.optim.betas
    for key, want in (("1", (1 - beta1) * big.grad), ("2", (1 - beta2) * big.grad**2)):
        blocksize = big.numel() // state[f"absmax{key}"].numel()
        got = bnbf.dequantize_blockwise(state[f"state{key}"], absmax=state[f"absmax{key}"], code=state[f"qmap{key}"],
                                        blocksize=blocksize)
        assert (got - want).abs().max() < 0.02 * want.abs().max(), key


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
