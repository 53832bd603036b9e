"""Projector from the encoder space into the LLM's input-embedding space."""

from __future__ import annotations

import torch
from torch import nn

from speechllm.config import ProjectorConfig


def stack_frames(feats: torch.Tensor, lengths: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every k consecutive frames: (B, T, D) -> (B, ceil(T/k), k*D).

    A trailing partial group is zero-padded; its length counts it, so no speech is dropped.
    """
    if k == 1:
        return feats, lengths
    batch, frames, dim = feats.shape
    pad = (-frames) % k
    feats = nn.functional.pad(feats, (0, 0, 0, pad))
    return feats.reshape(batch, (frames + pad) // k, k * dim), (lengths + k - 1) // k


class Projector(nn.Module):
    """Optional frame stacking, then LayerNorm -> Linear -> SiLU -> Linear (TASU's ``linear-silu``).

    With ``unit_lookup`` a trainable (units x d_llm) table maps the posteriors themselves (no
    LayerNorm; probabilities under ``lookup_min_prob`` left out) and the MLP, whose last layer starts at
    zero, is a residual on top. Why: an MLP set up
    to reproduce the same map (``init_from_embeddings``) is scrambled within tens of Adam steps,
    because LayerNorm turns a one-hot posterior into a dense vector, so every weight of the first
    layer gets a gradient and moves by ~lr each step; the table's rows move only when their unit occurs.
    """

    def __init__(self, input_dim: int, llm_dim: int, cfg: ProjectorConfig):
        super().__init__()
        self.stack = cfg.stack_frames
        in_dim = input_dim * cfg.stack_frames
        self.norm = nn.LayerNorm(in_dim) if cfg.layer_norm else nn.Identity()
        self.fc1 = nn.Linear(in_dim, cfg.hidden_dim)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(cfg.hidden_dim, llm_dim)
        nn.init.zeros_(self.fc2.bias)  # as TASU: the last bias starts at zero
        self.lookup = nn.Linear(in_dim, llm_dim, bias=False) if cfg.unit_lookup else None
        self.lookup_min_prob = cfg.lookup_min_prob
        self.lookup_blank: int | None = None  # set with the table (init_lookup)
        if self.lookup is not None:
            nn.init.zeros_(self.fc2.weight)  # the MLP starts as a zero residual on the table

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, lengths = stack_frames(feats, lengths, self.stack)
        # LayerNorm in fp32 even under autocast (TASU forces fp32 LayerNorms; bf16 loses the
        # small differences between near-one-hot posteriors).
        with torch.autocast(device_type=feats.device.type, enabled=False):
            x = self.norm(feats.float())
        x = self.fc2(self.act(self.fc1(x.to(self.fc1.weight.dtype))))
        if self.lookup is not None:
            x = x + self.lookup(self.unit_distribution(feats).to(self.lookup.weight.dtype))
        return x, lengths

    def unit_distribution(self, probs: torch.Tensor) -> torch.Tensor:
        """What the table reads: the posterior over the non-blank units (a kept LSD vector is often
        half blank, which would otherwise shrink it towards zero), units under ``lookup_min_prob`` out."""
        if self.lookup_blank is not None:
            probs = probs.clone()
            probs[..., self.lookup_blank] = 0.0
            probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-6)
        return probs.masked_fill(probs < self.lookup_min_prob, 0.0)

    @torch.no_grad()
    def init_lookup(self, unit_embeddings: torch.Tensor, blank_id: int | None = None) -> None:
        """Row i of the table = ``unit_embeddings[i]`` (the LLM's embedding of CTC unit i)."""
        if self.lookup is None or self.stack != 1 or unit_embeddings.shape != self.lookup.weight.T.shape:
            raise ValueError(f"unit_lookup needs stack_frames=1 and one embedding per CTC unit "
                             f"({tuple(unit_embeddings.shape)} vs table {tuple(self.lookup.weight.T.shape) if self.lookup else None})")
        self.lookup.weight.copy_(unit_embeddings.T)
        self.lookup_blank = blank_id

    @torch.no_grad()
    def init_from_embeddings(self, unit_embeddings: torch.Tensor) -> None:
        """Make the projector map each one-hot CTC unit close to a target LLM embedding.

        unit_embeddings: (V, d_llm), e.g. the mean LLM embedding of each CTC unit's string.
        fc1 becomes a scaled identity-like map of the V units into the hidden layer, so a one-hot
        row activates "its" hidden unit; fc2 reads that unit's embedding back. Needs
        hidden_dim >= V and no frame stacking.
        """
        vocab, d_llm = unit_embeddings.shape
        if self.stack != 1 or self.fc1.in_features != vocab or self.fc1.out_features < vocab:
            raise ValueError(
                f"init_from_llm_embeddings needs stack_frames=1 and hidden_dim >= CTC vocab ({vocab}); "
                f"got stack_frames={self.stack}, hidden_dim={self.fc1.out_features}"
            )
        # LayerNorm maps a (smoothed) one-hot row to sqrt(V-1) at its unit and -1/sqrt(V-1)
        # elsewhere; with this gain the active hidden unit sits near 4 (SiLU ~ linear) and the
        # others near 0, whose small leftover is cancelled by fc2's bias.
        if isinstance(self.norm, nn.LayerNorm):
            self.norm.reset_parameters()
        gain = 4.0 / (vocab**0.5)
        self.fc1.weight.zero_()
        self.fc1.weight[:vocab, :vocab] = torch.eye(vocab) * gain
        self.fc1.bias.zero_()
        active = self.act(torch.tensor(gain * (vocab - 1) ** 0.5))
        inactive = self.act(torch.tensor(-gain / (vocab - 1) ** 0.5))  # the other units: ~0
        self.fc2.weight.zero_()
        self.fc2.weight[:, :vocab] = unit_embeddings.T / active
        self.fc2.bias.copy_(-inactive / active * unit_embeddings.sum(0))
