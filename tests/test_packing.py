"""Padding-free batches (``model.pack_sequences``): the rows end to end in one row give the same loss
and gradients as left-padded rows, and attention never crosses from one row into the next.

Tolerance: float32 on the tiny model. Packing changes only which masked-out terms the attention adds
and the kernels' shapes, so the sums differ in rounding: 1e-5 relative/absolute on losses, hidden
states and gradients (the largest difference observed is 8e-7).
"""

import pytest
import torch
from omegaconf import OmegaConf

from speechllm.losses import lm_loss
from speechllm.model import IGNORE_INDEX, SpeechLLM
from speechllm.sequences import speech_and_text_views

TOL = {"atol": 1e-5, "rtol": 1e-5}
TEXTS = ["the cat", "a much longer sentence with many more words in it", "go now"]
DOCS = [("the big dog sat on the red mat and then it went home to sleep", 4.0),
        ("we go home now", 1.5),
        ("one two three four five six seven eight", 3.0)]


def build(cfg, llm: str = "lora", attn: str = "sdpa") -> SpeechLLM:
    """The tiny model in training mode, its LLM trained through LoRA (B non-zero, so A gets gradients
    too) or in full, without dropout so that two forwards are comparable."""
    trained = ({"lora": {"enabled": True, "dropout": 0.0}} if llm == "lora" else {"freeze": False})
    torch.manual_seed(0)
    model = SpeechLLM.build(OmegaConf.merge(cfg, {"llm": {"attn_implementation": attn, **trained}}))
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


def packed_batches(model: SpeechLLM) -> list[tuple[int, ...]]:
    """Records the shape of every LLM decoder input, and whether it came without an attention mask."""
    seen = []
    model.llm.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((*kwargs["inputs_embeds"].shape[:2], kwargs["attention_mask"] is None)),
        with_kwargs=True)
    return seen


def loss_and_grads(model: SpeechLLM, step, *, pack: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.cfg.pack_sequences = pack
    model.zero_grad(set_to_none=True)
    loss = step(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_packing_changes_nothing(model: SpeechLLM, step, n_rows: int) -> None:
    seen = packed_batches(model)
    padded_loss, padded_grads = loss_and_grads(model, step, pack=False)
    assert seen and all(b == n_rows and not unmasked for b, _, unmasked in seen)
    seen.clear()
    packed_loss, packed_grads = loss_and_grads(model, step, pack=True)
    assert seen and all(b == 1 and unmasked for b, _, unmasked in seen)  # one row, no mask: really packed
    torch.testing.assert_close(packed_loss, padded_loss, **TOL)
    assert packed_grads.keys() == padded_grads.keys()
    assert {n.split(".")[0] for n in padded_grads} == {"projector", "llm"}
    for name, grad in padded_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(packed_grads[name], grad, **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(("llm", "attn"), [("lora", "sdpa"), ("lora", "eager"), ("full", "sdpa")])
def test_instruction_rows_packed_equal_padded(tiny_model_cfg, llm, attn):
    model = build(tiny_model_cfg, llm, attn)
    feats, lengths = model.encoder.encode_text(TEXTS, [torch.Generator().manual_seed(i) for i in range(len(TEXTS))])
    targets = model.target_ids(TEXTS)
    assert len({len(t) for t in targets}) == len(TEXTS)  # rows of different lengths
    assert_packing_changes_nothing(model, lambda m: m(feats, lengths, targets)["loss"], len(TEXTS))


def word_times(text: str, seconds: float) -> list[dict]:
    words = text.split()
    step = seconds / len(words)
    return [{"w": w, "start": i * step, "end": (i + 1) * step} for i, w in enumerate(words)]


@pytest.mark.parametrize("fmt", ["interleaved", "instruction"])
def test_distillation_views_packed_equal_padded(tiny_model_cfg, fmt):
    """The distillation step (lightning_modules/distillation.py): student on speech, the original LLM
    (LoRA off) on the same words as text, alpha 0.5 so both the KL and the NLL term count."""
    model = build(tiny_model_cfg)
    waves = [torch.randn(int(16000 * s), generator=torch.Generator().manual_seed(i)) * 0.1
             for i, (_, s) in enumerate(DOCS)]
    words = [word_times(text, s) for text, s in DOCS]
    texts = [text for text, _ in DOCS]

    def step(m: SpeechLLM) -> torch.Tensor:
        views = speech_and_text_views(m, waves, words, texts, texts, [torch.Generator().manual_seed(i) for i in range(3)],
                                      fmt=fmt, text_words=(2, 4), speech_words=(1, 3))
        assert len({len(r) for r in views.student_rows}) == len(DOCS)
        hidden, targets = m.labelled_hidden(views.student_rows, views.student_labels, views.speech)
        with torch.no_grad(), m.original_llm() as teacher:
            teacher_hidden, teacher_targets = m.labelled_hidden(views.teacher_rows, views.teacher_labels, llm=teacher)
        assert torch.equal(teacher_targets, targets)
        return lm_loss(hidden, m.lm_head, targets, teacher_hidden=teacher_hidden, alpha=0.5,
                       chunk_size=m.cfg.loss_chunk_size)["loss"]

    assert_packing_changes_nothing(model, step, len(DOCS))


def all_labelled(rows: list[list[int]]) -> list[list[int]]:
    return [[IGNORE_INDEX, *row[1:]] for row in rows]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_packed_attention_stays_within_each_row(tiny_model_cfg, attn):
    model = build(tiny_model_cfg, attn=attn).eval()
    model.cfg.pack_sequences = True
    rows = model.text_ids(["the cat sat on the mat", "we go home"])

    def row_hidden(rows):  # every position but each row's last, row by row
        hidden, _ = model.labelled_hidden(rows, all_labelled(rows))
        return hidden.split([len(r) - 1 for r in rows])

    first, second = row_hidden(rows)
    changed = [[rows[0][0], (rows[0][1] + 1) % len(model.tokenizer), *rows[0][2:]], rows[1]]
    changed_first, changed_second = row_hidden(changed)
    assert (changed_first[1:] - first[1:]).abs().max() > 1e-3  # the change does reach row 0's later positions
    torch.testing.assert_close(changed_second, second, atol=0, rtol=0)  # ... and nothing of row 1
    alone, = row_hidden([rows[1]])
    torch.testing.assert_close(second, alone, **TOL)


@torch.no_grad()
def test_packing_skips_the_prefix_cache_of_a_frozen_llm(tiny_model_cfg):
    """Frozen LLM in eval mode: padded rows reuse the prompt prefix's cache, packed rows recompute it
    in each row; the hidden states agree."""
    model = SpeechLLM.build(tiny_model_cfg).eval()
    assert model.cfg.prompt.cache_prefix and model.llm_is_frozen()
    rows, labels = model.instruction_rows(model.text_ids(TEXTS), model.target_ids(TEXTS))
    padded, padded_targets = model.labelled_hidden(rows, labels)
    assert hasattr(model, "_prefix_kv")  # the padded forward did use the cache
    model.cfg.pack_sequences = True
    packed, packed_targets = model.labelled_hidden(rows, labels)
    assert torch.equal(packed_targets, padded_targets)
    torch.testing.assert_close(packed, padded, **TOL)
