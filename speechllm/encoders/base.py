"""The encoder contracts every stage relies on.

A speech encoder turns a batch of mono waveforms into a padded sequence of feature vectors.
A *unified* encoder can also turn text into vectors of the same space, which is what lets the
projector be trained on text alone (TASU: simulated CTC posteriors; TESU-LLM: a text tower).
"""

from __future__ import annotations

import torch
from torch import nn


def pad_sequences(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (T_i, D) tensors with zeros to (B, T_max, D); return them and their lengths."""
    lengths = torch.tensor([s.shape[0] for s in seqs], dtype=torch.long)
    out = seqs[0].new_zeros(len(seqs), int(lengths.max()) if len(seqs) else 0, seqs[0].shape[-1])
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
    return out, lengths


class SpeechEncoder(nn.Module):
    """Frozen speech encoder.

    ``encode_speech`` takes a list of 1-D float waveforms sampled at ``sample_rate`` and returns
    ``(features, lengths)``: ``features`` is (B, T_max, output_dim), zero beyond each length.
    """

    sample_rate: int = 16000
    output_dim: int

    def encode_speech(self, waveforms: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class UnifiedEncoder(SpeechEncoder):
    """A speech encoder whose text side maps into the same space.

    ``encode_text`` takes raw strings and, for stochastic text sides such as CPS, one
    ``torch.Generator`` per text (so a sample's simulated input depends only on its own seed,
    which keeps resumed runs identical to uninterrupted ones).
    """

    def encode_text(
        self, texts: list[str], generators: list[torch.Generator] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError
