"""The model core: splicing, label mask, loss, batched == one-by-one generation, saving."""

import copy
import json
import math
import re

import pytest
import torch
from omegaconf import OmegaConf

from speechllm.config import GenerationConfig
from speechllm.model import IGNORE_INDEX, MODEL_FORMAT, SpeechLLM


def encode(model, texts, seed=0):
    return model.encoder.encode_text(texts, [torch.Generator().manual_seed(seed + i) for i in range(len(texts))])


def test_splice_left_pads_masks_and_positions(tiny_model):
    m = tiny_model
    texts = ["the cat", "a much longer sentence"]
    feats, lengths = encode(m, texts)
    speech, speech_len = m.project(feats, lengths)
    targets = m.target_ids(texts)
    inputs = m.splice(*m.instruction_rows(speech_len.tolist(), targets), m.flatten(speech, speech_len))
    prefix, suffix = len(m.prompt.prefix_ids), len(m.prompt.suffix_ids)
    for i in range(2):
        n = prefix + int(speech_len[i]) + suffix + len(targets[i])
        width = inputs["attention_mask"].shape[1]
        mask = inputs["attention_mask"][i]
        assert mask[: width - n].sum() == 0 and mask[width - n:].all()  # left padding
        assert inputs["position_ids"][i, width - n:].tolist() == list(range(n))
        labels = inputs["labels"][i]
        # loss only on the target tokens + EOS, which end every row
        assert labels[width - len(targets[i]):].tolist() == targets[i]
        assert (labels[: width - len(targets[i])] == IGNORE_INDEX).all()
        assert targets[i][-1] == m.eos_id
        # speech vectors sit right after the prompt prefix
        start = width - n + prefix
        torch.testing.assert_close(inputs["inputs_embeds"][i, start:start + int(speech_len[i])], speech[i, : speech_len[i]])


def test_loss_equals_full_logits_reference(tiny_model):
    m = tiny_model
    texts = ["we saw the dog", "go"]
    feats, lengths = encode(m, texts, seed=5)
    targets = m.target_ids(texts)
    loss = m(feats, lengths, targets)["loss"]
    # Reference: all logits, then a per-token loop over the labelled positions.
    speech, speech_len = m.project(feats, lengths)
    inputs = m.splice(*m.instruction_rows(speech_len.tolist(), targets), m.flatten(speech, speech_len))
    labels = inputs.pop("labels")
    logits = m.llm(**inputs).logits.log_softmax(-1)
    terms = [-logits[b, t - 1, labels[b, t]] for b in range(2) for t in range(1, labels.shape[1]) if labels[b, t] != IGNORE_INDEX]
    assert len(terms) == sum(len(t) for t in targets)
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_only_projector_gets_gradients_when_llm_frozen(tiny_model):
    m = tiny_model
    m.zero_grad(set_to_none=True)
    feats, lengths = encode(m, ["one two"])
    m(feats, lengths, m.target_ids(["one two"]))["loss"].backward()
    with_grad = {n.split(".")[0] for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad == {"projector"}
    m.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def sharp_model(tiny_model):
    """The tiny model with its LLM's matrices scaled up: a random tiny LLM's near-flat logits pick the
    same newline at every step, so generation comparisons would compare empty strings."""
    m = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in m.llm.parameters():
            if p.dim() == 2:
                p.mul_(10)
    return m


def test_batched_generation_equals_one_by_one(sharp_model):
    m = sharp_model
    texts = ["the cat sat", "hi", "they went home now then"]
    feats, lengths = encode(m, texts, seed=11)
    for beams in (1, 3):
        gen = GenerationConfig(num_beams=beams, max_new_tokens=12)
        batched = m.generate(feats, lengths, gen)
        single = [m.generate(feats[i:i + 1, : lengths[i]], lengths[i:i + 1], gen)[0] for i in range(len(texts))]
        assert all(batched) and batched == single


def test_save_and_reload_trainable_only(tiny_model, tmp_path):
    m = tiny_model
    with torch.no_grad():
        m.projector.fc2.bias.add_(0.5)
    m.save_pretrained(tmp_path)
    saved = set(m.trainable_state_dict())
    assert saved and all(k.startswith("projector.") for k in saved)
    again = SpeechLLM.from_pretrained(tmp_path)
    torch.testing.assert_close(again.projector.fc2.bias, m.projector.fc2.bias)
    # frozen parts are rebuilt from their config (seeded), identical to the original
    torch.testing.assert_close(again.llm.get_input_embeddings().weight, m.llm.get_input_embeddings().weight)
    feats, lengths = encode(m, ["see the red dog"])
    torch.testing.assert_close(again(feats, lengths, m.target_ids(["x"]))["loss"], m(feats, lengths, m.target_ids(["x"]))["loss"])
    with torch.no_grad():
        m.projector.fc2.bias.sub_(0.5)


@pytest.mark.parametrize("meta", [{"format": 99, "model": {}}, {"model": {}}, {"format": 1}, []])
def test_reload_refuses_an_unknown_model_format_naming_the_file(tiny_model, tmp_path, meta):
    tiny_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model.json").read_text())["format"] == MODEL_FORMAT
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'model.json'}: format")):
        SpeechLLM.from_pretrained(tmp_path)


def test_lora_trains_adapters_only_and_starts_as_the_base(tiny_model_cfg):
    cfg = tiny_model_cfg
    cfg.llm.lora.enabled = True
    cfg.llm.lora.target_modules = ["q_proj", "v_proj"]
    m = SpeechLLM.build(cfg)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and all(n.startswith("projector.") or "lora_" in n for n in names)
    base = SpeechLLM.build(OmegaConf.merge(cfg, {"llm": {"lora": {"enabled": False}}}))
    base.projector.load_state_dict(m.projector.state_dict())
    feats, lengths = encode(m, ["the dog"])
    # LoRA's B starts at zero: the adapted model equals the base model before training
    torch.testing.assert_close(m(feats, lengths, m.target_ids(["the dog"]))["loss"],
                               base(feats, lengths, base.target_ids(["the dog"]))["loss"])


@pytest.mark.parametrize("option", ["init_from_llm_embeddings", "unit_lookup"])
def test_unit_embeddings_need_a_ctc_encoder(tiny_model_cfg, option):
    whisper = {"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64}
    cfg = OmegaConf.merge(tiny_model_cfg, {"encoder": {"kind": "whisper", "from_config": whisper, "vocab": None},
                                           "projector": {option: True}})
    with pytest.raises(ValueError, match=r"need a CTC encoder \(encoder.kind ctc: .*not 'whisper'"):
        SpeechLLM.build(cfg)


def test_projector_initialised_from_llm_embeddings_reproduces_them(tiny_model_cfg):
    cfg = tiny_model_cfg
    cfg.projector.init_from_llm_embeddings = True
    m = SpeechLLM.build(cfg)
    units = m.unit_embeddings()
    vocab = len(m.encoder.vocab)
    onehot = torch.nn.functional.one_hot(torch.arange(1, vocab), vocab).float()[None]
    out, _ = m.projector(onehot, torch.tensor([vocab - 1]))
    cos = torch.nn.functional.cosine_similarity(out[0], units[1:], dim=-1)
    assert cos.min() > 0.95, cos.min()


def test_cached_prompt_prefix_gives_the_same_loss_and_gradients(tiny_model):
    m = tiny_model
    texts = ["we saw the dog", "go home", "a"]
    feats, lengths = encode(m, texts, seed=3)
    targets = m.target_ids(texts)
    results = []
    m.__dict__.pop("_prefix_kv", None)
    for cached in (False, True):
        m.cfg.prompt.cache_prefix = cached
        m.zero_grad(set_to_none=True)
        loss = m(feats, lengths, targets)["loss"]
        loss.backward()
        results.append((loss.detach(), m.projector.fc1.weight.grad.clone()))
        assert hasattr(m, "_prefix_kv") == cached  # the cached path really ran
    m.cfg.prompt.cache_prefix = True
    m.zero_grad(set_to_none=True)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)


@torch.no_grad()
def test_beam_one_equals_a_plain_greedy_loop(sharp_model):
    """generate(num_beams=1) against argmax decoding written by hand, step by step, one clip at a time."""
    m = sharp_model
    texts = ["the dog ran home", "we see"]
    feats, lengths = encode(m, texts, seed=21)
    gen = GenerationConfig(num_beams=1, max_new_tokens=10)
    hyps = m.generate(feats, lengths, gen)
    speech, speech_len = m.project(feats, lengths)
    for i in range(len(texts)):
        rows, _ = m.instruction_rows([int(speech_len[i])])
        vectors = speech[i, : speech_len[i]]
        new = []
        for _ in range(gen.max_new_tokens):
            inputs = m.splice([rows[0] + new], speech=vectors)
            token = int(m.llm(**inputs).logits[0, -1].argmax())
            if token == m.eos_id:
                break
            new.append(token)
        assert hyps[i] and hyps[i] == m.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_unit_lookup_projector_starts_at_the_llm_embeddings_and_only_seen_units_move(tiny_model_cfg):
    cfg = tiny_model_cfg
    cfg.projector.unit_lookup = True
    cfg.projector.lookup_min_prob = 0.01  # above CPS smoothing's share per unit (at most 0.1 / 29 units here)
    m = SpeechLLM.build(cfg)
    units = m.unit_embeddings()
    vocab = len(m.encoder.vocab)
    onehot = torch.nn.functional.one_hot(torch.arange(vocab), vocab).float()[None]
    out, _ = m.projector(onehot, torch.tensor([vocab]))
    torch.testing.assert_close(out[0], units)  # the MLP residual starts at exactly zero
    opt = torch.optim.AdamW(m.projector.parameters(), lr=1e-3, weight_decay=0.0)
    seen = m.encoder.vocab.encode("dog")
    for _ in range(3):
        feats, lengths = m.encoder.encode_text(["dog"], [torch.Generator().manual_seed(0)])
        opt.zero_grad()
        m(feats, lengths, m.target_ids(["dog"]))["loss"].backward()
        opt.step()
    table = m.projector.lookup.weight.T.detach()
    unseen = [i for i in range(vocab) if i not in seen]
    torch.testing.assert_close(table[unseen], units[unseen])  # rows of units never heard stay put
    assert not torch.allclose(table[seen], units[seen])


def test_text_ceiling_is_bounded_like_speech(tiny_model, monkeypatch):
    """The text ceiling stops under the speech path's rule, each text token counting as a vector."""
    m = tiny_model
    texts = ["the cat sat on the mat", "hi"]
    longest = max(len(ids) for ids in m.text_ids(texts))
    asked = []
    real_generate = m.llm.generate
    monkeypatch.setattr(m.llm, "generate", lambda **kw: asked.append(kw["max_new_tokens"]) or real_generate(**kw))
    for per_vector, expected in ((0.5, math.ceil(0.5 * longest) + 4), (0.0, 40)):
        m.generate_from_text(texts, GenerationConfig(max_new_tokens=40, max_new_tokens_per_speech_vector=per_vector))
        assert asked[-1] == expected
