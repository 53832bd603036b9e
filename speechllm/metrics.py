"""Word error rate with substitution/deletion/insertion counts, after a named normaliser.

Corpus WER = (S + D + I) / N_ref summed over utterances (not a mean of per-utterance WERs).
Normalisers: ``whisper`` (Whisper's EnglishTextNormalizer, as Ultravox/NeMo/open_asr_leaderboard
report) and ``tasu`` (TASU's scorer: lowercase, all punctuation removed, apostrophes included).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from functools import lru_cache

import jiwer

_PUNCT = re.compile("[" + re.escape(string.punctuation) + "\u3002\uff0c\uff1f\uff01\u3001]")


def normalize_tasu(text: str) -> str:
    return " ".join(_PUNCT.sub("", text.lower()).split())


@lru_cache(maxsize=1)
def _whisper_normalizer():
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    # The British->American spelling table ships with Hub tokenizers only; without Hub access it
    # is empty, which changes nothing for text that is already American English.
    return EnglishTextNormalizer({})


def normalize_whisper(text: str) -> str:
    return " ".join(_whisper_normalizer()(text).split())


NORMALIZERS = {"whisper": normalize_whisper, "tasu": normalize_tasu, "none": lambda t: " ".join(t.split())}


def normalize(text: str, name: str) -> str:
    if name not in NORMALIZERS:
        raise ValueError(f"unknown normaliser {name!r}; choose from {sorted(NORMALIZERS)}")
    return NORMALIZERS[name](text)


@dataclass
class ErrorCounts:
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    ref_words: int = 0

    @property
    def wer(self) -> float:
        errors = self.substitutions + self.deletions + self.insertions
        return errors / self.ref_words if self.ref_words else float(errors > 0)

    def __add__(self, other: ErrorCounts) -> ErrorCounts:
        return ErrorCounts(self.substitutions + other.substitutions, self.deletions + other.deletions,
                           self.insertions + other.insertions, self.ref_words + other.ref_words)

    def as_dict(self) -> dict[str, float]:
        return {"wer": self.wer, "substitutions": self.substitutions, "deletions": self.deletions,
                "insertions": self.insertions, "ref_words": self.ref_words}


def word_errors(reference: str, hypothesis: str) -> ErrorCounts:
    """Levenshtein alignment counts for one already-normalised pair."""
    ref, hyp = reference.split(), hypothesis.split()
    if not ref:
        return ErrorCounts(insertions=len(hyp))
    if not hyp:
        return ErrorCounts(deletions=len(ref), ref_words=len(ref))
    out = jiwer.process_words(reference, hypothesis)
    return ErrorCounts(out.substitutions, out.deletions, out.insertions, len(ref))


def corpus_errors(references: list[str], hypotheses: list[str], normalizer: str = "whisper") -> tuple[ErrorCounts, list[ErrorCounts]]:
    per_utt = [word_errors(normalize(r, normalizer), normalize(h, normalizer)) for r, h in zip(references, hypotheses)]
    total = ErrorCounts()
    for c in per_utt:
        total = total + c
    return total, per_utt
