"""A learned posterior simulator (TASU2's idea, our design): text -> LSD-rate CTC posteriors at a
requested error rate.

TASU's CPS turns text into near-one-hot rows by rule, and matched CPS draws real vectors from a
context-free confusion table; neither knows that a CTC head confuses a unit differently in different
words, nor how hard an utterance is. This model reads the reference units in context, conditioned on
a difficulty (the greedy WER the simulated utterance should have), and predicts for each unit what the
real encoder emitted there, learned from pairs (transcript, the encoder's real LSD output):

- whether the encoder got the unit wrong (``error``), and if so which unit its vector's argmax was
  instead, or that it was deleted (``observed``: V + 1 classes);
- how many vectors the encoder inserted after it (``inserted``: 0, 1 or 2) and their units;
- the vector's shape: the mass on its argmax (``peak``) and how the rest spreads (``spread``).

Training aligns each real LSD output to its reference units by edit distance (the alignment matched
CPS uses) and fits every head with cross-entropy against what was observed; ``spread`` against the
real vector's off-argmax mass, so the loss is on whole distributions. Sampling draws each unit's
outcome from the model's distributions with the caller's generator, so a sample's posteriors depend
only on its seed (exact resume), and every emitted row is a distribution (sums to 1).

Difficulty is a value in [0, 1] embedded by linear interpolation between learned embeddings on a grid
(``grid`` points): training sees each utterance's measured WER, generation any requested one. The
greedy WER a requested value achieves is measured after training on held-out training texts and kept
as a calibration curve (``calibration``), which :meth:`condition_for` inverts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from speechllm.posterior_stats import align_units

MAX_INSERTED = 2  # inserted vectors per unit, at most (more are counted as 2)


def decode_vectors(vectors: torch.Tensor, units: list[str], blank_id: int) -> str:
    """Greedy text of LSD-rate vectors: each vector is one emitted unit (no repeats to collapse)."""
    best = vectors.argmax(-1).tolist() if len(vectors) else []
    text = "".join(units[i].replace("|", " ").replace("\u2581", " ") for i in best if i != blank_id)
    return " ".join(text.split())


def pair_targets(ref: list[int], vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the encoder did at each reference unit, from its real LSD output ``vectors`` (T, V).

    aligned: the index of the vector aligned to the unit (-1 where the unit was deleted); observed: that
    vector's argmax, or V where deleted; error: observed is not the reference unit; peak: the vector's
    largest probability; inserted: vectors inserted after the unit (those before the first unit count
    for it), capped at MAX_INSERTED; insert_unit: the first inserted vector's argmax (-100 where none).
    The spread target is not stored (a (units, V) table per pair): :func:`spread_targets` makes it.
    """
    n, vocab = len(ref), vectors.shape[-1]
    hyp = vectors.argmax(-1).tolist()
    aligned = torch.full((n,), -1, dtype=torch.long)
    observed = torch.full((n,), vocab, dtype=torch.long)
    peak = torch.zeros(n)
    inserted = torch.zeros(n, dtype=torch.long)
    insert_unit = torch.full((n,), -100, dtype=torch.long)
    i = -1  # reference position of the last unit seen
    for r, h in align_units(ref, hyp):
        if r is not None:
            i += 1
            if h is not None:
                aligned[i], observed[i], peak[i] = h, hyp[h], vectors[h, hyp[h]]
        elif n:  # an insertion: after position i (before the first unit: counted at position 0)
            at = max(i, 0)
            if inserted[at] == 0:
                insert_unit[at] = hyp[h]
            inserted[at] = min(int(inserted[at]) + 1, MAX_INSERTED)
    error = (observed != torch.tensor(ref, dtype=torch.long)).float()
    return {"aligned": aligned, "observed": observed, "error": error, "peak": peak, "inserted": inserted,
            "insert_unit": insert_unit}


def spread_targets(vectors: torch.Tensor, aligned: torch.Tensor) -> torch.Tensor:
    """(units, V): each aligned vector's mass off its argmax, renormalised; zeros where deleted."""
    rows = vectors[aligned.clamp(min=0)].float()
    rows = rows.scatter(1, rows.argmax(-1, keepdim=True), 0.0)
    rows = rows / rows.sum(-1, keepdim=True).clamp(min=1e-8)
    return rows * (aligned >= 0)[:, None]


def correct_errors(ref: list[int], vectors: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """The real LSD output ``vectors`` with about ``fraction`` of its errors undone: an easier utterance
    whose remaining errors and every vector's shape are still the encoder's own.

    A weak encoder rarely gets an utterance right, so pairs at low difficulty would be missing; these
    fill them. A corrected substitution swaps the two units' mass (the shape stays), a corrected
    deletion puts back a copy of the utterance's most typical correct vector relabelled as the unit
    (a peak-0.9 one-hot where it has none), a corrected insertion is dropped.
    """
    hyp = vectors.argmax(-1).tolist()
    pairs = align_units(ref, hyp)
    correct = [h for r, h in pairs if r is not None and h is not None and hyp[h] == r]
    template = vectors[correct[len(correct) // 2]] if correct else None
    rows = []
    for r, h in pairs:
        undo = (r is None or h is None or hyp[h] != r) and float(torch.rand((), generator=generator)) < fraction
        if r is not None and h is not None:
            row = vectors[h].clone()
            if undo:
                row[[hyp[h], r]] = row[[r, hyp[h]]]
            rows.append(row)
        elif r is not None and undo:  # a deletion put back
            if template is None:
                row = torch.full((vectors.shape[-1],), 0.1 / max(vectors.shape[-1] - 1, 1))
                row[r] = 0.9
            else:
                row = template.clone()
                u = int(template.argmax())
                row[[u, r]] = row[[r, u]]
            rows.append(row)
        elif r is None and not undo:  # an insertion kept
            rows.append(vectors[h])
    return torch.stack(rows) if rows else vectors[:0]


class PosteriorSimulator(nn.Module):
    """A transformer encoder over CTC units + difficulty, with one head per thing the encoder does."""

    VERSION = 2  # of the heads and their targets: a saved simulator of another version is retrained

    def __init__(self, vocab_size: int, blank_id: int, dim: int = 192, layers: int = 3, heads: int = 4,
                 max_len: int = 256, grid: int = 21, calibration: dict | None = None):
        super().__init__()
        self.meta = {"vocab_size": vocab_size, "blank_id": blank_id, "dim": dim, "layers": layers, "heads": heads,
                     "max_len": max_len, "grid": grid, "calibration": calibration}
        self.unit = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_len, dim)
        self.difficulty = nn.Embedding(grid, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.error = nn.Linear(dim, 1)
        self.observed = nn.Linear(dim, vocab_size + 1)
        self.inserted = nn.Linear(dim, MAX_INSERTED + 1)
        self.insert_unit = nn.Linear(dim, vocab_size)
        self.peak = nn.Linear(dim, 1)
        self.spread = nn.Linear(dim, vocab_size)

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def embed_difficulty(self, difficulty: torch.Tensor) -> torch.Tensor:
        """(B,) values in [0, 1] -> (B, dim), linear between the two nearest grid embeddings."""
        x = difficulty.clamp(0.0, 1.0) * (self.meta["grid"] - 1)
        low = x.floor().long().clamp(max=self.meta["grid"] - 2)
        frac = (x - low)[:, None]
        return (1 - frac) * self.difficulty(low) + frac * self.difficulty(low + 1)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, difficulty: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, L) unit ids, (B,) lengths, (B,) difficulty -> each head's logits, (B, L, ...)."""
        length = ids.shape[1]
        positions = torch.arange(length, device=ids.device).clamp(max=self.meta["max_len"] - 1)
        x = self.unit(ids) + self.position(positions)[None] + self.embed_difficulty(difficulty)[:, None]
        padding = torch.arange(length, device=ids.device)[None] >= lengths[:, None]
        h = self.norm(self.encoder(x, src_key_padding_mask=padding))
        return {"error": self.error(h).squeeze(-1), "observed": self.observed(h), "inserted": self.inserted(h), "insert_unit": self.insert_unit(h),
                "peak": self.peak(h).squeeze(-1), "spread": self.spread(h)}

    def loss(self, out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each head's mean loss over the valid positions; ``total`` is their sum."""
        valid = torch.arange(out["observed"].shape[1], device=lengths.device)[None] < lengths[:, None]
        kept = valid & (targets["observed"] < self.vocab_size)  # positions with a real vector
        wrong = valid & (targets["error"] > 0)
        ce = nn.functional.cross_entropy
        parts = {
            "error": nn.functional.binary_cross_entropy_with_logits(out["error"][valid], targets["error"][valid]),
            "observed": ce(out["observed"][wrong], targets["observed"][wrong]) if wrong.any() else out["observed"].sum() * 0.0,
            "inserted": ce(out["inserted"][valid], targets["inserted"][valid]),
            "insert_unit": ce(out["insert_unit"][valid], targets["insert_unit"][valid], ignore_index=-100)
            if (targets["insert_unit"][valid] >= 0).any() else out["insert_unit"].sum() * 0.0,
            "peak": nn.functional.binary_cross_entropy_with_logits(out["peak"][kept], targets["peak"][kept])
            if kept.any() else out["peak"].sum() * 0.0,
            "spread": -(targets["spread"][kept] * out["spread"][kept].log_softmax(-1)).sum(-1).mean()
            if kept.any() else out["spread"].sum() * 0.0,
        }
        parts["total"] = sum(parts.values())
        return parts

    def condition_for(self, wer: float) -> float:
        """The difficulty to condition on for a requested greedy WER (the calibration curve inverted;
        the request itself before calibration)."""
        cal = self.meta.get("calibration")
        if not cal:
            return min(max(wer, 0.0), 1.0)
        achieved, condition = cal["achieved"], cal["condition"]
        if wer <= achieved[0]:
            return condition[0]
        for (a0, c0), (a1, c1) in zip(zip(achieved, condition), zip(achieved[1:], condition[1:])):
            if wer <= a1:
                return c0 + (c1 - c0) * (wer - a0) / (a1 - a0) if a1 > a0 else c1
        return condition[-1]

    @torch.no_grad()
    def simulate(self, ids: torch.Tensor, condition: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Simulated LSD output (L', V) for one utterance's units ``ids`` (L,) at difficulty ``condition``."""
        vocab = self.vocab_size
        if ids.numel() == 0:
            return torch.zeros(0, vocab)
        ids = ids.long().flatten()[None].cpu()
        device = self.unit.weight.device  # the model runs where the encoder is; sampling on the CPU,
        out = {name: value.float().cpu() for name, value in self.forward(  # with the sample's CPU generator
            ids.to(device), torch.tensor([ids.shape[1]], device=device), torch.tensor([float(condition)], device=device)).items()}
        wrong = torch.rand(ids.shape[1], generator=generator) < out["error"][0].sigmoid()
        instead = out["observed"][0].scatter(1, ids[0][:, None], float("-inf"))  # an error is another unit
        observed = torch.where(wrong, torch.multinomial(instead.softmax(-1), 1, generator=generator).squeeze(1), ids[0])
        inserted = torch.multinomial(out["inserted"][0].softmax(-1), 1, generator=generator).squeeze(1)
        insert_units = torch.multinomial(out["insert_unit"][0].softmax(-1), MAX_INSERTED, replacement=True,
                                         generator=generator)
        peak, spread = out["peak"][0].sigmoid(), out["spread"][0]
        rows = []
        for i in range(ids.shape[1]):
            if observed[i] < vocab:
                rows.append(_vector(int(observed[i]), peak[i], spread[i]))
            rows += [_vector(int(u), peak[i], spread[i]) for u in insert_units[i, : int(inserted[i])].tolist()]
        return torch.stack(rows) if rows else torch.zeros(0, vocab)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / "simulator.safetensors"))
        (directory / "simulator.json").write_text(json.dumps(self.meta, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> PosteriorSimulator:
        directory = Path(directory)
        if not (directory / "simulator.json").is_file():
            raise FileNotFoundError(f"no posterior simulator at {directory} (python -m stages prepare simulator)")
        sim = cls(**json.loads((directory / "simulator.json").read_text()))
        sim.load_state_dict(load_file(str(directory / "simulator.safetensors")))
        return sim.eval().requires_grad_(False)


def bins_table(bins: list[dict]) -> str:
    """Markdown table of a simulator report's requested vs achieved greedy WER per bin."""
    return "| requested WER | achieved | uncalibrated |\n|---|---|---|\n" + "\n".join(
        f"| {b['requested']:.1f} | {b['achieved']:.3f} | {b['achieved_uncalibrated']:.3f} |" for b in bins)


def _vector(unit: int, peak: torch.Tensor, spread_logits: torch.Tensor) -> torch.Tensor:
    """A distribution with mass ``peak`` on ``unit`` and the rest spread as ``spread_logits`` say,
    ``unit`` kept the argmax (a row the model meant as ``unit`` must decode as it)."""
    rest = spread_logits.clone()
    rest[unit] = float("-inf")
    rest = rest.softmax(-1) * (1.0 - peak)
    top = rest.max()
    if top >= peak:  # a flat peak: lower the rest below it and give the mass back to the unit
        rest = rest * (0.95 * peak / top)
    rest[unit] = 0.0
    rest[unit] = 1.0 - rest.sum()
    return rest
