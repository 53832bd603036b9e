"""Speech encoders behind one contract (see base.py), chosen by ``encoder.kind``.

``ENCODER_KINDS`` is the one place that says what each kind is: how it is built, whether it has a
text side (``encode_text``: the ``align`` stage and ``simulated`` sources need one), whether it is a
CTC encoder (posteriors over units with strings: ``projector.unit_lookup`` and
``init_from_llm_embeddings`` need one), and which ``EncoderConfig`` fields it reads besides the common
ones (so the config check can reject, say, a ``ctc_head`` given to ``whisper``). A new kind is one
module plus one ``register_encoder`` line; tests/encoders/test_contract.py then runs it through the
contract every stage relies on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from speechllm.config import EncoderConfig
from speechllm.encoders.base import SpeechEncoder, UnifiedEncoder
from speechllm.registry import Registry, imported

# EncoderConfig fields every kind reads (or may ignore): a kind's ``fields`` lists only the others.
COMMON_FIELDS = ("kind", "pretrained", "from_config", "init_seed", "sample_rate")


@dataclass(frozen=True)
class EncoderKind:
    """One ``encoder.kind``: its builder and what the rest of the pipeline may ask of it."""

    build: Callable[[EncoderConfig], SpeechEncoder]
    has_text_side: bool  # the encoder is a UnifiedEncoder (encode_text)
    is_ctc: bool  # features are CTC posteriors; the encoder has ``vocab`` (units with strings)
    fields: tuple[str, ...] = ()  # EncoderConfig fields it reads beyond COMMON_FIELDS
    about: str = ""  # one line for listings and error messages


ENCODER_KINDS: Registry[EncoderKind] = Registry("encoder kind")
register_encoder = ENCODER_KINDS.register  # makes ``encoder.kind: <name>`` build that kind


def encoder_kind(name: str) -> EncoderKind:
    """The registered kind ``name``, or a ValueError listing the kinds there are."""
    if name not in ENCODER_KINDS:
        raise ValueError(f"unknown encoder.kind {name!r} ({' | '.join(ENCODER_KINDS)})")
    return ENCODER_KINDS[name]


def kinds_with(capability: str) -> list[str]:
    """The kinds whose ``capability`` (``has_text_side``, ``is_ctc``) is true, for messages."""
    return [name for name, kind in ENCODER_KINDS.items() if getattr(kind, capability)]


def build_encoder(cfg: EncoderConfig) -> SpeechEncoder:
    return encoder_kind(cfg.kind).build(cfg)


register_encoder("ctc", EncoderKind(
    imported("speechllm.encoders.ctc:build_ctc_encoder"), has_text_side=True, is_ctc=True,
    fields=("backbone", "ctc_head", "vocab", "blank_id", "lsd", "lsd_blank_threshold", "text_side", "cps"),
    about="CTC posteriors compressed by LSD (an AutoModelForCTC, or Whisper + a CTC head); text side: CPS, matched CPS or a learned simulator"))
register_encoder("whisper", EncoderKind(
    imported("speechllm.encoders.whisper:build_whisper_encoder"), has_text_side=False, is_ctc=False,
    about="continuous real-length Whisper encoder states; no text side"))
register_encoder("dual_tower", EncoderKind(
    imported("speechllm.encoders.dual_tower:build_dual_tower_encoder"), has_text_side=True, is_ctc=False,
    fields=("vocab",), about="TESU-LLM-style SeamlessM4Tv2 speech + text towers in one space"))

__all__ = ["COMMON_FIELDS", "ENCODER_KINDS", "EncoderKind", "SpeechEncoder", "UnifiedEncoder", "build_encoder",
           "encoder_kind", "imported", "kinds_with", "register_encoder"]
