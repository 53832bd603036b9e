"""Typed configuration: dataclass schemas merged with YAML files and ``key=value`` overrides.

Every YAML is merged into a structured OmegaConf object, so an unknown or mistyped key fails at
load time with the key *and the file* named (the failure mode of untyped Hydra configs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from speechllm.schedules import Ramp


class ConfigError(ValueError):
    """A config file or override that does not match the schema."""


# --------------------------------------------------------------------------------------- model


@dataclass
class CPSConfig:
    """CTC posterior simulation (PAPERS.md §2.2); defaults are TASU's released code values."""

    smoothing_max: float = 0.1  # label smoothing a ~ U(0, smoothing_max), one draw per utterance
    keep_prob: float = 0.95  # each row kept independently with this probability
    insert_prob: float = 0.0  # floor(L' * insert_prob) insertions (off by default, as in TASU)
    insert_repeat_share: float = 0.5  # share of insertions that repeat the previous row (else blank)
    # Share of utterances simulated instead from the encoder's measured errors and real posterior
    # vectors (speechllm.posterior_stats; 0 = TASU's CPS only), and where those statistics live.
    matched_share: float = 0.0
    stats: Optional[str] = None


@dataclass
class EncoderConfig:
    """The frozen speech encoder.

    kind: ``ctc`` (CTC posteriors + LSD; text side = CPS), ``whisper`` (continuous real-length
    Whisper states) or ``dual_tower`` (TESU-LLM style text + speech towers, SeamlessM4Tv2).
    Either ``pretrained`` (Hub id or local path) or ``from_config`` (random weights, for tests).
    """

    kind: str = "ctc"
    pretrained: Optional[str] = None
    from_config: Optional[dict[str, Any]] = None
    init_seed: int = 0  # makes from_config weights identical in every process and reload
    # CTC path: an encoder + separately trained CTC head (e.g. a head on frozen Whisper states)
    backbone: Optional[str] = None  # "whisper" when pretrained points at a Whisper model
    ctc_head: Optional[str] = None  # path to a saved CTC head (see speechllm.encoders.ctc)
    vocab: Optional[list[str]] = None  # CTC vocabulary for from_config models (index 0 = blank)
    blank_id: Optional[int] = None  # default: the model's pad_token_id (wav2vec2, parakeet)
    lsd: bool = True  # label-synchronous compression of the posteriors
    lsd_blank_threshold: float = 0.9
    cps: CPSConfig = field(default_factory=CPSConfig)
    sample_rate: int = 16000


@dataclass
class ProjectorConfig:
    """Encoder space -> LLM embedding space. Default: TASU's LayerNorm-Linear-SiLU-Linear."""

    hidden_dim: int = 2048
    stack_frames: int = 1  # frame stacking (downsampling k) before the MLP; 1 = none
    layer_norm: bool = True
    # Start each CTC unit's row from the LLM's embedding of the unit's string (CTC encoders only)
    init_from_llm_embeddings: bool = False
    # A trainable table of the LLM's embeddings of the CTC units, applied to the posteriors and added
    # to the MLP (which then starts at zero): the projector starts as the posterior-weighted LLM
    # embedding of the units and stays there under Adam (CTC encoders only; see speechllm.projector).
    unit_lookup: bool = False
    # The table reads only units with at least this probability: label smoothing's ~1e-5 on every
    # unit would otherwise give every row a gradient, and Adam moves any row with one by ~lr a step.
    lookup_min_prob: float = 1e-3


@dataclass
class LoRAConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class LLMConfig:
    pretrained: Optional[str] = None
    gguf_file: Optional[str] = None
    from_config: Optional[dict[str, Any]] = None
    init_seed: int = 0
    tokenizer: Optional[str] = None  # default: same as pretrained
    # from_config models get a character tokenizer over this alphabet (tests only)
    char_alphabet: str = " abcdefghijklmnopqrstuvwxyz'.,?!"
    dtype: str = "float32"  # float32 | bfloat16 | float16 (weights of the frozen LLM)
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    freeze: bool = True
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    gradient_checkpointing: bool = False
    attn_implementation: Optional[str] = None


@dataclass
class PromptConfig:
    """How the speech is placed in the LLM input: ``{task_prompt}<speech>`` as the user turn."""

    task_prompt: str = "Transcribe the audio:"
    use_chat_template: bool = True
    # None keeps the template's default (SmolLM2 then inserts its own ~20-token system prompt);
    # "" passes an empty system turn where the template allows it.
    system_prompt: Optional[str] = None
    max_target_tokens: int = 128
    # Reuse the fixed prompt prefix's keys/values in training while the LLM is frozen (no LoRA).
    cache_prefix: bool = True


@dataclass
class GenerationConfig:
    num_beams: int = 1
    max_new_tokens: int = 128
    # Length guard: at most ceil(ratio * speech vectors) + 4 new tokens (0 = off). A transcript is
    # never much longer than its label-rate input, and a looping model stops early.
    max_new_tokens_per_speech_vector: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # repetition guard; 0 = off


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # The LM head runs on this many positions at a time (checkpointed), so a 152k vocabulary never
    # holds a (positions x vocabulary) tensor; 0 = all at once.
    loss_chunk_size: int = 1024


# --------------------------------------------------------------------------------------- stage


@dataclass
class SourceConfig:
    """One training source, mixed with the others batch by batch by its share (a ramp over steps).

    kind: ``speech`` (audio through the encoder), ``simulated`` (text through the encoder's text
    side: CPS or a text tower) or ``text`` (plain text read by the LLM, no speech: SALAD's text share).
    """

    manifest: str = ""
    kind: str = "speech"
    share: Ramp = field(default_factory=Ramp)


@dataclass
class BatchingConfig:
    """Batches by padded size (duration bucketing) instead of a fixed count, when a budget is set."""

    max_seconds: float = 0.0  # batch size x longest clip, in seconds (speech sources); 0 = off
    max_tokens: int = 0  # batch size x longest target, in LLM tokens; 0 = off
    pool_batches: int = 50  # clips are sorted by duration within pools of this many batches


@dataclass
class DifficultyConfig:
    """Simulated input made harder over training by rule (TASU2's controlled difficulty): each ramp,
    when set, replaces that ``encoder.cps`` rate at every step."""

    smoothing_max: Optional[Ramp] = None
    keep_prob: Optional[Ramp] = None
    insert_prob: Optional[Ramp] = None


@dataclass
class DataConfig:
    train: Optional[str] = None  # manifest (text-only lines are fine for `align`)
    # Named sources mixed by share (stages 2-4); empty = `train` alone, of the stage's natural kind.
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    difficulty: DifficultyConfig = field(default_factory=DifficultyConfig)
    val: dict[str, str] = field(default_factory=dict)  # name -> speech manifest, WER during training
    test: dict[str, str] = field(default_factory=dict)  # name -> speech manifest, WER before/after training
    batch_size: int = 8
    val_batch_size: int = 8
    val_max_samples: int = 0  # 0 = all
    test_max_samples: int = 0
    num_workers: int = 0
    # TASU's target normalisation: keep [A-Za-z\s.,!?'] and lowercase ("none" keeps the text)
    target_normalization: str = "tasu"
    max_audio_seconds: float = 30.0
    # Training items with more words are skipped (and counted): sequence length is the cost of a
    # step, and the text pool may hold texts far longer than any utterance it stands in for.
    max_train_words: int = 0  # 0 = no limit


@dataclass
class DistillConfig:
    """Cross-modal distillation (SALAD, PAPERS.md §3.2): ``alpha * KL + (1 - alpha) * NLL`` over the
    positions that predict text tokens. Direction and temperature are inferred (the paper is silent)."""

    alpha: float = 1.0
    direction: str = "forward"  # forward KL(teacher || student) | reverse | jsd
    temperature: float = 1.0
    scale_by_t2: bool = False
    format: str = "interleaved"  # interleaved (SALAD) | instruction (speech replaces the user turn)
    text_span_words: list[int] = field(default_factory=lambda: [10, 30])
    speech_span_words: list[int] = field(default_factory=lambda: [5, 15])


@dataclass
class MeasureConfig:
    """Held-out measures logged at each validation and written to metrics.json (PAPERS.md §3.2, §5.5):
    misalignment M and forgetting F (token-mean KL) on ``sets``, multiple-choice accuracy on text and
    on speech on ``multiple_choice`` (options scored by length-normalised log-likelihood)."""

    sets: dict[str, str] = field(default_factory=dict)
    max_samples: int = 0
    multiple_choice: dict[str, str] = field(default_factory=dict)
    mc_max_samples: int = 0
    batch_size: int = 8


@dataclass
class SelectionConfig:
    """SALAD stage II (PAPERS.md §3.3): cluster a text pool, probe each cluster's misalignment with
    the current model, draw texts from P_target(c) ∝ P_web(c) M(c)^gamma, synthesise them."""

    pool: str = ""  # text manifest (documents); `topic` fields, when present, label the report
    source: str = "synthetic"  # the data.sources entry that trains on the synthesised selection
    embedder: str = "minilm"  # sentence-transformers id/path, "minilm" (offline all-MiniLM-L6-v2), "hashing:<dim>"
    clusters: int = 128
    balanced: bool = True
    kmeans_iters: int = 50
    probe_per_cluster: int = 4
    gamma: float = 5.0
    budget_unit: str = "seconds"  # texts | words | seconds (of speech, estimated from words) | fraction
    budget: float = 600.0  # fraction: of the `natural` source's speech seconds
    natural: str = "natural"  # the data.sources entry whose seconds a `fraction` budget refers to
    words_per_second: float = 2.5  # speaking rate that turns words into estimated seconds
    rounds: int = 1
    voices: list[str] = field(default_factory=lambda: ["espeak-ng:en-us"])
    chunk_words: list[int] = field(default_factory=lambda: [3, 6])  # synthesised chunk by chunk (exact span cuts)
    workers: int = 2
    seed: int = 0


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    lr: float = 5e-5  # projector / adapter
    lr_llm: Optional[float] = None  # LoRA or LLM parameters; default = lr
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    schedule: str = "cosine"  # cosine | constant | wsd (warmup-stable-decay)
    warmup_steps: int = 200
    min_lr_ratio: float = 0.0
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"  # auto = bf16-mixed on a bf16 GPU or a CPU with bf16 instructions, else 32-true
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 1.0
    val_check_interval: int = 200  # steps
    evaluate_before_training: bool = True  # test (else val) WER of the starting point, at step 0
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 100
    keep_last_checkpoints: int = 1
    num_threads: int = 0  # torch threads on CPU; 0 = all cores
    max_nonfinite_steps: int = 20  # consecutive NaN/inf-gradient steps skipped before the run stops
    collective_timeout_s: int = 600  # a rank that stops answering ends a multi-device job after this
    log_text_samples: int = 4


@dataclass
class StageConfig:
    """One stage of a pipeline, fully resolved (this is what lands in ``config.yaml``)."""

    kind: str = "align"  # align | asr | distill | select
    enabled: bool = True  # a scale can leave a stage out (e.g. comparison runs only at the `full` scale)
    init_from: Optional[str] = None  # a previous stage's model/ directory, or stage name
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    measures: MeasureConfig = field(default_factory=MeasureConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class PipelineStage:
    name: str = ""
    include: list[str] = field(default_factory=list)  # stage presets (configs/stage/*.yaml), before `config`
    config: dict[str, Any] = field(default_factory=dict)  # overrides of StageConfig for this stage


@dataclass
class PipelineConfig:
    """A pipeline YAML: shared settings for every stage, then the stages in order."""

    name: str = ""
    run_dir: str = "runs"
    defaults: dict[str, Any] = field(default_factory=dict)  # StageConfig keys shared by all stages
    include: list[str] = field(default_factory=list)  # YAML files merged into defaults, in order
    stages: list[PipelineStage] = field(default_factory=list)
    # Named scales of the same pipeline: {scale: {defaults: {...}, stages: {stage name: {...}}}},
    # applied after the stage blocks. The first scale is the default; others run under
    # ``<name>-<scale>`` so their run directories never mix.
    scales: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------- loading


def _merge(base: DictConfig, update: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None)
        reason = str(err.msg if hasattr(err, "msg") else err).splitlines()[0]  # OmegaConf appends its context
        raise ConfigError(f"{source}: invalid key {key!r}: {reason}") from None


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


def check_model_paths(cfg: ModelConfig) -> None:
    """A model path that names a local folder must exist: fail before any loading, naming the key.

    Hub ids (``org/name``) are left to transformers, which says whether the Hub was reachable.
    """
    keys = {"model.llm.pretrained": cfg.llm.pretrained, "model.llm.tokenizer": cfg.llm.tokenizer,
            "model.encoder.pretrained": cfg.encoder.pretrained, "model.encoder.ctc_head": cfg.encoder.ctc_head,
            "model.encoder.cps.stats": cfg.encoder.cps.stats if cfg.encoder.cps.matched_share > 0 else None}
    for key, value in keys.items():
        if value and str(value).startswith((".", "/", "~")) and not Path(value).expanduser().exists():
            hint = " (`make demo` prepares the embedded default's assets)" if ".cache/assets" in str(value) else ""
            raise ConfigError(f"{key}: {value} does not exist{hint}")


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def plain(value: Any) -> Any:
    """A config node as plain Python containers (transformers' strict configs reject ListConfig)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value
