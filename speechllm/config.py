"""Typed configuration: dataclass schemas merged with YAML files and ``key=value`` overrides.

Every YAML is merged into a structured OmegaConf object, so an unknown or mistyped key fails at
load time with the key *and the file* named (the failure mode of untyped Hydra configs).
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from speechllm.augment import AugmentConfig
from speechllm.choices import Choice
from speechllm.schedules import Ramp


class ConfigError(ValueError):
    """A config file or override that does not match the schema."""


def setting(default: Any = None, help: str = "", *, factory: Callable[[], Any] | None = None) -> Any:
    """A schema field with its help text (shown by ``python -m stages schema`` and in load errors)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


# --------------------------------------------------------------------------------------- choices


class Backbone(Choice):
    whisper = "whisper"


class TextSide(Choice):
    cps = "cps"
    matched = "matched"
    learned = "learned"


class DType(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class SourceKind(Choice):
    speech = "speech"  # audio through the encoder
    simulated = "simulated"  # text through the encoder's text side (CPS or a text tower)
    text = "text"  # plain text read by the LLM, no speech (SALAD's text share)


class TargetNormalization(Choice):
    tasu = "tasu"
    none = "none"


class WERNormalizer(Choice):
    whisper = "whisper"
    tasu = "tasu"
    none = "none"


class KLDirection(Choice):
    forward = "forward"
    reverse = "reverse"
    jsd = "jsd"


class DistillFormat(Choice):
    interleaved = "interleaved"
    instruction = "instruction"


class BudgetUnit(Choice):
    texts = "texts"
    words = "words"
    seconds = "seconds"
    fraction = "fraction"


class Optimizer(Choice):
    adamw = "adamw"
    adamw8bit = "adamw8bit"


class Schedule(Choice):
    cosine = "cosine"
    constant = "constant"
    wsd = "wsd"


class LossKernel(Choice):
    torch = "torch"  # our chunked loss (speechllm.losses), everywhere
    liger = "liger"  # Liger-Kernel's fused linear cross-entropy / JSD on CUDA; torch elsewhere


# --------------------------------------------------------------------------------------- model


@dataclass
class CPSConfig:
    """CTC posterior simulation (CPS, docs/methods.md#cps); defaults are TASU's released code values."""

    smoothing_max: float = setting(0.1, "label smoothing a ~ U(0, smoothing_max), one draw per utterance")
    keep_prob: float = setting(0.95, "each row is kept independently with this probability")
    insert_prob: float = setting(0.0, "floor(L' * insert_prob) insertions (off by default, as in TASU)")
    insert_repeat_share: float = setting(0.5, "share of insertions that repeat the previous row (else a blank)")
    side_share: float = setting(
        1.0, "share of utterances simulated by encoder.text_side when it is matched or learned; the rest by "
        "the rules above (TASU's CPS)")
    stats: Optional[str] = setting(None, "posterior statistics file (text_side: matched; `prepare posterior-stats`)")
    simulator: Optional[str] = setting(None, "learned posterior simulator folder (text_side: learned; `prepare simulator`)")
    wer_min: float = setting(0.0, "learned: each utterance requests a greedy WER drawn uniformly in [wer_min, wer_max]")
    wer_max: float = setting(0.5, "learned: the top of that range")


@dataclass
class EncoderConfig:
    """The frozen speech encoder: ``pretrained`` (Hub id or local path) or ``from_config`` (random
    weights, for tests). The fields a kind reads are declared by its entry in ``speechllm.encoders``."""

    kind: str = setting("ctc", "an encoder kind registered in speechllm.encoders (ctc, whisper, dual_tower, ...)")
    pretrained: Optional[str] = setting(None, "Hub id or local path of the encoder")
    from_config: Optional[dict[str, Any]] = setting(None, "a transformers config: random weights (tests)")
    init_seed: int = setting(0, "makes from_config weights identical in every process and on reload")
    backbone: Optional[Backbone] = setting(None, "ctc: the encoder under a separately trained CTC head")
    ctc_head: Optional[str] = setting(None, "ctc: path of a CTC head saved by `prepare ctc-head`")
    vocab: Optional[list[str]] = setting(None, "ctc: CTC vocabulary of a from_config model (index 0 = blank); "
                                         "dual_tower: the alphabet of its from_config character tokenizer")
    blank_id: Optional[int] = setting(None, "ctc: blank index (default: the model's pad_token_id)")
    lsd: bool = setting(True, "ctc: label-synchronous compression of the posteriors")
    lsd_blank_threshold: float = setting(0.9, "ctc: LSD drops vectors whose blank probability is at least this")
    text_side: TextSide = setting(
        TextSide.cps, "ctc: what turns text into posteriors: cps (TASU's rules), matched (the head's measured "
        "confusions and real vectors, cps.stats) or learned (a trained simulator at a requested WER, cps.simulator)")
    cps: CPSConfig = setting(help="ctc: simulated posteriors for the text side", factory=CPSConfig)
    sample_rate: int = setting(16000, "audio sample rate the encoder expects (clips are resampled to it)")


@dataclass
class ProjectorConfig:
    """Encoder space -> LLM embedding space. Default: TASU's LayerNorm-Linear-SiLU-Linear."""

    hidden_dim: int = setting(2048, "width of the MLP's hidden layer")
    stack_frames: int = setting(1, "frame stacking (downsampling k) before the MLP; 1 = none")
    layer_norm: bool = setting(True, "LayerNorm on the encoder features first")
    init_from_llm_embeddings: bool = setting(
        False, "start each CTC unit's row from the LLM's embedding of the unit's string (CTC encoders only)")
    unit_lookup: bool = setting(
        False, "a trainable table of the LLM's embeddings of the CTC units, applied to the posteriors and "
        "added to a zero-started MLP: the projector starts as the posterior-weighted unit embedding (CTC "
        "encoders only; see speechllm.projector)")
    lookup_min_prob: float = setting(
        1e-3, "the table reads only units with at least this probability (label smoothing's ~1e-5 on "
        "every unit would give every row an Adam step)")


@dataclass
class LoRAConfig:
    enabled: bool = setting(False, "train LoRA adapters of the LLM (peft)")
    r: int = setting(16, "LoRA rank")
    alpha: int = setting(32, "LoRA alpha (scale alpha / r)")
    dropout: float = setting(0.05, "LoRA dropout")
    target_modules: list[str] = setting(help="modules that get adapters", factory=lambda: ["q_proj", "v_proj"])


@dataclass
class LLMConfig:
    pretrained: Optional[str] = setting(None, "Hub id or local path of the causal LM")
    gguf_file: Optional[str] = setting(None, "a GGUF file inside `pretrained` to dequantise (transformers)")
    from_config: Optional[dict[str, Any]] = setting(None, "a transformers config: random weights (tests)")
    init_seed: int = setting(0, "makes from_config weights identical in every process and on reload")
    tokenizer: Optional[str] = setting(None, "tokenizer id/path (default: pretrained)")
    char_alphabet: str = setting(" abcdefghijklmnopqrstuvwxyz'.,?!",
                                 "from_config models get a character tokenizer over this alphabet (tests)")
    dtype: DType = setting(DType.float32, "weights of the LLM")
    load_in_4bit: bool = setting(False, "load the LLM in 4 bit (bitsandbytes NF4)")
    load_in_8bit: bool = setting(False, "load the LLM in 8 bit (bitsandbytes)")
    freeze: bool = setting(True, "keep the LLM's own weights frozen (false = full fine-tuning)")
    lora: LoRAConfig = setting(help="LoRA adapters", factory=LoRAConfig)
    gradient_checkpointing: bool = setting(False, "recompute the LLM's activations in the backward pass")
    attn_implementation: Optional[str] = setting(None, "transformers attn_implementation (eager, sdpa, ...)")


@dataclass
class PromptConfig:
    """How the speech is placed in the LLM input: ``{task_prompt}<speech>`` as the user turn."""

    task_prompt: str = setting("Transcribe the audio:", "text before the speech in the user turn")
    use_chat_template: bool = setting(True, "render the prompt with the LLM's chat template")
    system_prompt: Optional[str] = setting(
        None, "None keeps the template's default (SmolLM2 then inserts its own ~20-token system prompt); "
        "\"\" passes an empty system turn where the template allows it")
    max_target_tokens: int = setting(128, "training targets are cut to this many tokens")
    cache_prefix: bool = setting(True, "reuse the fixed prompt prefix's keys/values while the LLM is frozen")


@dataclass
class GenerationConfig:
    num_beams: int = setting(1, "beam size (1 = greedy)")
    max_new_tokens: int = setting(128, "upper bound on generated tokens")
    max_new_tokens_per_speech_vector: float = setting(
        0.0, "length guard: at most ceil(ratio * speech vectors) + 4 new tokens (0 = off); a transcript is "
        "never much longer than its label-rate input, and a looping model stops early")
    repetition_penalty: float = setting(1.0, "transformers' repetition penalty (1 = off)")
    no_repeat_ngram_size: int = setting(0, "repetition guard: no n-gram twice (0 = off)")
    ctc_weight: float = setting(
        0.0, "joint CTC/LLM decoding (CTC encoders; speechllm.joint_decoding): the LLM's num_beams best "
        "transcripts and the CTC head's greedy one, scored (1 - w) log p_LLM + w log p_CTC of the frames; "
        "0 = the LLM's best alone")

    def __post_init__(self) -> None:
        if not 0.0 <= self.ctc_weight <= 1.0:
            raise ValueError(f"generation.ctc_weight must be in [0, 1], got {self.ctc_weight}")


@dataclass
class ModelConfig:
    encoder: EncoderConfig = setting(help="the frozen speech encoder", factory=EncoderConfig)
    projector: ProjectorConfig = setting(help="encoder -> LLM embeddings", factory=ProjectorConfig)
    llm: LLMConfig = setting(help="the text LLM", factory=LLMConfig)
    prompt: PromptConfig = setting(help="where the speech goes in the LLM input", factory=PromptConfig)
    generation: GenerationConfig = setting(help="decoding", factory=GenerationConfig)
    loss_chunk_size: int = setting(
        256, "the LM head runs on this many positions at a time (checkpointed), so a 152k vocabulary "
        "never holds a (positions x vocabulary) tensor; 0 = all at once. The loss's own peak memory "
        "scales with it: at 152k and 2048 positions, 12-14 % of the unchunked loss's at 256, ~50 % "
        "at 1024, with a frozen head (`bench memory`)")
    loss_kernel: LossKernel = setting(
        LossKernel.torch, "torch: our chunked LM/distillation loss | liger: Liger-Kernel's fused linear kernels "
        "on CUDA (pip install liger-kernel), falling back to torch on other devices")
    pack_sequences: bool = setting(
        False, "train on padding-free batches: a batch's rows are concatenated into one row, position ids "
        "restart per row and attention stays within it (variable-length flash attention on GPU, a "
        "block-diagonal mask elsewhere); turns off prompt.cache_prefix")


# --------------------------------------------------------------------------------------- stage


@dataclass
class SourceConfig:
    """One training source, mixed with the others batch by batch by its share (a ramp over steps)."""

    manifest: str = setting("", "JSONL manifest or source string (hf:, lhotse:, lhotse-shar:, tasu:; docs/extending.md#data-source); text-only items for simulated and text sources")
    kind: SourceKind = setting(SourceKind.speech, "speech (audio through the encoder), simulated (text through the encoder's text side) or text (plain text read by the LLM)")
    share: Ramp = setting(help="share of batches from this source, by step", factory=Ramp)
    augment: Optional[AugmentConfig] = setting(
        None, "speech sources: this source's waveform augmentation, in place of data.augment as a whole "
        "(its unset fields take AugmentConfig's defaults, not data.augment's); null = data.augment; {prob: 0} = none")


@dataclass
class BatchingConfig:
    """Batches by padded size (duration bucketing) instead of a fixed count, when a budget is set."""

    max_seconds: float = setting(0.0, "batch size x longest clip, in seconds (speech sources); 0 = off")
    max_tokens: int = setting(0, "batch size x longest target, in LLM tokens; 0 = off")
    pool_batches: int = setting(50, "clips are sorted by duration within pools of this many batches")


@dataclass
class DifficultyConfig:
    """Simulated input made harder over training (controlled difficulty): each ramp, when set, replaces
    that ``encoder.cps`` rate at every step; for the learned simulator, the requested WER range."""

    smoothing_max: Optional[Ramp] = setting(None, "ramp of encoder.cps.smoothing_max")
    keep_prob: Optional[Ramp] = setting(None, "ramp of encoder.cps.keep_prob")
    insert_prob: Optional[Ramp] = setting(None, "ramp of encoder.cps.insert_prob")
    wer_min: Optional[Ramp] = setting(None, "ramp of encoder.cps.wer_min (text_side: learned; TASU2's controlled curriculum)")
    wer_max: Optional[Ramp] = setting(None, "ramp of encoder.cps.wer_max (text_side: learned)")


@dataclass
class DataConfig:
    train: Optional[str] = setting(None, "manifest or source string (as data.sources.<name>.manifest) trained on alone, as the stage kind's first source kind")
    sources: dict[str, SourceConfig] = setting(
        help="named sources mixed by share (stages 2-4); empty = `train` alone", factory=dict)
    batching: BatchingConfig = setting(help="duration bucketing", factory=BatchingConfig)
    difficulty: DifficultyConfig = setting(help="CPS rates ramped over training", factory=DifficultyConfig)
    augment: AugmentConfig = setting(
        help="waveform augmentation (speed, reverb, noise, telephone band, gain) of every speech training source, "
        "seeded per sample; prob 0 = off; never the val/test sets", factory=AugmentConfig)
    val: dict[str, str] = setting(help="name -> speech manifest or source string: WER during training", factory=dict)
    test: dict[str, str] = setting(help="name -> speech manifest or source string: WER before and after training", factory=dict)
    batch_size: int = setting(8, "training batch size (without a batching budget)")
    val_batch_size: int = setting(8, "evaluation batch size")
    val_max_samples: int = setting(0, "first N clips of each val set (0 = all)")
    test_max_samples: int = setting(0, "first N clips of each test set (0 = all)")
    num_workers: int = setting(0, "DataLoader workers")
    target_normalization: TargetNormalization = setting(
        TargetNormalization.tasu, "training targets: tasu keeps [A-Za-z\\s.,!?'] and lowercases; none keeps the text")
    wer_normalizer: WERNormalizer = setting(
        WERNormalizer.whisper, "text normaliser before WER in validation and test (as `decode --normalizer`)")
    max_audio_seconds: float = setting(30.0, "longer clips are skipped (and counted)")
    max_train_words: int = setting(
        0, "training items with more words are skipped and counted (0 = no limit): sequence length is a "
        "step's cost, and a text pool may hold texts far longer than any utterance")


@dataclass
class DistillConfig:
    """Cross-modal distillation (SALAD stage I, docs/methods.md#distillation): ``alpha * KL + (1 - alpha)
    * NLL`` over the positions that predict text tokens. Direction and temperature are our choice (the
    paper is silent)."""

    alpha: float = setting(1.0, "weight of the KL term (1 - alpha on the NLL)")
    direction: KLDirection = setting(KLDirection.forward, "forward KL(teacher || student) | reverse | jsd")
    temperature: float = setting(1.0, "softmax temperature of both distributions")
    scale_by_t2: bool = setting(False, "multiply the KL by T^2")
    format: DistillFormat = setting(
        DistillFormat.interleaved, "interleaved (SALAD: text and speech spans alternate) | instruction (speech in the user turn)")
    text_span_words: list[int] = setting(help="interleaved: [min, max] words of a text span", factory=lambda: [10, 30])
    speech_span_words: list[int] = setting(help="interleaved: [min, max] words of a speech span", factory=lambda: [5, 15])


@dataclass
class MeasureConfig:
    """Held-out measures logged at each validation and written to metrics.json (docs/methods.md#measures):
    misalignment M and forgetting F on ``sets``, multiple-choice accuracy on ``multiple_choice``."""

    sets: dict[str, str] = setting(help="name -> documents manifest (or source string) for M and F", factory=dict)
    max_samples: int = setting(0, "first N documents of each set (0 = all)")
    multiple_choice: dict[str, str] = setting(help="name -> multiple-choice manifest (or source string with options and answer)", factory=dict)
    mc_max_samples: int = setting(0, "first N questions of each set (0 = all)")
    batch_size: int = setting(8, "documents per measuring batch")


@dataclass
class SelectionConfig:
    """SALAD stage II (docs/methods.md#selection): cluster a text pool, probe each cluster's
    misalignment with the current model, draw texts from P_target(c) ∝ P_web(c) M(c)^gamma, synthesise."""

    pool: str = setting("", "text manifest (documents); `topic` fields, when present, label the report")
    source: str = setting("synthetic", "the data.sources entry that trains on the synthesised selection")
    embedder: str = setting("minilm", "sentence-transformers id/path, minilm (offline all-MiniLM-L6-v2) or hashing:<dim>")
    clusters: int = setting(128, "k of k-means")
    balanced: bool = setting(True, "balanced k-means (clusters of about equal size)")
    kmeans_iters: int = setting(50, "k-means iterations")
    probe_per_cluster: int = setting(4, "texts synthesised per cluster to measure M(c)")
    gamma: float = setting(5.0, "P_target(c) ∝ P_web(c) M(c)^gamma; 0 = uniform selection")
    budget_unit: BudgetUnit = setting(
        BudgetUnit.seconds, "texts | words | seconds (of speech, estimated from words) | fraction (of the natural source's seconds)")
    budget: float = setting(600.0, "how much to select, in budget_unit")
    natural: str = setting("natural", "the data.sources entry whose seconds a fraction budget refers to")
    words_per_second: float = setting(2.5, "speaking rate that turns words into estimated seconds")
    voices: list[str] = setting(help="TTS voices (speechllm.tts ids)", factory=lambda: ["espeak-ng:en-us"])
    chunk_words: list[int] = setting(help="[min, max] words per synthesised chunk (exact span cuts)", factory=lambda: [3, 6])
    workers: int = setting(2, "synthesis processes")
    seed: int = setting(0, "seed of the draw and the probes")


@dataclass
class OptimConfig:
    optimizer: Optimizer = setting(Optimizer.adamw, "adamw | adamw8bit (bitsandbytes)")
    lr: float = setting(5e-5, "projector / adapter learning rate")
    lr_llm: Optional[float] = setting(None, "LoRA or LLM learning rate (default: lr)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    betas: list[float] = setting(help="AdamW betas", factory=lambda: [0.9, 0.999])
    eps: float = setting(1e-6, "AdamW epsilon")
    schedule: Schedule = setting(Schedule.cosine, "after warm-up: cosine | constant | wsd (warmup-stable-decay)")
    warmup_steps: int = setting(200, "linear warm-up steps")
    min_lr_ratio: float = setting(0.0, "floor of the decay, as a share of lr")
    decay_fraction: float = setting(0.2, "wsd: share of steps spent decaying")


@dataclass
class TrainerConfig:
    max_steps: int = setting(1000, "optimizer steps")
    accelerator: str = setting("auto", "Lightning accelerator: auto | cpu | gpu | cuda | mps")
    devices: Any = setting(1, "devices per node (int, list or auto)")
    num_nodes: int = setting(1, "nodes")
    strategy: str = setting("auto", "auto (DDP when several devices) | ddp | fsdp | a Lightning strategy name")
    precision: str = setting(
        "auto", "auto = bf16-mixed on a bf16 GPU or a CPU with bf16 instructions, else 32-true; or a "
        "Lightning precision (32-true, bf16-mixed, 16-mixed, bf16-true, ...)")
    accumulate_grad_batches: int = setting(1, "micro-batches per optimizer step")
    gradient_clip_val: float = setting(1.0, "gradient norm clip (0 = off)")
    val_check_interval: int = setting(200, "steps between validations")
    evaluate_before_training: bool = setting(True, "test (else val) metrics of the starting point, at step 0")
    log_every_n_steps: int = setting(10, "steps between logged training scalars")
    checkpoint_every_n_steps: int = setting(100, "steps between checkpoints")
    keep_last_checkpoints: int = setting(1, "step checkpoints kept besides last.ckpt")
    num_threads: int = setting(0, "torch threads on CPU; 0 = all cores")
    max_nonfinite_steps: int = setting(20, "consecutive NaN/inf-gradient steps skipped before the run stops")
    collective_timeout_s: int = setting(600, "a rank that stops answering ends a multi-device job after this")
    log_text_samples: int = setting(4, "hypothesis/reference pairs logged to TensorBoard per validation")


@dataclass
class StageConfig:
    """One stage of a pipeline, fully resolved (this is what lands in ``config.yaml``)."""

    kind: str = setting("align", "a stage kind registered in lightning_modules (align, asr, distill, select, ...)")
    enabled: bool = setting(True, "a scale can leave a stage out (e.g. comparison runs only at the full scale)")
    init_from: Optional[str] = setting(None, "a previous stage's model/ directory, or a stage name")
    seed: int = setting(0, "seed of the run (data order, simulated noise, span plans)")
    model: ModelConfig = setting(help="encoder, projector, LLM, prompt, decoding", factory=ModelConfig)
    data: DataConfig = setting(help="training sources and evaluation sets", factory=DataConfig)
    distill: DistillConfig = setting(help="stage 3/4 loss and the interleaved format", factory=DistillConfig)
    measures: MeasureConfig = setting(help="M, F and multiple choice", factory=MeasureConfig)
    selection: SelectionConfig = setting(help="stage 4's data selection", factory=SelectionConfig)
    optim: OptimConfig = setting(help="optimiser and schedule", factory=OptimConfig)
    trainer: TrainerConfig = setting(help="Lightning trainer", factory=TrainerConfig)


@dataclass
class PipelineStage:
    name: str = setting("", "the stage's name (its run directory)")
    include: list[str] = setting(help="stage presets (configs/stage/*.yaml), merged before `config`", factory=list)
    config: dict[str, Any] = setting(help="overrides of StageConfig for this stage", factory=dict)


@dataclass
class PipelineConfig:
    """A pipeline YAML: shared settings for every stage, then the stages in order."""

    name: str = setting("", "run directory name (default: the file's stem)")
    run_dir: str = setting("runs", "root of the run directories")
    defaults: dict[str, Any] = setting(help="StageConfig keys shared by all stages", factory=dict)
    include: list[str] = setting(help="YAML files merged into defaults, in order", factory=list)
    stages: list[PipelineStage] = setting(help="the stages, in order", factory=list)
    scales: dict[str, Any] = setting(
        help="named scales: {scale: {defaults: {...}, stages: {stage name: {...}}}}, applied after the stage "
        "blocks; the first is the default, others run under <name>-<scale>", factory=dict)


# --------------------------------------------------------------------------------------- loading


def _unwrap(tp: Any) -> Any:
    """The dataclass (or plain type) inside Optional[...], dict[str, ...] and list[...] annotations."""
    args = [a for a in getattr(tp, "__args__", ()) if a is not type(None)]
    origin = getattr(tp, "__origin__", None)
    if origin is dict:
        return _unwrap(args[-1])
    if args and origin is not list:  # Optional[X]
        return _unwrap(args[0])
    return tp


def schema_field(key: str, schema: type | None = None):
    """The dataclass field behind a dotted key (``data.sources.speech.kind``: the source's name is an entry
    of a dict field, skipped), or None when the key is not in the schema."""
    cls, found, entry_name_next = schema or StageConfig, None, False
    for part in key.split("."):
        if entry_name_next:
            entry_name_next = False
            continue
        if not is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        found = next((f for f in fields(cls) if f.name == part), None)
        if found is None:
            return None
        entry_name_next = getattr(hints[part], "__origin__", None) is dict
        cls = _unwrap(hints[part])
    return found


NO_DEFAULT = object()


def schema_default(key: str) -> Any:
    """The schema's default of a leaf key (entries of dict fields included), or a marker if it has none."""
    f = schema_field(key)
    if f is None:
        return NO_DEFAULT
    value = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else NO_DEFAULT)
    return value.value if isinstance(value, Choice) else value


def field_help(key: str, schema: type | None = None) -> str:
    f = schema_field(key, schema)
    return f.metadata.get("help", "") if f is not None else ""


def describe_schema(prefix: str = "", schema: type | None = None) -> list[str]:
    """One line per leaf field under ``prefix``: ``key: type = default  # help`` (for ``--help``)."""

    def walk(cls: type, path: str) -> list[str]:
        lines = []
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            key = f"{path}{f.name}"
            inner = _unwrap(hints[f.name])
            if is_dataclass(inner):
                below = key + (".<name>." if getattr(hints[f.name], "__origin__", None) is dict else ".")
                if below.startswith(prefix) or prefix.startswith(below) or key.startswith(prefix):
                    lines += walk(inner, below)
                continue
            if not key.startswith(prefix):
                continue
            if isinstance(inner, type) and issubclass(inner, Choice):
                kind = " | ".join(inner.values())
            else:
                kind = getattr(inner, "__name__", str(hints[f.name]).replace("typing.", ""))
            if getattr(hints[f.name], "__origin__", None) is dict:
                kind = f"dict[str, {kind}]"
            default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else "???")
            if isinstance(default, Choice):
                default = default.value
            help_text = f.metadata.get("help", "")
            lines.append(f"{key}: {kind} = {default!r}" + (f"  # {help_text}" if help_text else ""))
        return lines

    return walk(schema or StageConfig, "")


def _merge(base: DictConfig, update: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None)
        reason = str(err.msg if hasattr(err, "msg") else err).splitlines()[0]  # OmegaConf appends its context
        help_text = field_help(str(key), OmegaConf.get_type(base)) if key else ""
        raise ConfigError(f"{source}: invalid key {key!r}: {reason}" + (f" ({help_text})" if help_text else "")) from None


def load_yaml(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return OmegaConf.load(path)
    except Exception as err:  # yaml syntax errors carry line numbers; keep them
        raise ConfigError(f"{path}: cannot parse YAML: {err}") from None


def parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    return OmegaConf.from_dotlist(list(overrides))


def load_stage_config(
    layers: list[tuple[str, Any]], overrides: list[str] | None = None
) -> StageConfig:
    """Merge (source name, dict or path) layers in order into the StageConfig schema."""
    cfg = OmegaConf.structured(StageConfig)
    for source, layer in layers:
        data = load_yaml(layer) if isinstance(layer, (str, Path)) else layer
        cfg = _merge(cfg, data, str(source))
    if overrides:
        cfg = _merge(cfg, parse_overrides(overrides), "command-line override")
    return cfg  # a structured DictConfig: attribute access, typed


def load_pipeline(path: str | Path, scale: str | None = None) -> PipelineConfig:
    path = Path(path)
    cfg = _merge(OmegaConf.structured(PipelineConfig), load_yaml(path), str(path))
    if not cfg.name:
        cfg.name = path.stem
    names = [s.name for s in cfg.stages]
    if not names or any(not n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"{path}: stages need unique, non-empty names (got {names})")
    scales = list(cfg.scales)
    if scale is not None and scale not in scales:
        raise ConfigError(f"{path}: no scale {scale!r} (have {scales or 'none'})")
    for name, block in cfg.scales.items():
        unknown = set(block or {}) - {"defaults", "stages"}
        if unknown:
            raise ConfigError(f"{path}: scales.{name} may only hold 'defaults' and 'stages' (got {sorted(unknown)})")
    if scale is not None and scales and scale != scales[0]:
        cfg.name = f"{cfg.name}-{scale}"
    return cfg


def stage_layers(pipeline_path: str | Path, pipeline: PipelineConfig, stage_name: str,
                 scale: str | None = None) -> list[tuple[str, Any]]:
    """The layers of one stage: included files, pipeline defaults, the stage's included presets, the
    stage's block, the scale's."""
    root = Path(pipeline_path).parent

    def included(paths) -> list[tuple[str, Any]]:
        out = []
        for inc in paths:
            inc_path = Path(inc) if Path(inc).is_absolute() or Path(inc).exists() else root / inc
            out.append((str(inc_path), inc_path))
        return out

    stage = next(s for s in pipeline.stages if s.name == stage_name)
    layers = included(pipeline.include)
    layers.append((f"{pipeline_path} (defaults)", OmegaConf.to_container(pipeline.defaults)))
    layers += included(stage.include)
    layers.append((f"{pipeline_path} (stage {stage_name})", OmegaConf.to_container(stage.config)))
    if pipeline.scales:
        scale = scale or next(iter(pipeline.scales))
        block = OmegaConf.to_container(pipeline.scales[scale]) or {}
        layers.append((f"{pipeline_path} (scales.{scale}.defaults)", block.get("defaults") or {}))
        layers.append((f"{pipeline_path} (scales.{scale}.stages.{stage_name})", (block.get("stages") or {}).get(stage_name) or {}))
    return layers


def key_origin(key: str, layers: list[tuple[str, Any]], overrides: list[str] | None = None) -> str:
    """Where a stage's value of ``key`` came from: the last layer (or the command line) that sets it."""
    candidates = [("command-line override", parse_overrides(overrides))] if overrides else []
    for source, layer in reversed(layers):
        candidates.append((source, load_yaml(layer) if isinstance(layer, (str, Path)) else OmegaConf.create(layer or {})))
    for source, data in candidates:
        if OmegaConf.select(data, key, default=None) is not None:
            return source
    return "the schema default"


def missing_model_paths(cfg: ModelConfig) -> list[tuple[str, str]]:
    """``(key, problem)`` for each model path that names a local file or folder that does not exist.

    Hub ids (``org/name``) are left to transformers, which says whether the Hub was reachable.
    """
    keys = {"model.llm.pretrained": cfg.llm.pretrained, "model.llm.tokenizer": cfg.llm.tokenizer,
            "model.encoder.pretrained": cfg.encoder.pretrained, "model.encoder.ctc_head": cfg.encoder.ctc_head,
            "model.encoder.cps.stats": cfg.encoder.cps.stats if cfg.encoder.text_side == "matched" else None,
            "model.encoder.cps.simulator": cfg.encoder.cps.simulator if cfg.encoder.text_side == "learned" else None}
    problems = []
    for key, value in keys.items():
        if value and str(value).startswith((".", "/", "~")) and not Path(value).expanduser().exists():
            hint = " (`make demo` prepares the embedded default's assets)" if ".cache/assets" in str(value) else ""
            problems.append((key, f"{value} does not exist{hint}"))
    return problems


def check_model_paths(cfg: ModelConfig) -> None:
    """Fail before any loading, naming the key, if a local model path does not exist."""
    for key, problem in missing_model_paths(cfg)[:1]:
        raise ConfigError(f"{key}: {problem}")


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def plain(value: Any) -> Any:
    """A config node as plain Python containers (transformers' strict configs reject ListConfig)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True, enum_to_str=True)
    return value
