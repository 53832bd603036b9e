"""The encoder contracts every stage relies on.

A speech encoder turns a batch of mono waveforms into a padded sequence of feature vectors.
A *unified* encoder can also turn text into vectors of the same space, which is what lets the
projector be trained on text alone (TASU: simulated CTC posteriors; TESU-LLM: a text tower).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def pad_sequences(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (T_i, D) tensors with zeros to (B, T_max, D); return them and their lengths."""
    lengths = torch.tensor([s.shape[0] for s in seqs], dtype=torch.long)
    out = seqs[0].new_zeros(len(seqs), int(lengths.max()) if len(seqs) else 0, seqs[0].shape[-1])
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
    return out, lengths


def load_tower(
    model_cls: type, path_or_id: str | Path, key_mapping: dict[str, str], **kwargs
) -> nn.Module:
    """Load one sub-model of a larger checkpoint (e.g. Whisper's encoder) and nothing else.

    ``key_mapping`` (regex -> replacement) renames the sub-model's checkpoint keys to its own; the
    other keys are never materialised (safetensors loads lazily). Their "unexpected keys" report
    would list thousands of lines, so it is silenced, and missing keys raise instead: a tower that
    silently kept random weights would be far worse than a crash.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = model_cls.from_pretrained(
            path_or_id, key_mapping=key_mapping, output_loading_info=True, **kwargs
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(f"{path_or_id}: no weights for {model_cls.__name__} keys {missing[:5]} (of {len(missing)})")
    return model


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool, True on valid frames."""
    return torch.arange(max_len, device=lengths.device) < lengths[:, None]


class SpeechEncoder(nn.Module):
    """Frozen speech encoder (no gradients, always in eval mode).

    ``encode_speech`` takes a list of 1-D float waveforms sampled at ``sample_rate`` and returns
    ``(features, lengths)``: ``features`` is (B, T_max, output_dim), zero beyond each length.
    """

    sample_rate: int = 16000
    output_dim: int

    def train(self, mode: bool = True) -> SpeechEncoder:
        # Frozen: dropout and layerdrop stay off even when the surrounding module trains.
        return super().train(False)

    def encode_speech(self, waveforms: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class UnifiedEncoder(SpeechEncoder):
    """A speech encoder whose text side maps into the same space.

    ``encode_text`` takes raw strings and, for stochastic text sides such as CPS, one
    ``torch.Generator`` per text (so a sample's simulated input depends only on its own seed,
    which keeps resumed runs identical to uninterrupted ones). ``cps`` replaces the simulation's
    rates for this call (a curriculum makes simulated input harder over training); a deterministic
    text side ignores it.
    """

    def encode_text(
        self, texts: list[str], generators: list[torch.Generator] | None = None, cps=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError
