"""One validation pass over a resolved stage config, before any model is built or data read.

The schema already rejects unknown keys, wrong types and misspelled choices at merge time. This pass
checks what one field cannot: names looked up in the registries (stage kinds, encoder kinds) and the
rules between fields. Each problem names the key, the file or override it came from, and what is
allowed; all of a stage's problems are reported at once.
"""

from __future__ import annotations

from typing import Any

from speechllm.config import ConfigError, StageConfig, field_help, key_origin, schema_default

# Values Lightning accepts (trainer.precision and trainer.accelerator are plain strings: Lightning's own
# names, some of which are not valid enum member names).
PRECISIONS = ("auto", "64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "transformer-engine",
              "transformer-engine-float16", "64", "32", "16", "bf16")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


def stage_problems(cfg: StageConfig) -> list[tuple[str, str]]:
    """``(key, problem)`` for every rule ``cfg`` breaks."""
    from lightning_modules import STAGE_KINDS
    from speechllm.encoders import ENCODER_KINDS, kinds_with
    from speechllm.sources import source_problems

    problems: list[tuple[str, str]] = []
    if cfg.kind not in STAGE_KINDS:
        return [("kind", f"{cfg.kind!r} is not a stage kind (have: {', '.join(sorted(STAGE_KINDS))})")]
    stage = STAGE_KINDS[cfg.kind]
    model, data, llm = cfg.model, cfg.data, cfg.model.llm
    enc = model.encoder
    encoder = ENCODER_KINDS.get(enc.kind)
    if encoder is None:
        problems.append(("model.encoder.kind", f"{enc.kind!r} is not an encoder kind (have: {', '.join(sorted(ENCODER_KINDS))})"))
    else:
        # Fields only some kinds read (cps is a section of its own, checked through text_side).
        specific = sorted({f for kind in ENCODER_KINDS.values() for f in kind.fields} - {"cps"})
        for name in specific:
            key = f"model.encoder.{name}"
            if name not in encoder.fields and _set(enc[name]) != schema_default(key):
                readers = [k for k, v in ENCODER_KINDS.items() if name in v.fields]
                problems.append((key, f"is read only by encoder kinds {readers}, not by {enc.kind!r}"))
        for name in ("unit_lookup", "init_from_llm_embeddings"):
            if model.projector[name] and not encoder.is_ctc:
                problems.append((f"model.projector.{name}", f"needs a CTC encoder ({kinds_with('is_ctc')}: its units), "
                                 f"not encoder.kind {enc.kind!r}"))

    if not data.sources and not data.train:
        problems.append(("data", "set `train` (a manifest) or `sources` (named manifests with shares)"))
    problems += source_problems(cfg)  # every manifest / source string parses, its format's extra is installed
    kinds = {f"data.sources.{n}.kind": src.kind for n, src in data.sources.items()} or (
        {"data.train": stage.source_kinds[0]} if data.train else {})
    for key, kind in kinds.items():
        if kind not in stage.source_kinds:
            problems.append((key, f"stage kind {cfg.kind!r} trains on {[str(k) for k in stage.source_kinds]}, not {str(kind)!r}"))
        elif kind == "simulated" and encoder is not None and not encoder.has_text_side:
            problems.append((key, f"simulated input needs an encoder with a text side ({kinds_with('has_text_side')}), "
                             f"not {enc.kind!r}"))
        elif kind == "text" and llm.freeze and not llm.lora.enabled:
            problems.append((key, "a text source trains the LLM to stay close to the original; with a frozen LLM "
                             "(model.llm.freeze, no LoRA) it has nothing to train: drop it or enable LoRA"))

    problems += augment_problems("data.augment", data.augment)
    for n, src in data.sources.items():
        if src.augment is not None:
            key = f"data.sources.{n}.augment"
            problems += augment_problems(key, src.augment)
            if src.kind != "speech":
                problems.append((key, f"only speech sources are augmented, not a {str(src.kind)!r} one"))

    for side, key, step in (("matched", "stats", "posterior-stats"), ("learned", "simulator", "simulator")):
        if enc.text_side == side and not enc.cps[key]:
            problems.append((f"model.encoder.cps.{key}", f"text_side: {side} needs it (`python -m stages prepare {step}`)"))
    if not 0.0 <= enc.cps.wer_min <= enc.cps.wer_max <= 1.0:
        problems.append(("model.encoder.cps.wer_max", f"needs 0 <= wer_min <= wer_max <= 1, got "
                         f"[{enc.cps.wer_min}, {enc.cps.wer_max}]"))
    if llm.load_in_4bit and llm.load_in_8bit:
        problems.append(("model.llm.load_in_8bit", "choose one of load_in_4bit and load_in_8bit"))
    if cfg.trainer.strategy == "fsdp" and (llm.load_in_4bit or llm.load_in_8bit):
        problems.append(("trainer.strategy", "fsdp shards full-precision weights; a 4/8-bit LLM (QLoRA) fits one "
                         "device per rank: use ddp, or set model.llm.load_in_4bit/load_in_8bit false"))
    if not 0.0 <= cfg.distill.alpha <= 1.0:
        problems.append(("distill.alpha", f"must lie in [0, 1], got {cfg.distill.alpha}"))
    if str(cfg.trainer.precision) not in PRECISIONS:
        problems.append(("trainer.precision", f"{cfg.trainer.precision!r} is not one of {', '.join(PRECISIONS)}"))
    if cfg.trainer.accelerator not in ACCELERATORS:
        problems.append(("trainer.accelerator", f"{cfg.trainer.accelerator!r} is not one of {', '.join(ACCELERATORS)}"))
    strategies = _strategies()
    if cfg.trainer.strategy not in strategies:
        problems.append(("trainer.strategy", f"{cfg.trainer.strategy!r} is not one of auto, ddp, fsdp or Lightning's "
                         f"({', '.join(sorted(strategies - {'auto', 'ddp', 'fsdp'}))})"))
    return problems + stage.config_errors(cfg)


def augment_problems(key: str, node: Any) -> list[tuple[str, str]]:
    """``(key.field, problem)`` for each value of an ``AugmentConfig`` node its own checks reject (the
    schema checks only the types; each field is checked alone, so every bad one is named)."""
    from omegaconf import OmegaConf

    from speechllm.augment import AugmentConfig

    problems = []
    for name, value in OmegaConf.to_container(node, resolve=True).items():
        try:
            AugmentConfig(**{name: value})
        except ValueError as err:
            problems.append((f"{key}.{name}", str(err)))
    return problems


def _set(value: Any) -> Any:
    from omegaconf import ListConfig

    return list(value) if isinstance(value, ListConfig) else value


def _strategies() -> set[str]:
    from lightning.pytorch.strategies import StrategyRegistry

    return {"auto", "ddp", "fsdp", *StrategyRegistry.available_strategies()}


def validate_stage(name: str, cfg: StageConfig, layers: list[tuple[str, Any]], overrides: list[str] | None = None) -> None:
    """Raise one ConfigError listing every problem of stage ``name``, each with where its key was set."""
    problems = stage_problems(cfg)
    if problems:
        lines = []
        for key, problem in problems:
            help_text = field_help(key)
            lines.append(f"  {key} ({key_origin(key, layers, overrides)}): {problem}" + (f" [{key}: {help_text}]" if help_text else ""))
        raise ConfigError(f"stage {name!r}: invalid config\n" + "\n".join(lines))
