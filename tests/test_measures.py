"""Misalignment and forgetting, and the distillation teacher: the original LLM, never the adapters."""

import torch
from omegaconf import OmegaConf

from speechllm.interleave import Span
from speechllm.llm import build_llm
from speechllm.measures import misalignment_forgetting
from speechllm.model import SpeechLLM
from speechllm.sequences import Views, span_rows


def lora_model(cfg):
    model = SpeechLLM.build(OmegaConf.merge(cfg, {"llm": {"lora": {"enabled": True, "target_modules": ["q_proj", "v_proj"]}}}))
    return model.eval()  # measures run in eval mode (no LoRA dropout)


def perturb_lora(model, scale=0.5):
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale, generator=torch.Generator().manual_seed(len(name)))


def test_teacher_forward_bypasses_lora(tiny_model_cfg):
    model = lora_model(tiny_model_cfg)
    perturb_lora(model)
    base, _ = build_llm(tiny_model_cfg.llm)  # same config and seed, no LoRA: the original LLM
    ids = torch.tensor([[5, 9, 12, 7, 20]])
    with torch.no_grad(), model.original_llm() as teacher:
        teacher_logits = teacher(input_ids=ids).logits
    torch.testing.assert_close(teacher_logits, base(input_ids=ids).logits)
    adapted = model.llm(input_ids=ids).logits
    assert (adapted - teacher_logits).abs().max() > 1e-3  # the adapters do change the student


PLANS = [[Span("text", 0, 1, "the big dog", None, None), Span("speech", 1, 2, "sat on", 0, 1),
          Span("text", 2, 3, "the red mat now", None, None)],
         [Span("speech", 0, 1, "we", 0, 1), Span("text", 1, 2, "go home then", None, None)]]


def measures(model, speech):
    """Per-item M (text vs speech context, same model) and F (original vs adapted, on text)."""
    lengths = [len(model.tokenizer((" " if j else "") + s.text, add_special_tokens=False).input_ids)
               for plan in PLANS for j, s in enumerate(plan) if s.kind == "speech"]
    views = Views(*span_rows(model, PLANS, lengths), speech(lengths), *span_rows(model, PLANS, None),
                  *span_rows(model, PLANS, None, label_all=True))
    rows = misalignment_forgetting(model, views)
    m = torch.tensor([r["m_sum"] / r["m_count"] for r in rows])
    f = torch.tensor([r["f_sum"] / r["f_count"] for r in rows])
    assert all(r["m_count"] > 0 and r["f_count"] > r["m_count"] for r in rows)
    return m, f


def token_embeddings(model):
    """'Speech' that is exactly the LLM's embedding of each speech span's words."""
    def speech(lengths):
        rows = [model.tokenizer((" " if j else "") + s.text, add_special_tokens=False).input_ids
                for plan in PLANS for j, s in enumerate(plan) if s.kind == "speech"]
        return model.llm.get_input_embeddings()(torch.tensor([t for r in rows for t in r]))
    return speech


@torch.no_grad()
def test_m_and_f_are_zero_for_a_model_compared_with_itself(tiny_model_cfg):
    model = lora_model(tiny_model_cfg)
    perturb_lora(model)
    m, _ = measures(model, token_embeddings(model))
    assert m.abs().max() < 1e-5  # the speech slots hold the text's own embeddings
    fresh = lora_model(tiny_model_cfg)  # LoRA's B starts at zero: adapted == original
    _, f = measures(fresh, token_embeddings(fresh))
    assert f.abs().max() < 1e-6


@torch.no_grad()
def test_m_and_f_grow_when_the_views_differ(tiny_model_cfg):
    model = lora_model(tiny_model_cfg)
    perturb_lora(model)
    noise = lambda lengths: torch.randn(sum(lengths), 64, generator=torch.Generator().manual_seed(0))  # noqa: E731
    m, f = measures(model, noise)
    assert m.mean() > 1e-3 and f.mean() > 1e-3
    assert (m >= -1e-6).all() and (f >= -1e-6).all()  # KL is never negative
