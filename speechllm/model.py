"""The speech LLM: encoder -> (compression) -> projector -> embeddings spliced into a causal LM.

Every stage builds its LLM input the same way: *token rows* in which ``SPEECH`` marks a slot for the
next projected speech vector, and *label rows* (``IGNORE_INDEX`` where there is no loss). Stage 1/2
rows are ``[prompt prefix | speech | prompt suffix | target | EOS]``; the distillation teacher reads
the same rows with the transcript's tokens in the speech slots; SALAD's interleaved rows alternate
text and speech spans. Rows are left-padded, position ids follow the attention mask, and the LM head
runs only on the positions that predict a labelled token (:mod:`speechllm.losses`, chunked over
positions), so memory never holds a (length x vocabulary) tensor. With ``model.pack_sequences`` the
forwards that score labelled tokens read a batch's rows end to end in one row instead, without padding
(:meth:`SpeechLLM.pack`); generation stays left-padded.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from speechllm.audio import AudioInput, check_audio_file, prepare_waveforms
from speechllm.config import GenerationConfig, ModelConfig, PromptConfig, check_model_paths, plain
from speechllm.encoders import build_encoder, encoder_kind, kinds_with
from speechllm.encoders.base import SpeechEncoder
from speechllm.io import atomic_write
from speechllm.joint_decoding import joint_best
from speechllm.llm import build_llm
from speechllm.losses import lm_loss
from speechllm.model_card import project_version, read_stage_files, render_model_card
from speechllm.projector import Projector

# model.json's "format": what from_pretrained knows how to read. Raise it when the export changes.
# 2 added "local" (parts copied into the export, relative to it), "origins" and "merged_lora".
MODEL_FORMAT = 2
READABLE_FORMATS = (1, 2)
# The frozen parts an export can carry inside itself: config key -> where in the export directory.
LOCAL_PARTS = {"encoder.pretrained": "encoder", "encoder.ctc_head": "ctc_head", "encoder.cps.stats": "cps_stats",
               "encoder.cps.simulator": "simulator",
               "llm.pretrained": "llm", "llm.tokenizer": "llm_tokenizer"}
IGNORE_INDEX = -100
SPEECH = -1  # a slot for the next speech vector in a token row
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


def _config_node(cfg: dict, key: str) -> tuple[dict, str]:
    """The dict holding a dotted key of a plain config, and the key's last part."""
    *path, name = key.split(".")
    for part in path:
        cfg = cfg[part]
    return cfg, name


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class SpeechLLM(nn.Module):
    def __init__(self, cfg: ModelConfig, encoder: SpeechEncoder, llm, tokenizer):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.llm = llm
        self.tokenizer = tokenizer
        for name in ("final_logit_softcapping", "logit_scale"):
            if getattr(llm.config, name, None) not in (None, 0, 1, 1.0):
                raise ValueError(f"LLM config sets {name}={getattr(llm.config, name)}: the LM head applied "
                                 "position by position (speechllm.losses) does not reproduce it")
        llm_dim = llm.get_input_embeddings().embedding_dim
        self.projector = Projector(encoder.output_dim, llm_dim, cfg.projector)
        self.prompt = PromptTemplate(tokenizer, cfg.prompt)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        self.max_positions = getattr(llm.config, "max_position_embeddings", None) or 1 << 30
        self.teacher_llm = None  # a frozen copy of the original LLM, when the LLM itself is trained
        self.merged_lora: dict | None = None  # set once LoRA is merged into the LLM's weights (merge_lora)
        self.origins: dict[str, str] = {}  # config key -> the id/path a part copied into an export came from
        if not llm.get_input_embeddings().weight.is_meta:  # (an empty build: speechllm.sharding does it)
            self.init_projector_from(llm)

    @classmethod
    def build(cls, cfg: ModelConfig, *, empty_llm: bool = False) -> SpeechLLM:
        """``empty_llm``: the LLM's weights on the meta device, for FSDP to shard (:mod:`speechllm.sharding`)."""
        check_model_paths(cfg)
        llm, tokenizer = build_llm(cfg.llm, empty=empty_llm)
        return cls(cfg, build_encoder(cfg.encoder), llm, tokenizer)

    def init_projector_from(self, llm) -> None:
        """The projector initialisations that read the LLM's embedding table (``projector.init_from_llm_embeddings``,
        ``projector.unit_lookup``)."""
        if self.cfg.projector.init_from_llm_embeddings:
            self.projector.init_from_embeddings(self.unit_embeddings(llm))
        if self.cfg.projector.unit_lookup:
            self.projector.init_lookup(self.unit_embeddings(llm), self.encoder.vocab.blank_id)

    # ----------------------------------------------------------------------------- token rows

    @torch.no_grad()
    def unit_embeddings(self, llm=None) -> torch.Tensor:
        """Mean LLM input embedding of each CTC unit's string (zeros for the blank / empty units)."""
        if not encoder_kind(self.cfg.encoder.kind).is_ctc:
            raise ValueError(f"projector.init_from_llm_embeddings / unit_lookup need a CTC encoder (encoder.kind "
                             f"{' | '.join(kinds_with('is_ctc'))}: its units have strings), not {self.cfg.encoder.kind!r}")
        vocab = self.encoder.vocab
        table = (llm or self.llm).get_input_embeddings().weight
        rows = torch.zeros(len(vocab), table.shape[1])
        for i in range(len(vocab)):
            ids = self.tokenizer(vocab.unit_string(i), add_special_tokens=False).input_ids if i != vocab.blank_id else []
            if ids:
                rows[i] = table[ids].float().mean(0).cpu()
        return rows

    def text_ids(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]

    def target_ids(self, texts: list[str]) -> list[list[int]]:
        """Target token ids + EOS, truncated to ``max_target_tokens`` before the EOS."""
        limit = self.cfg.prompt.max_target_tokens
        return [ids[:limit] + [self.eos_id] for ids in self.text_ids(texts)]

    def speech_budget(self, targets: list[list[int]] | None, n_rows: int) -> list[int]:
        """Most speech vectors each instruction row can hold within the LLM's context."""
        fixed = len(self.prompt.prefix_ids) + len(self.prompt.suffix_ids)
        return [self.max_positions - fixed - (len(targets[i]) if targets else self.cfg.generation.max_new_tokens)
                for i in range(n_rows)]

    def instruction_rows(self, contents: list[int | list[int]], targets: list[list[int]] | None = None
                         ) -> tuple[list[list[int]], list[list[int]]]:
        """``[prefix | content | suffix | target]`` rows and their labels (loss on the target only).

        ``content`` is a number of speech slots, or token ids read as text (the transcript: what the
        distillation teacher and the LLM's text ceiling see in place of the speech).
        """
        rows, labels = [], []
        for i, content in enumerate(contents):
            middle = [SPEECH] * content if isinstance(content, int) else list(content)
            head = self.prompt.prefix_ids + middle + self.prompt.suffix_ids
            target = targets[i] if targets is not None else []
            rows.append(head + target)
            labels.append([IGNORE_INDEX] * len(head) + target)
        return rows, labels

    def project(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.projector.fc1.weight.device
        return self.projector(feats.to(device), lengths.to(device))

    @staticmethod
    def flatten(speech: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, d) padded vectors -> (sum of lengths, d), row-major: the order slots are filled in."""
        valid = torch.arange(speech.shape[1], device=speech.device)[None, :] < lengths.to(speech.device)[:, None]
        return speech[valid]

    def splice(self, rows: list[list[int]], labels: list[list[int]] | None = None,
               speech: torch.Tensor | None = None, *, skip_prefix: bool = False, llm=None) -> dict[str, torch.Tensor]:
        """Left-padded ``inputs_embeds``, ``attention_mask``, ``position_ids`` (+ ``labels``).

        ``speech`` (N, d) fills the ``SPEECH`` slots in row-major order. ``skip_prefix`` leaves out the
        prompt prefix every row starts with (its keys/values come from a cache) and starts the position
        ids after it.
        """
        llm = llm or self.llm
        embedding = llm.get_input_embeddings()
        device = embedding.weight.device
        cut = len(self.prompt.prefix_ids) if skip_prefix else 0
        if cut and any(r[:cut] != self.prompt.prefix_ids for r in rows):
            raise ValueError("skip_prefix needs rows that start with the prompt prefix")
        rows = [r[cut:] for r in rows]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        ids, mask = ids.to(device), mask.to(device)
        is_speech = ids == SPEECH
        embeds = embedding(ids.masked_fill(is_speech, self.pad_id))
        n_slots = int(is_speech.sum())
        if n_slots:
            if speech is None or speech.shape[0] != n_slots:
                raise ValueError(f"{n_slots} speech slots but {0 if speech is None else speech.shape[0]} speech vectors")
            embeds = embeds.masked_scatter(is_speech[..., None], speech.to(embeds.dtype))
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0) + cut
        out = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": position_ids}
        if labels is not None:
            lab = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            for i, row in enumerate(labels):
                row = row[cut:]
                lab[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            out["labels"] = lab.to(device)
        return out

    def pack(self, rows: list[list[int]], labels: list[list[int]], speech: torch.Tensor | None = None, *,
             llm=None) -> dict[str, torch.Tensor | None]:
        """The rows end to end in one row (batch 1, no padding): :meth:`splice`'s inputs with position
        ids restarting at 0 for each row and no attention mask.

        From the restarting position ids (with no mask and no cache) transformers confines attention to
        each row: a block-diagonal causal mask for sdpa/eager, variable-length flash attention. A row's
        first token is never labelled: in one row, the previous row's last position would predict it.
        """
        one_row = [token for row in rows for token in row]
        one_label_row = [t for lab in labels if lab for t in [IGNORE_INDEX, *lab[1:]]]
        inputs = self.splice([one_row], [one_label_row], speech, llm=llm)
        positions = torch.cat([torch.arange(len(row)) for row in rows])
        inputs["position_ids"] = positions[None].to(inputs["inputs_embeds"].device)
        inputs["attention_mask"] = None
        return inputs

    # ----------------------------------------------------------------------------- forward

    def llm_is_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.llm.parameters())

    def train(self, mode: bool = True) -> SpeechLLM:
        super().train(mode)
        for llm in (self.llm, self.teacher_llm):
            if llm is not None and not any(p.requires_grad for p in llm.parameters()):
                llm.eval()  # a frozen LLM keeps dropout off (and its prefix cache valid)
        return self

    @property
    def lm_head(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def labelled_hidden(self, rows: list[list[int]], labels: list[list[int]], speech: torch.Tensor | None = None,
                        *, llm=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states (N, d) at the positions that predict a labelled token, and those tokens.

        Row-major order: two row sets with the same labelled tokens (a student on speech, the teacher
        on text) give aligned pairs, padded or packed (``model.pack_sequences``: :meth:`pack`). Packed
        rows never use the prompt prefix's cached keys/values (``prompt.cache_prefix``): one cached prefix
        would sit before the first row only, and a cache turns off transformers' detection of packed rows.
        """
        llm = llm or self.llm
        use_cache = (self.cfg.prompt.cache_prefix and not self.cfg.pack_sequences and not llm.training
                     and not any(p.requires_grad for p in llm.parameters())
                     and all(r[: len(self.prompt.prefix_ids)] == self.prompt.prefix_ids for r in rows))
        if self.cfg.pack_sequences:
            inputs = self.pack(rows, labels, speech, llm=llm)
        else:
            inputs = self.splice(rows, labels, speech, skip_prefix=use_cache, llm=llm)
        label_ids = inputs.pop("labels")
        if use_cache:  # [cached prefix | left padding | rest]
            inputs["past_key_values"] = self.prefix_cache(len(rows), llm)
            prefix_mask = inputs["attention_mask"].new_ones(len(rows), len(self.prompt.prefix_ids))
            inputs["attention_mask"] = torch.cat([prefix_mask, inputs["attention_mask"]], dim=1)
        hidden = llm.get_decoder()(**inputs, use_cache=use_cache).last_hidden_state
        predicts = label_ids[:, 1:] != IGNORE_INDEX  # position t predicts the label at t + 1
        return hidden[:, :-1][predicts], label_ids[:, 1:][predicts]

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]]) -> dict[str, torch.Tensor]:
        """Teacher-forced CE over target tokens + EOS (mean over tokens), speech in the prompt's slot."""
        speech, speech_lengths = self.project(feats, lengths)
        speech_lengths, truncated = self.fit_to_context(speech_lengths, targets)
        rows, labels = self.instruction_rows(speech_lengths.tolist(), targets)
        hidden, target_tokens = self.labelled_hidden(rows, labels, self.flatten(speech, speech_lengths))
        out = lm_loss(hidden, self.lm_head, target_tokens, chunk_size=self.cfg.loss_chunk_size,
                      kernel=self.cfg.loss_kernel)
        return {**out, "row_lengths": [len(r) for r in rows], "truncated": truncated}

    def fit_to_context(self, speech_lengths: torch.Tensor, targets: list[list[int]] | None
                       ) -> tuple[torch.Tensor, int]:
        """Cut speech that would push a row past the LLM's context (before any forward, so every rank
        sees the same shapes it would have seen otherwise); returns the lengths and how many rows were cut."""
        budget = torch.tensor(self.speech_budget(targets, len(speech_lengths)), device=speech_lengths.device)
        if (budget < 1).any():
            raise ValueError(f"prompt + target need {self.max_positions - int(budget.min()) + 1} positions, more than "
                             f"the LLM's {self.max_positions}: lower prompt.max_target_tokens")
        cut = speech_lengths > budget
        return torch.minimum(speech_lengths, budget), int(cut.sum())

    @torch.no_grad()
    def prefix_cache(self, batch_size: int, llm=None):
        """Keys/values of the fixed prompt prefix, computed once per LLM/device/autocast state.

        Valid only while that LLM is frozen (no LoRA, no dropout): the prefix's states never change.
        """
        from transformers import DynamicCache

        llm = llm or self.llm
        device = llm.get_input_embeddings().weight.device
        key = (id(llm), device, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        if getattr(self, "_prefix_kv", (None,))[0] != key:
            ids = torch.tensor([self.prompt.prefix_ids], device=device)
            cache = llm(input_ids=ids, use_cache=True).past_key_values
            self._prefix_kv = (key, [(layer.keys, layer.values) for layer in cache.layers])
        # A fresh cache per step: the forward appends to it.
        layers = [(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)) for k, v in self._prefix_kv[1]]
        return DynamicCache(ddp_cache_data=layers, config=llm.config)

    # ----------------------------------------------------------------------------- the teacher

    def attach_frozen_teacher(self) -> None:
        """A frozen copy of the *original* LLM (rebuilt from its id/config, never from trained
        weights): the distillation teacher when the LLM itself is fully fine-tuned."""
        if self.teacher_llm is None:
            weights = self.llm.get_input_embeddings().weight
            self.teacher_llm, _ = build_llm(self.teacher_config(), empty=weights.is_meta)
            if not weights.is_meta:  # (an empty teacher keeps its real buffers where they are)
                self.teacher_llm.to(weights.device)

    def teacher_config(self):
        """The LLM config of the original LLM, frozen: the distillation teacher's."""
        base = {"freeze": True, "lora": {"enabled": False}}
        if self.merged_lora:  # the LLM's own folder holds merged weights: rebuild the base it came from
            base.update(pretrained=self.merged_lora["base_llm"], from_config=self.merged_lora["base_from_config"],
                        gguf_file=self.merged_lora["base_gguf_file"], tokenizer=None)
        return OmegaConf.merge(self.cfg.llm, base)

    @contextlib.contextmanager
    def original_llm(self):
        """Yields the original text LLM: a frozen copy when the LLM is fully trained, else the same
        weights with any LoRA adapters switched off (never through them)."""
        if self.teacher_llm is not None:
            yield self.teacher_llm
        elif self.merged_lora:
            raise RuntimeError("LoRA is merged into the LLM's weights, so they are no longer the original LLM: "
                               "call attach_frozen_teacher() first")
        elif hasattr(self.llm, "disable_adapter"):
            with self.llm.disable_adapter():
                yield self.llm
        elif self.llm_is_frozen():
            yield self.llm
        else:
            raise RuntimeError("the LLM is trained without LoRA: call attach_frozen_teacher() first")

    # ----------------------------------------------------------------------------- inference

    @torch.no_grad()
    def generate(self, feats: torch.Tensor, lengths: torch.Tensor, gen: GenerationConfig | None = None) -> list[str]:
        speech, speech_lengths = self.project(feats, lengths)
        speech_lengths, _ = self.fit_to_context(speech_lengths, None)
        return self.generate_rows(self.instruction_rows(speech_lengths.tolist())[0],
                                  self.flatten(speech, speech_lengths), gen, speech_lengths)

    @torch.no_grad()
    def generate_rows(self, rows: list[list[int]], speech: torch.Tensor | None = None,
                      gen: GenerationConfig | None = None, speech_lengths: torch.Tensor | None = None,
                      n_best: int = 1) -> list[str]:
        """Continue each row (left-padded, batched: equal to one by one) and decode the new tokens; with
        ``n_best`` > 1, the ``n_best`` best beams of each row, row after row."""
        gen = gen or self.cfg.generation
        max_new = gen.max_new_tokens
        if gen.max_new_tokens_per_speech_vector > 0 and speech_lengths is not None:
            max_new = min(max_new, math.ceil(gen.max_new_tokens_per_speech_vector * int(speech_lengths.max())) + 4)
        inputs = self.splice(rows, speech=speech)
        inputs.pop("position_ids")  # generate() derives them from the attention mask, step by step
        out = self.llm.generate(
            **inputs, max_new_tokens=max_new, num_beams=max(gen.num_beams, n_best), num_return_sequences=n_best,
            do_sample=False,
            repetition_penalty=gen.repetition_penalty, no_repeat_ngram_size=gen.no_repeat_ngram_size,
            eos_token_id=self.eos_id, pad_token_id=self.pad_id,
        )
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    @torch.no_grad()
    def transcript_log_probs(self, speech: torch.Tensor, speech_lengths: torch.Tensor, texts: list[str]) -> list[float]:
        """log p_LLM(text + EOS | prompt, speech) of each row's text, for (B, T, d) projected speech."""
        targets = self.target_ids(texts)
        rows, labels = self.instruction_rows(speech_lengths.tolist(), targets)
        hidden, tokens = self.labelled_hidden(rows, labels, self.flatten(speech, speech_lengths))
        token_lp = self.lm_head(hidden).float().log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
        return [float(part.sum()) for part in token_lp.split([len(t) for t in targets])]

    @torch.no_grad()
    def joint_generate(self, probs: torch.Tensor, frames: torch.Tensor, gen: GenerationConfig
                       ) -> list[tuple[str, str]]:
        """Joint CTC/LLM decoding (:mod:`speechllm.joint_decoding`) from (B, T, V) frame posteriors:
        ``(transcript, "llm" or "ctc")`` per clip, the second saying whose candidate won."""
        feats, lengths = self.encoder.compress(probs, frames)
        speech, speech_lengths = self.project(feats, lengths)
        speech_lengths, _ = self.fit_to_context(speech_lengths, None)
        n = max(gen.num_beams, 1)
        proposals = self.generate_rows(self.instruction_rows(speech_lengths.tolist())[0],
                                       self.flatten(speech, speech_lengths), gen, speech_lengths, n_best=n)
        greedy = self.encoder.greedy_from_posteriors(probs, frames)
        # The head's own reading first in each clip's list: on a tie, it wins.
        candidates = [list(dict.fromkeys([greedy[i], *proposals[i * n:(i + 1) * n]])) for i in range(len(probs))]
        clip = torch.tensor([i for i, c in enumerate(candidates) for _ in c], device=speech.device)
        flat = [text for c in candidates for text in c]
        llm = iter(self.transcript_log_probs(speech[clip], speech_lengths[clip], flat))  # one LLM pass for all
        out = []
        for i, texts in enumerate(candidates):
            ctc = self.encoder.ctc_log_likelihoods(probs[i], int(frames[i]), texts)
            best = joint_best([next(llm) for _ in texts], ctc, gen.ctc_weight)
            out.append((texts[best], "ctc" if best == 0 else "llm"))
        return out

    @torch.no_grad()
    def generate_from_text(self, texts: list[str], gen: GenerationConfig | None = None) -> list[str]:
        """The same prompt with each text's tokens in the speech slot (the LLM's text ceiling).

        Generation is bounded as for speech, each text token counting as one speech vector, so the
        ceiling and the speech path stop under the same rule.
        """
        ids = self.text_ids(texts)
        lengths = torch.tensor([len(i) for i in ids])
        return self.generate_rows(self.instruction_rows(ids)[0], gen=gen, speech_lengths=lengths)

    @torch.no_grad()
    def transcribe(self, audio: AudioInput | list[AudioInput], gen: GenerationConfig | None = None, *,
                   sample_rate: int | None = None, batch_size: int | None = None) -> list[str]:
        """One transcript per clip, in order (:meth:`transcribe_with_sources` without the sources)."""
        return [text for text, _ in self.transcribe_with_sources(audio, gen, sample_rate=sample_rate,
                                                                 batch_size=batch_size)]

    @torch.no_grad()
    def transcribe_with_sources(self, audio: AudioInput | list[AudioInput], gen: GenerationConfig | None = None, *,
                                sample_rate: int | None = None, batch_size: int | None = None) -> list[tuple[str, str]]:
        """``(transcript, source)`` per clip, in order; the source is ``llm``, or ``ctc`` where joint
        decoding (``generation.ctc_weight`` > 0) chose the CTC head's own greedy transcript.

        ``audio``: a file path, a numpy array or a torch tensor, or a list of them. Files are read at
        their own rate; arrays are at ``sample_rate`` (default: the encoder's). Channels are averaged
        and the audio resampled to the encoder's rate (``speechllm.audio``). Every path is checked
        before any is decoded; clips are read and generated ``batch_size`` at a time (default: all in one
        batch, as validation passes its batches; batched equals one by one), in eval mode (the mode is
        restored after).
        """
        gen = gen or self.cfg.generation
        if gen.ctc_weight > 0 and not hasattr(self.encoder, "ctc_log_likelihoods"):
            raise ValueError(f"generation.ctc_weight {gen.ctc_weight} needs a CTC encoder (encoder.kind: ctc), "
                             f"not {self.cfg.encoder.kind!r}")
        items = audio if isinstance(audio, (list, tuple)) else [audio]
        for item in items:
            if isinstance(item, (str, Path)):
                check_audio_file(item)
        was_training = self.training
        self.eval()
        try:
            out: list[tuple[str, str]] = []
            size = max(1, batch_size or len(items))
            for start in range(0, len(items), size):
                waves = prepare_waveforms(list(items[start:start + size]), self.cfg.encoder.sample_rate, sample_rate)
                if gen.ctc_weight > 0:
                    out += self.joint_generate(*self.encoder.posteriors(waves), gen)
                else:
                    out += [(text, "llm") for text in self.generate(*self.encoder.encode_speech(waves), gen)]
            return out
        finally:
            if was_training:
                self.train()

    # ----------------------------------------------------------------------------- saving

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.named_parameters() if p.requires_grad}

    def merge_lora(self) -> None:
        """Fold the LoRA adapters into the LLM's weights (peft ``merge_and_unload``): the same outputs
        within float rounding, and no peft needed to run it. ``save_pretrained`` then saves the LLM in
        full (``llm/``), since its weights are no longer the ones its id names."""
        lora = self.cfg.llm.lora
        if not lora.enabled or not hasattr(self.llm, "merge_and_unload"):
            raise ValueError("merge_lora: the LLM has no LoRA adapters (model.llm.lora.enabled is false)")
        if self.cfg.llm.load_in_4bit or self.cfg.llm.load_in_8bit:
            raise ValueError("merge_lora: the LLM is loaded in 4/8 bit; merge into unquantised weights "
                             "(load it with llm.load_in_4bit/load_in_8bit false)")
        self.cfg = copy.deepcopy(self.cfg)  # the caller's config (a stage's) is left as it was
        self.merged_lora = {"base_llm": self.cfg.llm.pretrained, "base_from_config": plain(self.cfg.llm.from_config),
                            "base_gguf_file": self.cfg.llm.gguf_file, "r": lora.r, "alpha": lora.alpha,
                            "target_modules": list(lora.target_modules)}
        self.llm = self.llm.merge_and_unload()
        self.llm.requires_grad_(False)
        self.llm.eval()
        self.cfg.llm.lora.enabled = False
        self.__dict__.pop("_prefix_kv", None)

    def save_pretrained(self, directory: str | Path, *, self_contained: bool = False, metrics: dict | None = None,
                        stage_config: dict | None = None, trainable: dict[str, torch.Tensor] | None = None) -> None:
        """The trained weights, the config that names the frozen parts (ids/paths) and a model card.

        A merged LLM (``merge_lora``) is saved in full under ``llm/``. ``self_contained`` also copies
        every frozen part that is a local file or folder into the directory (Hub ids stay ids), so it
        can be moved. ``metrics``/``stage_config`` go into the card; by default they are read from the
        stage directory around ``directory`` (``../metrics.json``, ``../config.yaml``) when it has them.
        Each file appears whole (``atomic_write``, synced to disk); ``model.json``, written last, marks
        a finished export. ``trainable``: the weights to save, where they were gathered already (FSDP:
        ``speechllm.sharding.gathered_trainable``); by default ``trainable_state_dict()``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        trainable = self.trainable_state_dict() if trainable is None else trainable
        atomic_write(directory / "trainable.safetensors", safetensors_bytes(trainable))
        cfg = OmegaConf.to_container(OmegaConf.structured(self.cfg), resolve=True, enum_to_str=True)
        local, origins = self._save_local_parts(directory, cfg, self_contained)
        meta = {"format": MODEL_FORMAT, "model": cfg, "local": local, "origins": origins,
                **({"merged_lora": self.merged_lora} if self.merged_lora else {})}
        found_stage, found_metrics = read_stage_files(directory.parent)
        card = render_model_card(meta, {n: t.numel() for n, t in trainable.items()},
                                 name=directory.parent.name if found_stage else directory.name,
                                 stage=stage_config if stage_config is not None else found_stage,
                                 metrics=metrics if metrics is not None else found_metrics, version=project_version())
        atomic_write(directory / "README.md", card)
        atomic_write(directory / "model.json", json.dumps(meta, indent=1))

    def _save_local_parts(self, directory: Path, cfg: dict, self_contained: bool) -> tuple[dict, dict]:
        """Save the merged LLM and (``self_contained``) copy the local frozen parts into ``directory``;
        point ``cfg`` at them. Returns model.json's ``local`` (key -> path in the export) and ``origins``
        (key -> the id/path each came from)."""
        local, origins = {}, {}

        def place(key: str, rel: str, write) -> None:
            node, name = _config_node(cfg, key)
            origins[key] = self.origins.get(key, node[name])
            target, tmp = directory / rel, directory / f".{rel}.tmp"
            if not (target.exists() and Path(str(node[name])).expanduser().resolve() == target.resolve()):
                _remove(tmp)  # (a part already in this export, saved again into it, stays as it is)
                write(tmp)
                _remove(target)
                tmp.replace(target)
            node[name], local[key] = rel, rel

        if self.merged_lora:
            def write_llm(tmp: Path) -> None:
                self.llm.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)

            place("llm.pretrained", LOCAL_PARTS["llm.pretrained"], write_llm)
            cfg["llm"].update(from_config=None, gguf_file=None, tokenizer=None)
            origins["llm.pretrained"] = self.merged_lora["base_llm"] or "a random LLM built from a config"
        for key, rel in LOCAL_PARTS.items() if self_contained else ():
            node, name = _config_node(cfg, key)
            value = node[name]
            if key in local or not value or not str(value).startswith((".", "/", "~")):
                continue  # saved above, unset, or a Hub id
            source = Path(value).expanduser()
            if not source.exists():
                continue  # cps.stats of a model that does not use it
            place(key, rel + source.suffix if source.is_file() else rel,
                  lambda tmp, src=source: shutil.copytree(src, tmp) if src.is_dir() else shutil.copy2(src, tmp))
        return local, origins

    def check_trainable(self, state: dict[str, torch.Tensor], source: str = "") -> None:
        """Every saved tensor must match a parameter of this model, by name and shape."""
        params = dict(self.named_parameters())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise ValueError(f"{source}: weights for parameters this model does not have: {unknown[:5]}")
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, model expects {tuple(params[name].shape)}")

    def load_trainable(self, state: dict[str, torch.Tensor], source: str = "") -> None:
        """Load trained weights (checked by :meth:`check_trainable`)."""
        self.check_trainable(state, source)
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)

    @classmethod
    def from_pretrained(cls, directory: str | Path, overrides: ModelConfig | None = None) -> SpeechLLM:
        directory = Path(directory)
        meta_path = directory / "model.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory} is not an exported model (no model.json)")
        meta = json.loads(meta_path.read_text())
        fmt = meta.get("format") if isinstance(meta, dict) else None
        if fmt not in READABLE_FORMATS or not isinstance(meta.get("model"), dict):
            raise ValueError(f"{meta_path}: format {fmt!r} is not an exported model this version reads "
                             f"(format {' or '.join(map(str, READABLE_FORMATS))}, with a 'model' config)")
        cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), meta["model"])
        for key, rel in meta.get("local", {}).items():  # parts saved inside the export
            OmegaConf.update(cfg, key, str(directory / rel))
        if overrides is not None:
            cfg = OmegaConf.merge(cfg, overrides)
        model = cls.build(cfg)
        model.load_trainable(load_file(str(directory / "trainable.safetensors")), str(directory))
        model.merged_lora = meta.get("merged_lora")
        model.origins = dict(meta.get("origins", {}))
        return model.eval()  # for inference, as transformers' from_pretrained (LoRA dropout off)
