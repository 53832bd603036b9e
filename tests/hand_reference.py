"""References the tests share, written independently of the library code they check."""

from __future__ import annotations

import torch


def word_edits(ref: str, hyp: str) -> int:
    """Levenshtein distance over whitespace-separated words, by hand."""
    r, h = ref.split(), hyp.split()
    row = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, row[0] = row[0], i
        for j in range(1, len(h) + 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
    return row[-1]


@torch.no_grad()
def sharpen(llm, factor: float = 10.0):
    """Scale the LLM's own matrices (not LoRA's): a random tiny LLM's logits are nearly flat, so it
    says the same newline at every step and its KLs are tiny and nearly symmetric."""
    for name, p in llm.named_parameters():
        if p.dim() == 2 and "lora_" not in name:
            p.mul_(factor)
    return llm
