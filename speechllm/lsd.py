"""Label-synchronous decoding (LSD; ``psd`` in TASU's code, docs/methods.md#lsd).

Compresses frame-level CTC posteriors to roughly one vector per emitted unit: each run of equal
non-blank argmax frames becomes its mean, blank frames stay one vector each, and every vector
whose blank probability is >= the threshold is dropped.
"""

from __future__ import annotations

import torch


def label_synchronous_compress(
    posteriors: torch.Tensor, lengths: torch.Tensor, blank_id: int, blank_threshold: float = 0.9
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, V) posteriors with valid ``lengths`` -> compressed (B, T', V) and lengths (B,)."""
    batch, frames, vocab = posteriors.shape
    device = posteriors.device
    valid = torch.arange(frames, device=device)[None, :] < lengths[:, None]
    best = posteriors.argmax(-1)
    is_blank = best == blank_id

    # A new segment starts at t=0, at a blank frame, after a blank frame, or where the argmax changes.
    starts = torch.ones_like(best, dtype=torch.bool)
    starts[:, 1:] = (best[:, 1:] != best[:, :-1]) | is_blank[:, 1:] | is_blank[:, :-1]
    starts &= valid
    segment = torch.cumsum(starts.long(), dim=1) - 1  # segment index of each frame
    n_segments = starts.sum(1)

    # Mean of the frames of each segment, by scatter-add over (batch, segment).
    seg_flat = (segment.clamp(min=0) + torch.arange(batch, device=device)[:, None] * frames)[valid]
    sums = posteriors.new_zeros(batch * frames, vocab).index_add_(0, seg_flat, posteriors[valid])
    counts = posteriors.new_zeros(batch * frames).index_add_(0, seg_flat, posteriors.new_ones(seg_flat.shape))
    means = (sums / counts.clamp(min=1)[:, None]).view(batch, frames, vocab)

    seg_valid = torch.arange(frames, device=device)[None, :] < n_segments[:, None]
    keep = seg_valid & (means[..., blank_id] < blank_threshold)
    out_lengths = keep.sum(1)
    out = posteriors.new_zeros(batch, int(out_lengths.max()) if batch else 0, vocab)
    # Stable order: position of each kept segment among the kept ones of its row.
    target = torch.cumsum(keep.long(), dim=1) - 1
    rows = torch.arange(batch, device=device)[:, None].expand_as(keep)
    out[rows[keep], target[keep]] = means[keep]
    return out, out_lengths
