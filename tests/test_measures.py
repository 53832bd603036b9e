"""Misalignment and forgetting, and the distillation teacher: the original LLM, never the adapters."""

import torch
from omegaconf import OmegaConf

from speechllm.interleave import Span
from speechllm.llm import build_llm
from speechllm.measures import positionwise_kl
from speechllm.model import SpeechLLM
from speechllm.sequences import span_rows


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
    """M (text vs speech context, same model) and F (original vs adapted, on text), per position."""
    lengths = [len(model.tokenizer((" " if j else "") + s.text, add_special_tokens=False).input_ids)
               for plan in PLANS for j, s in enumerate(plan) if s.kind == "speech"]
    s_rows, s_labels = span_rows(model, PLANS, lengths)
    t_rows, t_labels = span_rows(model, PLANS, None)
    h_speech, _ = model.labelled_hidden(s_rows, s_labels, speech(lengths))
    h_text, _ = model.labelled_hidden(t_rows, t_labels)
    m = positionwise_kl(model, h_text, h_speech, teacher_is_original=False)
    f_rows, f_labels = span_rows(model, PLANS, None, label_all=True)
    h_adapted, _ = model.labelled_hidden(f_rows, f_labels)
    with model.original_llm() as original:
        h_original, _ = model.labelled_hidden(f_rows, f_labels, llm=original)
    return m, positionwise_kl(model, h_original, h_adapted, teacher_is_original=True)


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
    assert m.numel() > 10 and m.abs().max() < 1e-5  # the speech slots hold the text's own embeddings
    fresh = lora_model(tiny_model_cfg)  # LoRA's B starts at zero: adapted == original
    _, f = measures(fresh, token_embeddings(fresh))
    assert f.numel() > 10 and f.abs().max() < 1e-6


@torch.no_grad()
def test_m_and_f_grow_when_the_views_differ(tiny_model_cfg):
    model = lora_model(tiny_model_cfg)
    perturb_lora(model)
    noise = lambda lengths: torch.randn(sum(lengths), 64, generator=torch.Generator().manual_seed(0))  # noqa: E731
    m, f = measures(model, noise)
    assert m.mean() > 1e-3 and f.mean() > 1e-3
    assert (m >= -1e-6).all() and (f >= -1e-6).all()  # KL is never negative
