"""Validation and test for every stage: each evaluation set is one dataloader, and what it measures
is named by the data module's index: ``wer`` (transcribe, corpus WER with S/D/I; with joint CTC/LLM
decoding also ``ctc_chosen``, the share of clips where the CTC head's own transcript won), ``measure``
(misalignment M and forgetting F, :mod:`speechllm.measures`) or ``mc`` (multiple-choice accuracy on
text and on speech, and the gap).

Each rank evaluates its share; per-item results are gathered on every rank and de-duplicated by id
(the distributed sampler pads with repeats), so the numbers equal a single-process evaluation.
Next to each measure, ``<metric>_low``/``<metric>_high``: its 95 % percentile bootstrap interval over
the set's items (:mod:`speechllm.intervals`, seeded, so every rank computes the same bounds).

With a stage directory, rank zero also keeps every evaluation's per-item rows (:func:`eval_rows_path`:
``eval/<split>/<set>/step-<N>.jsonl``), for analyses the summaries cannot give: M of a subset of
documents (the clusters selection targeted), a set's M at each validation along training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch

from speechllm.distributed import all_gather_objects
from speechllm.intervals import bootstrap_interval
from speechllm.io import atomic_write
from speechllm.measures import misalignment_forgetting, multiple_choice
from speechllm.metrics import corpus_errors
from speechllm.sequences import speech_and_text_views


def gather_items(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's rows, once per item id, in id order."""
    rows = [r for part in all_gather_objects(rows) for r in part]
    return sorted({r["id"]: r for r in rows}.values(), key=lambda r: r["id"])


def eval_rows_path(stage_dir: str | Path, split: str, name: str, step: int) -> Path:
    """Where an evaluation's per-item rows are kept: one JSON object a line, in id order."""
    return Path(stage_dir) / "eval" / split / name / f"step-{step}.jsonl"


def read_eval_rows(stage_dir: str | Path, split: str, name: str) -> dict[int, list[dict[str, Any]]]:
    """Step -> that evaluation's rows, for every kept evaluation of one set (empty where none)."""
    folder = Path(stage_dir) / "eval" / split / name
    out = {}
    for path in folder.glob("step-*.jsonl") if folder.is_dir() else ():
        out[int(path.stem.removeprefix("step-"))] = [json.loads(line) for line in path.read_text().splitlines()]
    return dict(sorted(out.items()))


# The bootstrap behind every ``<metric>_low``/``<metric>_high``: items resampled with replacement.
INTERVAL_RESAMPLES, INTERVAL_LEVEL, INTERVAL_SEED = 1000, 0.95, 0


def _with_interval(name: str, value: float, sums: list[float], counts: list[float] | None = None) -> dict[str, float]:
    """``{name: value, name_low, name_high}`` for the ratio ``sum(sums) / sum(counts)`` over items (the
    bounds only where there are items with a count). One seed for all: the measures of a set share their
    resamples (a paired bootstrap), and every rank, holding the same gathered items, the same bounds."""
    counts = [1.0] * len(sums) if counts is None else counts
    if not sums or sum(counts) <= 0:
        return {name: value}
    low, high = bootstrap_interval(sums, counts, resamples=INTERVAL_RESAMPLES, level=INTERVAL_LEVEL, seed=INTERVAL_SEED)
    return {name: value, f"{name}_low": low, f"{name}_high": high}


def summarise(kind: str, rows: list[dict[str, Any]], normalizer: str = "whisper") -> dict[str, float]:
    """The metrics of one evaluation set from its per-item rows (WER after ``normalizer``), each measure
    with its bootstrap interval over the items (utterances, documents, questions)."""
    if kind == "wer":
        total, per_utt = corpus_errors([r["ref"] for r in rows], [r["hyp"] for r in rows], normalizer)
        errors = [u.substitutions + u.deletions + u.insertions for u in per_utt]
        out = {**_with_interval("wer", total.wer, errors, [u.ref_words for u in per_utt]),
               "substitutions": total.substitutions, "deletions": total.deletions,
               "insertions": total.insertions, "ref_words": total.ref_words}
        if rows and "source" in rows[0]:  # joint CTC/LLM decoding: the share the head's own reading won
            out["ctc_chosen"] = sum(r["source"] == "ctc" for r in rows) / len(rows)
        return out
    if kind == "measure":
        out = {}
        for name, key in (("M", "m"), ("F", "f")):
            sums, counts = [r[f"{key}_sum"] for r in rows], [r[f"{key}_count"] for r in rows]
            out.update(_with_interval(name, sum(sums) / max(sum(counts), 1), sums, counts))
        return {**out, "M_positions": sum(r["m_count"] for r in rows)}
    if kind == "mc":
        n = max(len(rows), 1)
        right = {key: [float(r[key] == r["answer"]) for r in rows] for key in ("speech", "text", "text_original")}
        acc = {key: sum(v) / n for key, v in right.items()}
        # The gaps are means of per-question differences: their intervals are paired.
        gap = [o - s for o, s in zip(right["text_original"], right["speech"])]
        text_gap = [o - t for o, t in zip(right["text_original"], right["text"])]
        return {**_with_interval("acc_speech", acc["speech"], right["speech"]),
                **_with_interval("acc_text", acc["text"], right["text"]),
                **_with_interval("acc_text_original", acc["text_original"], right["text_original"]),
                **_with_interval("gap", acc["text_original"] - acc["speech"], gap),
                **_with_interval("text_gap", acc["text_original"] - acc["text"], text_gap)}
    raise ValueError(f"unknown evaluation kind {kind!r}")


class EvaluationMixin(L.LightningModule):
    """Needs ``self.model`` (a SpeechLLM) and ``self.cfg`` (a StageConfig)."""

    def on_validation_epoch_start(self) -> None:
        self._eval_outputs: dict[int, list[dict[str, Any]]] = {}

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate_batch("val", batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate_batch("test", batch, dataloader_idx)

    def _evaluate_batch(self, split: str, batch: dict, dataloader_idx: int) -> None:
        kind, _ = self.trainer.datamodule.eval_index(split)[dataloader_idx]
        distill = self.cfg.distill
        if kind == "wer":
            hyps = self.model.transcribe_with_sources(batch["waveform"])
            joint = self.model.cfg.generation.ctc_weight > 0  # then: whose candidate won, per clip
            rows = [{"ref": r, "hyp": h, **({"source": source} if joint else {})}
                    for r, (h, source) in zip(batch["target"], hyps)]
        elif kind == "measure":
            # Seeded by the item's index in its set: every evaluation plans the same spans.
            views = speech_and_text_views(
                self.model, batch["waveform"], batch["words"], batch["text"], batch["target"],
                [torch.Generator().manual_seed(s) for s in batch["seed"]], fmt=distill.format,
                text_words=tuple(distill.text_span_words), speech_words=tuple(distill.speech_span_words))
            rows = misalignment_forgetting(self.model, views)
        else:
            meta = batch["meta"]
            picks = multiple_choice(self.model, batch["waveform"], batch["text"], [m["options"] for m in meta],
                                    fmt=distill.format)
            rows = [{**p, "answer": int(m["answer"])} for p, m in zip(picks, meta)]
        for uid, row in zip(batch["id"], rows):
            row["id"] = uid
        self._eval_outputs.setdefault(dataloader_idx, []).extend(rows)

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def _finish_evaluation(self, split: str) -> None:
        datamodule = self.trainer.datamodule
        for idx, (kind, name) in enumerate(datamodule.eval_index(split) if datamodule else []):
            rows = gather_items(self._eval_outputs.get(idx, []))
            for key, value in summarise(kind, rows, self.cfg.data.wer_normalizer).items():
                # Every rank holds the same gathered numbers (and seeded bounds): no further reduction.
                self.log(f"{split}/{name}/{key}", float(value), add_dataloader_idx=False, sync_dist=False)
            if kind == "wer" and self.global_rank == 0 and rows:
                self.log_text_samples(f"{split}/{name}", rows)
            stage_dir = getattr(self, "stage_dir", None)
            if stage_dir is not None and self.global_rank == 0 and rows:
                atomic_write(eval_rows_path(stage_dir, split, name, self.global_step),
                             "".join(json.dumps(r) + "\n" for r in rows))

    def log_text_samples(self, name: str, rows: list[dict[str, Any]]) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_text"):
            return
        lines = [f"**{r['id']}**  \nREF: {r['ref']}  \nHYP: {r['hyp']}" for r in rows[: self.cfg.trainer.log_text_samples]]
        experiment.add_text(f"{name}/samples", "\n\n".join(lines), self.global_step)
