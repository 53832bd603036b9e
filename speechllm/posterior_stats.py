"""Simulated posteriors that look like the real ones: CPS noise matched to a CTC encoder's errors.

TASU's CPS feeds near-one-hot rows; real LSD-compressed posteriors are soft and carry the encoder's
substitutions, deletions and insertions, and a projector trained only on the former reads the
latter badly (docs/methods.md#matched-cps: text-side WER 0.61 vs speech-side 1.13). Here the encoder's behaviour is
measured once on speech from the *training* voices: each LSD output is aligned to the reference
units by edit distance, giving a confusion table P(observed unit | reference unit, or deleted),
an insertion rate, and pools of real LSD vectors per observed unit. Simulation then replaces each
reference unit by a real vector of a unit drawn from its confusion row (TASU2's idea of
controllable, realistic simulation, done by rule instead of a learned simulator).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from speechllm.io import atomic_open


def align_units(ref: list[int], hyp: list[int]) -> list[tuple[int | None, int | None]]:
    """Levenshtein alignment as (ref unit or None, hyp position or None) pairs, in order."""
    n, m = len(ref), len(hyp)
    cost = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        cost[i][0] = i
    for j in range(m + 1):
        cost[0][j] = j
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost[i][j] = min(cost[i - 1][j] + 1, cost[i][j - 1] + 1, cost[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]))
    pairs, i, j = [], n, m
    while i or j:
        if i and j and cost[i][j] == cost[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]):
            pairs.append((ref[i - 1], j - 1))
            i, j = i - 1, j - 1
        elif i and cost[i][j] == cost[i - 1][j] + 1:
            pairs.append((ref[i - 1], None))
            i -= 1
        else:
            pairs.append((None, j - 1))
            j -= 1
    return pairs[::-1]


@dataclass
class PosteriorStats:
    confusion: torch.Tensor  # (V, V + 1) row = reference unit; last column = deleted
    insert_rate: float  # inserted vectors per reference unit
    pools: dict[int, torch.Tensor]  # observed unit -> (N, V) real LSD vectors
    insert_pool: torch.Tensor  # (N, V) real vectors that were insertions

    def save(self, path: str | Path, key: str = "") -> None:
        """Atomically; ``key`` names what the statistics were measured with (encoder, data)."""
        with atomic_open(path, "wb") as f:
            torch.save({"confusion": self.confusion, "insert_rate": self.insert_rate, "key": key,
                        "pools": {str(k): v for k, v in self.pools.items()}, "insert_pool": self.insert_pool}, f)

    @staticmethod
    def saved_key(path: str | Path) -> str | None:
        return torch.load(path, weights_only=True).get("key") if Path(path).is_file() else None

    @classmethod
    def load(cls, path: str | Path) -> PosteriorStats:
        if not Path(path).is_file():
            raise FileNotFoundError(f"posterior statistics not found: {path} (python -m stages prepare posterior-stats)")
        d = torch.load(path, weights_only=True)
        return cls(d["confusion"], float(d["insert_rate"]), {int(k): v for k, v in d["pools"].items()}, d["insert_pool"])


@torch.no_grad()
def collect_posterior_stats(encoder, waveforms_and_texts, max_per_unit: int = 256, smoothing: float = 0.5) -> PosteriorStats:
    """Measure a CTC encoder's LSD outputs against reference texts (iterable of (waveform list, texts))."""
    vocab = encoder.output_dim
    counts = torch.full((vocab, vocab + 1), 0.0)
    pools: dict[int, list[torch.Tensor]] = {}
    inserts: list[torch.Tensor] = []
    n_ref = n_ins = 0
    for waveforms, texts in tqdm(waveforms_and_texts, desc="posterior statistics", unit="batch"):
        feats, lengths = encoder.encode_speech(waveforms)
        for row, length, text in zip(feats, lengths.tolist(), texts):
            vectors = row[:length].float().cpu()
            ref = encoder.vocab.encode(text)
            hyp = vectors.argmax(-1).tolist()
            for r, h in align_units(ref, hyp):
                if h is not None:
                    unit_pool = pools.setdefault(hyp[h], [])
                    if len(unit_pool) < max_per_unit:
                        unit_pool.append(vectors[h])
                if r is None:
                    n_ins += 1
                    if len(inserts) < max_per_unit:
                        inserts.append(vectors[h])
                else:
                    n_ref += 1
                    counts[r, hyp[h] if h is not None else vocab] += 1
    # Units never seen in the references keep a near-identity row (a little smoothing everywhere).
    counts[:, :vocab] += torch.eye(vocab) * smoothing
    confusion = counts / counts.sum(-1, keepdim=True)
    return PosteriorStats(confusion, n_ins / max(n_ref, 1), {u: torch.stack(v) for u, v in pools.items()},
                          torch.stack(inserts) if inserts else torch.zeros(0, vocab))


def simulate_matched_posteriors(ids: torch.Tensor, stats: PosteriorStats, vocab_size: int,
                                generator: torch.Generator | None = None) -> torch.Tensor:
    """Simulated LSD output (L', V) for reference units ``ids`` drawn from measured statistics."""
    rows = []
    for unit in ids.tolist():
        observed = int(torch.multinomial(stats.confusion[unit], 1, generator=generator))
        if observed < vocab_size:
            rows.append(_draw(stats.pools.get(observed), observed, vocab_size, generator))
        # Poisson, not one coin: a weak head can insert more than one vector per unit.
        inserted = int(torch.poisson(torch.tensor(stats.insert_rate), generator=generator)) if len(stats.insert_pool) else 0
        for _ in range(inserted):
            rows.append(stats.insert_pool[int(torch.randint(len(stats.insert_pool), (), generator=generator))])
    if not rows:
        return torch.zeros(0, vocab_size)
    return torch.stack(rows).float()


def _draw(pool: torch.Tensor | None, unit: int, vocab_size: int, generator) -> torch.Tensor:
    if pool is None or not len(pool):  # a unit the encoder never emitted: a one-hot stands in
        return torch.nn.functional.one_hot(torch.tensor(unit), vocab_size).float()
    return pool[int(torch.randint(len(pool), (), generator=generator))]
