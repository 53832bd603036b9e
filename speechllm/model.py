"""The speech LLM: encoder -> (compression) -> projector -> embeddings spliced into a causal LM.

Sequences are ``[prompt prefix | speech vectors | prompt suffix | target | EOS]``, left-padded, so
every target sits at the end of its row: the loss needs the LM head only on the last few
positions, and generation continues every row from the same place.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from speechllm.config import GenerationConfig, ModelConfig, PromptConfig
from speechllm.encoders import build_encoder
from speechllm.encoders.base import SpeechEncoder
from speechllm.llm import build_llm
from speechllm.projector import Projector

IGNORE_INDEX = -100
_SPEECH = -1  # placeholder id of a speech position before splicing
_MARK = "\x00SPEECH\x00"


class PromptTemplate:
    """Token ids before and after the speech, rendered once with the LLM's chat template.

    No token is added to the LLM's vocabulary: the placeholder is a split point, so any Hub model
    works unmodified and the frozen embedding matrix is never resized.
    """

    def __init__(self, tokenizer, cfg: PromptConfig):
        if cfg.use_chat_template and getattr(tokenizer, "chat_template", None):
            messages = [] if cfg.system_prompt is None else [{"role": "system", "content": cfg.system_prompt}]
            messages.append({"role": "user", "content": cfg.task_prompt + _MARK})
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            add_special = False  # the template already holds any BOS it wants
        else:
            text, add_special = f"{cfg.task_prompt} {_MARK}\n", True
        prefix, suffix = text.split(_MARK)
        self.prefix_ids: list[int] = tokenizer(prefix, add_special_tokens=add_special).input_ids
        self.suffix_ids: list[int] = tokenizer(suffix, add_special_tokens=False).input_ids
        self.text = text


class SpeechLLM(nn.Module):
    def __init__(self, cfg: ModelConfig, encoder: SpeechEncoder, llm, tokenizer):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.llm = llm
        self.tokenizer = tokenizer
        llm_dim = llm.get_input_embeddings().embedding_dim
        self.projector = Projector(encoder.output_dim, llm_dim, cfg.projector)
        self.prompt = PromptTemplate(tokenizer, cfg.prompt)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        if cfg.projector.init_from_llm_embeddings:
            self.projector.init_from_embeddings(self.unit_embeddings())

    @classmethod
    def build(cls, cfg: ModelConfig) -> SpeechLLM:
        llm, tokenizer = build_llm(cfg.llm)
        return cls(cfg, build_encoder(cfg.encoder), llm, tokenizer)

    # ----------------------------------------------------------------------------- inputs

    @torch.no_grad()
    def unit_embeddings(self) -> torch.Tensor:
        """Mean LLM input embedding of each CTC unit's string (zeros for the blank / empty units)."""
        vocab = getattr(self.encoder, "vocab", None)
        if vocab is None:
            raise ValueError("projector.init_from_llm_embeddings needs a CTC encoder (its units have strings)")
        table = self.llm.get_input_embeddings().weight
        rows = torch.zeros(len(vocab), table.shape[1])
        for i in range(len(vocab)):
            ids = self.tokenizer(vocab.unit_string(i), add_special_tokens=False).input_ids if i != vocab.blank_id else []
            if ids:
                rows[i] = table[ids].float().mean(0).cpu()
        return rows

    def target_ids(self, texts: list[str]) -> list[list[int]]:
        """Target token ids + EOS, truncated to ``max_target_tokens`` before the EOS."""
        limit = self.cfg.prompt.max_target_tokens
        return [self.tokenizer(t, add_special_tokens=False).input_ids[:limit] + [self.eos_id] for t in texts]

    def project(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.projector.fc1.weight.device
        return self.projector(feats.to(device), lengths.to(device))

    def splice(self, speech: torch.Tensor, speech_lengths: torch.Tensor,
               targets: list[list[int]] | None = None, with_prefix: bool = True) -> dict[str, torch.Tensor]:
        """Build left-padded ``inputs_embeds``, ``attention_mask``, ``position_ids`` (+ ``labels``).

        ``with_prefix=False`` leaves out the prompt prefix (its keys/values come from a cache) and
        starts the position ids after it.
        """
        prefix = self.prompt.prefix_ids if with_prefix else []
        rows, label_rows = [], []
        for i, n in enumerate(speech_lengths.tolist()):
            row = prefix + [_SPEECH] * n + self.prompt.suffix_ids
            target = targets[i] if targets is not None else []
            rows.append(row + target)
            label_rows.append([IGNORE_INDEX] * len(row) + target)
        width = max(len(r) for r in rows)
        device = speech.device
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, lab) in enumerate(zip(rows, label_rows)):
            ids[i, width - len(row):] = torch.tensor(row)
            labels[i, width - len(row):] = torch.tensor(lab)
            mask[i, width - len(row):] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)

        is_speech = ids == _SPEECH
        embeds = self.llm.get_input_embeddings()(ids.masked_fill(is_speech, self.pad_id))
        valid = torch.arange(speech.shape[1], device=device)[None, :] < speech_lengths.to(device)[:, None]
        # Speech positions of a row are contiguous and in order, so row-major order matches.
        embeds = embeds.masked_scatter(is_speech[..., None], speech[valid].to(embeds.dtype))
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        if not with_prefix:
            position_ids = position_ids + len(self.prompt.prefix_ids)
        out = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": position_ids}
        if targets is not None:
            out["labels"] = labels
        return out

    # ----------------------------------------------------------------------------- training

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]]) -> dict[str, torch.Tensor]:
        """Teacher-forced CE over target tokens + EOS (mean over tokens)."""
        speech, speech_lengths = self.project(feats, lengths)
        use_cache = self.cfg.prompt.cache_prefix and self.llm_is_frozen() and not self.llm.training
        inputs = self.splice(speech, speech_lengths, targets, with_prefix=not use_cache)
        labels = inputs.pop("labels")
        if use_cache:  # [cached prefix | left padding | speech | suffix | target]
            inputs["past_key_values"] = self.prefix_cache(inputs["inputs_embeds"].shape[0])
            prefix_mask = inputs["attention_mask"].new_ones(labels.shape[0], len(self.prompt.prefix_ids))
            inputs["attention_mask"] = torch.cat([prefix_mask, inputs["attention_mask"]], dim=1)
        # Targets sit at the end of every row (left padding): only the last `keep` positions need
        # logits, which saves the LM head (vocab x hidden) on the prompt and the speech.
        keep = max(len(t) for t in targets) + 1
        logits = self.llm(**inputs, logits_to_keep=keep, use_cache=use_cache).logits
        shift_labels = labels[:, -keep + 1:]
        loss = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), shift_labels.flatten(), ignore_index=IGNORE_INDEX
        )
        return {"loss": loss, "n_tokens": (shift_labels != IGNORE_INDEX).sum(), "seq_len": inputs["attention_mask"].shape[1]}

    def llm_is_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.llm.parameters())

    def train(self, mode: bool = True) -> SpeechLLM:
        super().train(mode)
        if self.llm_is_frozen():  # a frozen LLM keeps dropout off (and its prefix cache valid)
            self.llm.eval()
        return self

    @torch.no_grad()
    def prefix_cache(self, batch_size: int):
        """Keys/values of the fixed prompt prefix, computed once per device/autocast state.

        Valid only while the LLM is frozen (no LoRA, no dropout): the prefix's states never change.
        """
        from transformers import DynamicCache

        device = self.llm.get_input_embeddings().weight.device
        key = (device, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        if getattr(self, "_prefix_kv", (None,))[0] != key:
            ids = torch.tensor([self.prompt.prefix_ids], device=device)
            cache = self.llm(input_ids=ids, use_cache=True).past_key_values
            self._prefix_kv = (key, [(layer.keys, layer.values) for layer in cache.layers])
        # A fresh cache per step: the forward appends to it.
        layers = [(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)) for k, v in self._prefix_kv[1]]
        return DynamicCache(ddp_cache_data=layers, config=self.llm.config)

    # ----------------------------------------------------------------------------- inference

    @torch.no_grad()
    def generate(self, feats: torch.Tensor, lengths: torch.Tensor, gen: GenerationConfig | None = None) -> list[str]:
        return self.generate_from_embeddings(*self.project(feats, lengths), gen)

    @torch.no_grad()
    def generate_from_embeddings(self, embeds: torch.Tensor, lengths: torch.Tensor,
                                 gen: GenerationConfig | None = None) -> list[str]:
        """Generate with ``embeds`` (already in the LLM's space) in the speech slot of the prompt."""
        gen = gen or self.cfg.generation
        max_new = gen.max_new_tokens
        if gen.max_new_tokens_per_speech_vector > 0:
            max_new = min(max_new, math.ceil(gen.max_new_tokens_per_speech_vector * int(lengths.max())) + 4)
        inputs = self.splice(embeds, lengths)
        inputs.pop("position_ids")  # generate() derives them from the attention mask, step by step
        out = self.llm.generate(
            **inputs, max_new_tokens=max_new, num_beams=gen.num_beams, do_sample=False,
            repetition_penalty=gen.repetition_penalty, no_repeat_ngram_size=gen.no_repeat_ngram_size,
            eos_token_id=self.eos_id, pad_token_id=self.pad_id,
        )
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The LLM's own input embeddings of each text: what the speech slot would hold as text."""
        table = self.llm.get_input_embeddings()
        rows = [table(torch.tensor(self.tokenizer(t, add_special_tokens=False).input_ids or [self.pad_id],
                                   device=table.weight.device)) for t in texts]
        lengths = torch.tensor([r.shape[0] for r in rows], device=table.weight.device)
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), lengths

    def transcribe(self, waveforms: list[torch.Tensor], gen: GenerationConfig | None = None) -> list[str]:
        feats, lengths = self.encoder.encode_speech(waveforms)
        return self.generate(feats, lengths, gen)

    # ----------------------------------------------------------------------------- saving

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.named_parameters() if p.requires_grad}

    def save_pretrained(self, directory: str | Path) -> None:
        """Only the trained weights, plus the config that names the frozen parts (ids/paths)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.trainable_state_dict(), str(directory / "trainable.safetensors"))
        cfg = OmegaConf.to_container(OmegaConf.structured(self.cfg), resolve=True)
        (directory / "model.json").write_text(json.dumps({"format": 1, "model": cfg}, indent=1))

    def load_trainable(self, state: dict[str, torch.Tensor], source: str = "") -> None:
        """Load trained weights; every saved tensor must match a parameter of this model."""
        params = dict(self.named_parameters())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise ValueError(f"{source}: weights for parameters this model does not have: {unknown[:5]}")
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, model expects {tuple(params[name].shape)}")
            with torch.no_grad():
                params[name].copy_(tensor)

    @classmethod
    def from_pretrained(cls, directory: str | Path, overrides: ModelConfig | None = None) -> SpeechLLM:
        directory = Path(directory)
        meta_path = directory / "model.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory} is not an exported model (no model.json)")
        cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), json.loads(meta_path.read_text())["model"])
        if overrides is not None:
            cfg = OmegaConf.merge(cfg, overrides)
        model = cls.build(cfg)
        model.load_trainable(load_file(str(directory / "trainable.safetensors")), str(directory))
        return model
