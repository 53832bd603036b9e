"""``python -m stages estimate PIPELINE``: GPU memory per device and hours per 1k steps of every stage,
computed from parameter and activation counts. **Estimates, not measurements.**

Nothing is downloaded: each Hub id's shape is written below (``LLM_SHAPES``, ``ENCODER_SHAPES``),
transcribed from the model's public ``config.json`` / model card; encoder parameters are counted by
transformers itself on the meta device (no memory); ``from_config`` models (tests) use their config.

**Memory per device** (bytes per parameter; Adam = AdamW's two moments, 8-bit AdamW: 2 bytes):

- frozen encoder: 4 (our encoders load in float32); frozen LLM: its ``llm.dtype`` (2 for bf16; 4-bit /
  8-bit loading: 0.5 / 1);
- trained projector and LoRA adapters (float32): 4 weights + 4 gradients + 8 Adam = 16;
- fully fine-tuned LLM: weights, gradients and Adam moments all in ``llm.dtype`` (torch's AdamW keeps
  its moments in the parameter's dtype): 4 x dtype bytes (16 for float32 master weights);
- distillation with a fully fine-tuned LLM adds the frozen teacher copy (``llm.dtype``);
- FSDP (``trainer.strategy: fsdp``, FSDP2 units per decoder layer, embedding/head, projector): every
  parameter, gradient and moment above but the frozen encoder's (whole on every device) is divided by
  the N devices, plus two gathered decoder layers (the one computing and the one prefetched); DDP keeps
  a full copy on each device;
- activations kept for the backward pass, per token per decoder layer, with bf16 autocast
  (a = 2 bytes; 4 in float32) and the residual stream in r bytes (4 when the weights are float32,
  else a)::

      trained LLM layer:  2 h r + a (4 h + 2 d_kv + 4 I)   (norm inputs; q/k/v input, q, k, v, attention
                                                           output, MLP input, gate, up, SiLU(gate), down input)
      frozen LLM layer:   2 h r + a (2 h + 2 d_kv + 3 I)   (a frozen Linear keeps no input: only norm inputs,
                                                           q, k, v and the attention output for SDPA's backward,
                                                           gate, up, SiLU(gate))
      LoRA adds           a h                               (the adapters' shared input)

  (h hidden size, I MLP width, d_kv = kv heads x head dim; SDPA/flash attention, so no (length x length)
  score matrix is kept; no dropout.) With activation checkpointing (``llm.gradient_checkpointing``)
  only each layer's input is kept (h r per token per layer) plus one layer recomputed at a time. The
  frozen encoder and the teacher run under ``no_grad`` and keep nothing. The chunked loss holds one
  ``loss_chunk_size x vocabulary`` float32 block 3 times over (logits, probabilities, gradient), 5
  times when a teacher's block is beside it. Plus 1 GB of CUDA context and workspace. Allocator
  fragmentation is not counted.

**Time**: FLOPs per step over the hardware's peak at an assumed MFU (default 40 % of an H100's
989 TFLOP/s dense bf16). Per token (N = the parameters a token passes through, embeddings excluded):
a trained LLM 6 N (forward 2 N, backward 4 N), a frozen LLM that gradients pass through 4 N (forward +
input gradients), LoRA 4 N + 6 N_lora, activation checkpointing one more forward (+2 N); a teacher and
a frozen encoder 2 N (forward only, the encoder per frame at the rate its layers run); causal attention
adds 2 L h P per position forward (mean context P / 2), 3 times that with its backward; the LM head 2 V h
per labelled position for each pass it makes (forward, recompute under the chunk checkpoint, backward).
The projector trains: 6 N per speech vector. Selection (clustering, probing, synthesis) and evaluation
are not counted.

**The rows** (``RowModel``: stated assumptions, overridable): a speech row is ``speech_seconds`` of
audio (LibriSpeech's mean utterance, 12.3 s, capped by ``data.max_audio_seconds``) at
``words_per_second`` 2.7, ``tokens_per_word`` 1.3 LLM tokens (Qwen2.5's BPE on English), a 30-token
prompt; the encoder emits ``units_per_word`` 1.6 CTC units a word after LSD, 50 / ``stack_frames``
Whisper frames a second, 6.25 SeamlessM4Tv2 vectors a second; a simulated row is ``text_words`` 20
words (a LibriSpeech LM sentence); a ``text`` row ``doc_words`` 400 words (capped by
``data.max_train_words``); an interleaved row has its words' speech share from the span lengths (10-30
text, 5-15 speech words: 1/3), the encoder running on the speech spans only, and a teacher reading
the whole row as text. Rows per device: ``data.batch_size``, or what ``data.batching`` lets through
at the mean row; each source weighted by its share averaged over ``trainer.max_steps``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace
from typing import Any

GIB = 1024**3


# ------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class LLMShape:
    """A decoder-only LLM (Qwen2/Llama family: GQA attention, SwiGLU MLP, RMSNorm)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    qkv_bias: bool = True
    source: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        attention = 2 * h * h + 2 * h * kv + ((h + 2 * kv) if self.qkv_bias else 0)
        return attention + 3 * h * i + 2 * h  # + two RMSNorm weights

    def body_params(self) -> int:
        """What a token's forward multiplies by (decoder layers; not the embedding lookup, not the LM head)."""
        return self.layers * self.layer_params() + self.hidden  # + the final norm

    def params(self) -> int:
        return self.body_params() + self.vocab * self.hidden * (1 if self.tied else 2)

    def lora_params(self, r: int, targets: list[str]) -> int:
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        unknown = [t for t in targets if t not in dims]
        if unknown:
            raise ValueError(f"LoRA target modules {unknown} are not Linear layers of a Qwen2/Llama decoder ({', '.join(dims)})")
        return self.layers * sum(r * (dims[t][0] + dims[t][1]) for t in targets)


# Transcribed from each model's config.json on huggingface.co (not downloaded here).
_QWEN25_15B = LLMShape(1536, 28, 8960, 12, 2, 151936, tied=True, source="Qwen/Qwen2.5-1.5B(-Instruct) config.json")
_QWEN25_3B = LLMShape(2048, 36, 11008, 16, 2, 151936, tied=True, source="Qwen/Qwen2.5-3B(-Instruct) config.json")
_QWEN25_7B = LLMShape(3584, 28, 18944, 28, 4, 152064, tied=False, source="Qwen/Qwen2.5-7B(-Instruct) config.json")
LLM_SHAPES = {
    "Qwen/Qwen2.5-1.5B": _QWEN25_15B, "Qwen/Qwen2.5-1.5B-Instruct": _QWEN25_15B,
    "Qwen/Qwen2.5-3B": _QWEN25_3B, "Qwen/Qwen2.5-3B-Instruct": _QWEN25_3B,
    "Qwen/Qwen2.5-7B": _QWEN25_7B, "Qwen/Qwen2.5-7B-Instruct": _QWEN25_7B,
}


@dataclass(frozen=True)
class EncoderShape:
    """A frozen speech encoder: the transformers config its towers are built from (on the meta device,
    to count parameters), the rate its layers run at, and the text tower for a unified encoder."""

    family: str  # whisper | parakeet_ctc | seamless_m4t_v2
    config: dict[str, Any]
    layer_hz: float  # frames a second through the (most of the) encoder's layers
    layers: int
    width: int
    output_dim: int
    source: str = ""
    _counts: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def counts(self) -> dict[str, int]:
        """``{"speech": parameters of the speech side, "text": of the text tower (0 if none),
        "text_embeddings": of the text tower's embedding table}``, counted by transformers."""
        if not self._counts:
            self._counts.update(_count_encoder(self.family, self.config))
        return self._counts


def _count_encoder(family: str, config: dict[str, Any]) -> dict[str, int]:
    import torch

    def n(module) -> int:
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        if family == "whisper":
            from transformers import WhisperConfig
            from transformers.models.whisper.modeling_whisper import WhisperEncoder

            return {"speech": n(WhisperEncoder(WhisperConfig(**config))), "text": 0, "text_embeddings": 0}
        if family == "parakeet_ctc":
            from transformers import ParakeetCTCConfig, ParakeetForCTC

            return {"speech": n(ParakeetForCTC(ParakeetCTCConfig(**config))), "text": 0, "text_embeddings": 0}
        if family == "seamless_m4t_v2":
            from transformers import SeamlessM4Tv2Config
            from transformers.models.seamless_m4t_v2.modeling_seamless_m4t_v2 import (
                SeamlessM4Tv2Encoder,
                SeamlessM4Tv2SpeechEncoder,
            )

            cfg = SeamlessM4Tv2Config(**config)
            text = SeamlessM4Tv2Encoder(cfg)
            return {"speech": n(SeamlessM4Tv2SpeechEncoder(cfg)), "text": n(text),
                    "text_embeddings": text.embed_tokens.weight.numel()}
    raise ValueError(f"unknown encoder family {family!r}")


# Transcribed from the public configs: openai/whisper-large-v3 config.json; nvidia/parakeet-ctc-1.1b's model
# card (FastConformer: 42 layers, d_model 1024, 8 heads, FFN x4, 8x subsampling to 80 ms frames, 1024 BPE +
# blank); facebook/seamless-m4t-v2-large config.json (= SeamlessM4Tv2Config's defaults: w2v-BERT 2.0 speech
# encoder of 24 conformer layers at 20 ms frames, adaptor stride 8; NLLB text encoder of 24 layers).
ENCODER_SHAPES = {
    "openai/whisper-large-v3": EncoderShape(
        "whisper", dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                        num_mel_bins=128, max_source_positions=1500, vocab_size=51866),
        layer_hz=50.0, layers=32, width=1280, output_dim=1280, source="openai/whisper-large-v3 config.json"),
    "nvidia/parakeet-ctc-1.1b": EncoderShape(
        "parakeet_ctc", dict(encoder_config=dict(hidden_size=1024, num_hidden_layers=42, num_attention_heads=8,
                                                 intermediate_size=4096, conv_kernel_size=9, subsampling_factor=8,
                                                 subsampling_conv_channels=256, num_mel_bins=80), vocab_size=1025),
        layer_hz=12.5, layers=42, width=1024, output_dim=1025, source="nvidia/parakeet-ctc-1.1b model card"),
    "facebook/seamless-m4t-v2-large": EncoderShape(
        "seamless_m4t_v2", {}, layer_hz=50.0, layers=24, width=1024, output_dim=1024,
        source="facebook/seamless-m4t-v2-large config.json (SeamlessM4Tv2Config defaults)"),
}


def llm_shape(llm) -> LLMShape:
    if llm.from_config:
        c = dict(llm.from_config)
        heads = c.get("num_attention_heads", 32)
        return LLMShape(c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], heads,
                        c.get("num_key_value_heads", heads), c.get("vocab_size", 32000),
                        tied=bool(c.get("tie_word_embeddings", False)), qkv_bias=c.get("model_type") == "qwen2",
                        source="from_config")
    if llm.pretrained in LLM_SHAPES:
        return LLM_SHAPES[llm.pretrained]
    raise ValueError(f"model.llm.pretrained {llm.pretrained!r}: no shape known to the estimator "
                     f"(have {', '.join(LLM_SHAPES)}); add it to stages.estimate.LLM_SHAPES")


def encoder_shape(enc) -> EncoderShape:
    if enc.pretrained in ENCODER_SHAPES and not enc.from_config:
        return ENCODER_SHAPES[enc.pretrained]
    raise ValueError(f"model.encoder.pretrained {enc.pretrained!r}: no shape known to the estimator "
                     f"(have {', '.join(ENCODER_SHAPES)}); add it to stages.estimate.ENCODER_SHAPES")


# ------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class RowModel:
    """What an average training row holds (stated assumptions; see the module docstring)."""

    speech_seconds: float = 12.3
    words_per_second: float = 2.7
    tokens_per_word: float = 1.3
    units_per_word: float = 1.6
    prompt_tokens: int = 30
    text_words: float = 20.0
    doc_words: float = 400.0


@dataclass
class Row:
    """One average row of a source: positions the student LLM reads (and how many are labelled), what
    a teacher reads, speech vectors through the projector, encoder frames, text-tower tokens."""

    positions: float
    labelled: float
    teacher: float = 0.0
    vectors: float = 0.0
    encoder_frames: float = 0.0
    text_tower_tokens: float = 0.0
    seconds: float = 0.0  # of speech, for data.batching.max_seconds


def vectors_per_second(cfg, shape: EncoderShape, rows: RowModel) -> float:
    enc = cfg.model.encoder
    if enc.kind == "ctc":
        return rows.words_per_second * rows.units_per_word if enc.lsd else shape.layer_hz / cfg.model.projector.stack_frames
    if enc.kind == "dual_tower":
        return 50.0 / 8  # 20 ms frames, adaptor stride 8
    return shape.layer_hz / cfg.model.projector.stack_frames


def source_row(cfg, kind: str, shape: EncoderShape, rows: RowModel) -> Row:
    """The average row of a source of ``kind`` (speech | simulated | text) in this stage."""
    seconds = min(rows.speech_seconds, cfg.data.max_audio_seconds)
    tpw, enc = rows.tokens_per_word, cfg.model.encoder
    distill = cfg.kind in ("distill", "select")
    if kind == "text":
        words = min(rows.doc_words, cfg.data.max_train_words or rows.doc_words)
        return Row(positions=words * tpw + 1, labelled=words * tpw, teacher=words * tpw + 1)
    if kind == "simulated":
        words = min(rows.text_words, cfg.data.max_train_words or rows.text_words)
        target = min(words * tpw, cfg.model.prompt.max_target_tokens) + 1
        if enc.kind == "dual_tower":
            vectors = text_tokens = words * tpw
        else:  # CPS: one row per CTC unit, each kept with keep_prob; no encoder runs
            vectors, text_tokens = words * rows.units_per_word * enc.cps.keep_prob, 0.0
        return Row(positions=rows.prompt_tokens + vectors + target, labelled=target, vectors=vectors,
                   text_tower_tokens=text_tokens)
    words, vps = seconds * rows.words_per_second, vectors_per_second(cfg, shape, rows)
    if distill and cfg.distill.format == "interleaved":
        text_span, speech_span = (sum(cfg.distill.text_span_words) / 2, sum(cfg.distill.speech_span_words) / 2)
        speech_share = speech_span / (text_span + speech_span)
        text_tokens = (1 - speech_share) * words * tpw
        return Row(positions=1 + text_tokens + speech_share * seconds * vps, labelled=text_tokens,
                   teacher=1 + words * tpw, vectors=speech_share * seconds * vps,
                   encoder_frames=speech_share * seconds * shape.layer_hz, seconds=seconds)
    target = min(words * tpw, cfg.model.prompt.max_target_tokens) + 1
    row = Row(positions=rows.prompt_tokens + seconds * vps + target, labelled=target, vectors=seconds * vps,
              encoder_frames=seconds * shape.layer_hz, seconds=seconds)
    if distill:  # instruction format: the teacher reads the words in the prompt
        row.teacher = rows.prompt_tokens + words * tpw + target
    return row


def rows_per_device(cfg, row: Row) -> int:
    b = cfg.data.batching
    n = cfg.data.batch_size
    if b.max_seconds > 0 and row.seconds > 0:
        n = min(n, max(1, int(b.max_seconds // row.seconds)))
    if b.max_tokens > 0:
        n = min(n, max(1, int(b.max_tokens // row.labelled)))
    return n


def mean_shares(cfg, kinds: dict[str, str]) -> dict[str, float]:
    """Each source's share averaged over the stage's steps (normalised at every step, as the sampler does)."""
    from speechllm.schedules import ramp

    steps = max(1, cfg.trainer.max_steps)
    points = sorted({round(i * (steps - 1) / 199) for i in range(200)})
    total = dict.fromkeys(kinds, 0.0)
    for step in points:
        raw = {}
        for name in kinds:
            s = cfg.data.sources[name].share if cfg.data.sources else None
            raw[name] = ramp(s.kind, s.start, s.end, s.start_step, s.end_step, step) if s else 1.0
        norm = sum(raw.values()) or 1.0
        for name in kinds:
            total[name] += raw[name] / norm / len(points)
    return total


def stage_sources(cfg) -> dict[str, str]:
    """``{source name: kind}`` of a stage's training data (a share 0 throughout switches a source off)."""
    from lightning_modules import STAGE_KINDS

    if cfg.data.sources:
        return {n: str(s.kind) for n, s in cfg.data.sources.items() if not (s.share.start == 0 and not s.share.end)}
    return {"train": str(STAGE_KINDS[cfg.kind].source_kinds[0])}


# ------------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Hardware:
    name: str = "H100 80GB"
    memory_gib: float = 80.0
    peak_tflops: float = 989.0  # dense bf16
    mfu: float = 0.40


@dataclass
class Estimate:
    stage: str
    kind: str
    devices: int
    strategy: str
    rows_per_step: int
    positions_per_step: float
    params: dict[str, int]  # encoder, llm, projector, lora, trained
    memory_gib: dict[str, float]  # weights_states, activations, loss, other, total
    flops_per_step: float
    hours_per_1k: float
    steps: int
    checkpointing: bool

    @property
    def hours_total(self) -> float:
        return self.hours_per_1k * self.steps / 1000


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _devices(t) -> int:
    if isinstance(t.devices, int) and t.devices > 0:
        return t.devices * t.num_nodes
    if not isinstance(t.devices, (int, str)):  # a list of device indices
        return len(t.devices) * t.num_nodes
    raise ValueError(f"trainer.devices {t.devices!r}: the estimate needs a device count (trainer.devices=8)")


def estimate_stage(name: str, cfg, rows: RowModel = RowModel(), hw: Hardware = Hardware()) -> Estimate:
    m, t = cfg.model, cfg.trainer
    llm, enc_shape = llm_shape(m.llm), encoder_shape(m.encoder)
    counts = enc_shape.counts()
    n_dev = _devices(t)
    fsdp = t.strategy == "fsdp"
    h, L, V = llm.hidden, llm.layers, llm.vocab

    # parameters
    in_dim = enc_shape.output_dim * m.projector.stack_frames
    projector = (2 * in_dim if m.projector.layer_norm else 0) + in_dim * m.projector.hidden_dim + m.projector.hidden_dim \
        + m.projector.hidden_dim * h + h + (in_dim * h if m.projector.unit_lookup else 0)
    full_ft = not m.llm.freeze and not m.llm.lora.enabled
    lora = llm.lora_params(m.llm.lora.r, list(m.llm.lora.target_modules)) if m.llm.lora.enabled else 0
    llm_params = llm.params()
    encoder_params = counts["speech"] + counts["text"]
    teacher = full_ft and cfg.kind in ("distill", "select") and cfg.distill.alpha > 0

    # bytes of parameters, gradients and optimizer states
    w_b = 0.5 if m.llm.load_in_4bit else 1 if m.llm.load_in_8bit else _DTYPE_BYTES[str(m.llm.dtype)]
    adam_b = 2 if str(cfg.optim.optimizer) == "adamw8bit" else 8  # float32 trained parts: two moments
    trained_f32 = (projector + lora) * (4 + 4 + adam_b)
    moments_b = 2 if str(cfg.optim.optimizer) == "adamw8bit" else 2 * w_b  # full FT: AdamW's moments in the LLM's dtype
    llm_bytes = llm_params * (2 * w_b + moments_b if full_ft else w_b)
    static = trained_f32 + llm_bytes + (llm_params * w_b if teacher else 0)
    gathered = 0.0
    if fsdp:
        static /= n_dev
        gathered = 2 * llm.layer_params() * w_b
    static += encoder_params * 4  # the frozen encoder stays whole on every device (speechllm.sharding)

    # activations and FLOPs, per source
    bf16 = str(t.precision) in ("auto", "bf16-mixed", "bf16-true", "16-mixed", "16-true")
    a_b = 2 if bf16 else 4
    r_b = 4 if w_b == 4 else a_b
    kv, inter = llm.kv_dim, llm.intermediate
    per_token_layer = (2 * h * r_b + a_b * (4 * h + 2 * kv + 4 * inter) if full_ft
                       else 2 * h * r_b + a_b * (2 * h + 2 * kv + 3 * inter) + (a_b * h if lora else 0))
    ckpt = bool(m.llm.gradient_checkpointing)
    body = llm.body_params()
    llm_pass = 6 if full_ft else 4  # x N per student token (forward + backward)
    lm_head_passes = (3 if full_ft else 2) + 1  # forward, backward (+ weight gradient when trained), recompute
    kinds = stage_sources(cfg)
    shares = mean_shares(cfg, kinds)
    chunk = m.loss_chunk_size or 0
    act_peak = loss_peak = 0.0
    flops_step = rows_step = positions_step = 0.0
    text_body = counts["text"] - counts["text_embeddings"]
    for src, kind in kinds.items():
        row = source_row(cfg, kind, enc_shape, rows)
        n = rows_per_device(cfg, row)
        tokens = n * row.positions
        if ckpt:
            act = tokens * L * h * r_b + tokens * per_token_layer
        else:
            act = tokens * L * per_token_layer
        labelled = n * row.labelled
        block = min(chunk, labelled) if chunk else labelled
        loss = block * V * 4 * (5 if row.teacher and cfg.distill.alpha > 0 else 3)
        act_peak, loss_peak = max(act_peak, act), max(loss_peak, loss)
        attention = 2 * L * h * row.positions  # per position, forward
        student = row.positions * ((llm_pass + (2 if ckpt else 0)) * body + 3 * attention) \
            + row.labelled * lm_head_passes * 2 * V * h + (6 * lora * row.positions if lora else 0)
        teacher_f = (row.teacher * (2 * body + 2 * L * h * row.teacher) + row.labelled * 2 * V * h
                     if row.teacher and cfg.distill.alpha > 0 else 0.0)
        enc_attention = 4 * enc_shape.layers * enc_shape.width * (row.encoder_frames or 0)  # bidirectional, per frame
        encoder_f = row.encoder_frames * (2 * counts["speech"] + enc_attention) + row.text_tower_tokens * 2 * text_body
        proj_f = 6 * projector * row.vectors
        per_row = student + teacher_f + encoder_f + proj_f
        rows_global = n * n_dev * t.accumulate_grad_batches
        flops_step += shares[src] * rows_global * per_row
        rows_step += shares[src] * rows_global
        positions_step += shares[src] * rows_global * row.positions
    other = 1.0 * GIB
    memory = {"weights_states": (static + gathered) / GIB, "activations": act_peak / GIB, "loss": loss_peak / GIB,
              "other": other / GIB}
    memory["total"] = sum(memory.values())
    hours = 1000 * flops_step / (n_dev * hw.peak_tflops * 1e12 * hw.mfu) / 3600
    trained = projector + lora + (llm_params if full_ft else 0)
    return Estimate(name, cfg.kind, n_dev, "fsdp" if fsdp else ("ddp" if n_dev > 1 else "single"), round(rows_step),
                    positions_step, {"encoder": encoder_params, "llm": llm_params, "projector": projector, "lora": lora,
                                     "trained": trained}, memory, flops_step, hours, t.max_steps, ckpt)


def estimate_pipeline(pipeline: str, overrides: list[str] | None = None, scale: str | None = None,
                      rows: RowModel = RowModel(), hw: Hardware = Hardware()) -> list[Estimate]:
    """Every enabled stage of a pipeline, its configs resolved (and validated) as ``run`` would."""
    from stages.runner import resolve_stage_configs

    return [estimate_stage(name, cfg, rows, hw)
            for name, _, cfg in resolve_stage_configs(pipeline, overrides or [], None, scale) if cfg.enabled]


def _b(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.1f} M"


def markdown_table(estimates: list[Estimate], hw: Hardware) -> str:
    lines = ["| stage | kind | devices | rows / step | positions / step | trained params | memory / device (GiB): "
             "weights+states / activations / loss / total | hours / 1k steps | steps | hours |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in estimates:
        mem = e.memory_gib
        fits = "" if mem["total"] <= hw.memory_gib else f" (over {hw.memory_gib:.0f})"
        lines.append(
            f"| {e.stage} | {e.kind} | {e.devices} ({e.strategy}) | {e.rows_per_step:,} | {e.positions_per_step:,.0f} | "
            f"{_b(e.params['trained'])} | {mem['weights_states']:.1f} / {mem['activations']:.1f}"
            f"{' (ckpt)' if e.checkpointing else ''} / {mem['loss']:.1f} / **{mem['total']:.1f}**{fits} | "
            f"**{e.hours_per_1k:.3g}** | {e.steps:,} | {e.hours_total:.3g} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="pipeline YAML, e.g. configs/pipeline/salad_paper.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied to every stage")
    parser.add_argument("--scale", help="one of the pipeline's scales (default: its first)")
    parser.add_argument("--mfu", type=float, default=Hardware.mfu, help="assumed model FLOPs utilisation (default: %(default)s)")
    parser.add_argument("--peak-tflops", type=float, default=Hardware.peak_tflops,
                        help="dense bf16 peak per device (default: %(default)s, an H100 SXM)")
    parser.add_argument("--gpu-memory", type=float, default=Hardware.memory_gib, help="GiB per device (default: %(default)s)")
    for f in fields(RowModel):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=float, default=f.default,
                            help=f"row assumption {f.name} (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    hw = Hardware(peak_tflops=args.peak_tflops, memory_gib=args.gpu_memory, mfu=args.mfu)
    rows = replace(RowModel(), **{f.name: type(f.default)(getattr(args, f.name)) for f in fields(RowModel)})
    estimates = estimate_pipeline(args.pipeline, args.overrides, args.scale, rows, hw)
    print(markdown_table(estimates, hw))
    print(f"\nEstimates, not measurements: {hw.name}-class devices at {hw.peak_tflops:g} TFLOP/s x MFU {hw.mfu:.0%}; "
          f"rows: {rows}. Formulas: stages/estimate.py.")
    return 0
