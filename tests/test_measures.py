"""Misalignment and forgetting, and the distillation teacher: the original LLM, never the adapters."""

import pytest
import torch
from hand_reference import sharpen
from omegaconf import OmegaConf

from lightning_modules.evaluation import summarise
from speechllm.interleave import Span
from speechllm.llm import build_llm
from speechllm.measures import misalignment_forgetting, multiple_choice
from speechllm.model import SPEECH, SpeechLLM
from speechllm.sequences import Views, span_rows


def lora_model(cfg):
    torch.manual_seed(0)  # LoRA's A matrices start random
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


def build_views(model, speech) -> Views:
    """The PLANS seen three ways: the student hears ``speech(lengths)`` in the speech spans, the teacher
    reads them, and the all-text view labels every token."""
    lengths = [len(model.tokenizer((" " if j else "") + s.text, add_special_tokens=False).input_ids)
               for plan in PLANS for j, s in enumerate(plan) if s.kind == "speech"]
    return Views(*span_rows(model, PLANS, lengths), speech(lengths), *span_rows(model, PLANS, None),
                 *span_rows(model, PLANS, None, label_all=True))


def measures(model, speech):
    """Per-item M (text vs speech context, same model) and F (original vs adapted, on text)."""
    views = speech if isinstance(speech, Views) else build_views(model, speech)
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


def noise(lengths: list[int]) -> torch.Tensor:
    return torch.randn(sum(lengths), 64, generator=torch.Generator().manual_seed(0))


def logits_one_row(llm, row: list[int], speech_vectors: list[torch.Tensor]) -> torch.Tensor:
    """(len(row), V) logits of one row on its own (no padding); SPEECH slots take the next vectors."""
    table = llm.get_input_embeddings().weight
    embeds = torch.stack([speech_vectors.pop(0) if t == SPEECH else table[t] for t in row])
    return llm(inputs_embeds=embeds[None]).logits[0].double()


def kl_by_hand(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per position sum_v p_v (log p_v - log q_v), p and q from full logits."""
    log_p, log_q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def reference_measures(model, original_llm, views) -> tuple[list[float], list[float], list[float]]:
    """Per-item M and F from full-logit forwards of each row alone: M = KL(text view || speech view)
    of the same model at the student's labelled positions, F = KL(original || adapted) on text; and
    the wrong-way M, KL(speech view || text view)."""
    speech = list(views.speech)
    m_items, reverse_items, f_items = [], [], []
    for s_row, s_lab, t_row, t_lab, x_row, x_lab in zip(views.student_rows, views.student_labels, views.teacher_rows,
                                                        views.teacher_labels, views.text_rows, views.text_labels):
        s_logits = logits_one_row(model.llm, s_row, speech)
        t_logits = logits_one_row(model.llm, t_row, [])
        s_pos = [t - 1 for t in range(1, len(s_lab)) if s_lab[t] >= 0]
        t_pos = [t - 1 for t in range(1, len(t_lab)) if t_lab[t] >= 0]
        assert [s_lab[p + 1] for p in s_pos] == [t_lab[p + 1] for p in t_pos]  # the same tokens predicted
        m_items.append(float(kl_by_hand(t_logits[t_pos], s_logits[s_pos]).mean()))
        reverse_items.append(float(kl_by_hand(s_logits[s_pos], t_logits[t_pos]).mean()))
        x_pos = [t - 1 for t in range(1, len(x_lab)) if x_lab[t] >= 0]
        adapted, original = logits_one_row(model.llm, x_row, [])[x_pos], logits_one_row(original_llm, x_row, [])[x_pos]
        f_items.append(float(kl_by_hand(original, adapted).mean()))
    assert not speech  # every speech vector was used
    return m_items, reverse_items, f_items


@torch.no_grad()
def test_m_and_f_equal_a_full_logit_kl_written_by_hand(tiny_model_cfg):
    model = lora_model(tiny_model_cfg)
    perturb_lora(model)
    sharpen(model.llm)
    original, _ = build_llm(tiny_model_cfg.llm)  # same config and seed, no LoRA
    sharpen(original)
    views = build_views(model, noise)
    m, f = measures(model, views)
    want_m, reverse_m, want_f = reference_measures(model, original.eval(), views)
    assert min(want_m) > 1e-3 and min(want_f) > 1e-3
    assert m.tolist() == pytest.approx(want_m, rel=1e-4)
    assert f.tolist() == pytest.approx(want_f, rel=1e-4)
    # The reference tells the directions apart: KL(speech || text) differs by hundreds of times the
    # tolerance above, so a swapped direction fails.
    assert max(abs(r - w) / w for r, w in zip(reverse_m, want_m)) > 0.05, (reverse_m, want_m)


@torch.no_grad()
def test_the_evaluation_of_a_tiny_model_brackets_m_and_f(tiny_model_cfg):
    """The per-document rows of a real evaluation, summarised: each bound lies between the least and the
    greatest document's own mean (a resampled ratio of sums is a weighted mean of them), around the value."""
    model = lora_model(tiny_model_cfg)
    perturb_lora(model)
    rows = misalignment_forgetting(model, build_views(model, noise))
    got = summarise("measure", rows)
    for name, key in (("M", "m"), ("F", "f")):
        items = [r[f"{key}_sum"] / r[f"{key}_count"] for r in rows]
        assert min(items) - 1e-9 <= got[f"{name}_low"] <= got[name] <= got[f"{name}_high"] <= max(items) + 1e-9
        assert got[f"{name}_high"] - got[f"{name}_low"] > 1e-6  # two different documents: not a point


# -- multiple choice ---------------------------------------------------------------------------------

MC_CONTEXTS = ["the big dog sat on the", "we go home"]
# The tiny LLM reads characters: the options' letters are chosen so that boosting one option's
# letters boosts no other option (only the leading space is shared, by all).
MC_OPTIONS = [["red", "cat", "sun", "fox"], ["whip", "jazz", "gym"]]


def boost_tokens(model, token_ids: set[int], amount: float = 30.0):
    """A real change to the LLM: its head adds ``amount`` to the logits of ``token_ids`` everywhere."""
    boost = torch.zeros(len(model.tokenizer))
    boost[sorted(token_ids)] = amount

    def hook(module, args, output):
        return output + boost[: output.shape[-1]].to(output.dtype)

    return model.llm.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("fmt", ["interleaved", "instruction"])
@torch.no_grad()
def test_multiple_choice_picks_the_option_made_most_likely(tiny_model_cfg, fmt):
    model = lora_model(tiny_model_cfg)
    perturb_lora(model)  # the adapted model and the original LLM differ; both must follow the boost
    tokens = [[set(model.text_ids([" " + o])[0]) for o in opts] for opts in MC_OPTIONS]
    shared = set.intersection(*(t for opts in tokens for t in opts))
    waveforms = [torch.randn(8000, generator=torch.Generator().manual_seed(i)) * 0.1 for i in range(2)]
    for answers in ([2, 0], [3, 2], [1, 1]):  # not always the first or the last option
        boosted = set().union(*(opts[a] for opts, a in zip(tokens, answers))) - shared
        assert all(not (t & boosted) for opts, a in zip(tokens, answers) for j, t in enumerate(opts) if j != a)
        handle = boost_tokens(model, boosted)
        try:
            picks = multiple_choice(model, waveforms, MC_CONTEXTS, MC_OPTIONS, fmt=fmt)
        finally:
            handle.remove()
        assert picks == [{"speech": a, "text": a, "text_original": a} for a in answers], answers


def test_multiple_choice_accuracies_and_the_gap():
    # Four items, answer 1 each: speech right once, the adapted model on text twice, the original
    # LLM on text three times.
    rows = [{"answer": 1, "speech": s, "text": t, "text_original": o}
            for s, t, o in [(1, 1, 1), (0, 1, 1), (0, 0, 1), (2, 0, 0)]]
    got = summarise("mc", rows)
    want = {"acc_speech": 0.25, "acc_text": 0.5, "acc_text_original": 0.75, "gap": 0.75 - 0.25, "text_gap": 0.75 - 0.5}
    assert {k: got[k] for k in want} == pytest.approx(want)
    assert set(got) == {k + b for k in want for b in ("", "_low", "_high")}  # each with its interval
