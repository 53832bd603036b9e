"""Validation and test for every stage: each evaluation set is one dataloader, and what it measures
is named by the data module's index: ``wer`` (transcribe, corpus WER with S/D/I), ``measure``
(misalignment M and forgetting F, :mod:`speechllm.measures`) or ``mc`` (multiple-choice accuracy on
text and on speech, and the gap).

Each rank evaluates its share; per-item results are gathered on every rank and de-duplicated by id
(the distributed sampler pads with repeats), so the numbers equal a single-process evaluation.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from speechllm.distributed import all_gather_objects
from speechllm.measures import misalignment_forgetting, multiple_choice
from speechllm.metrics import corpus_errors
from speechllm.sequences import speech_and_text_views


def gather_items(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's rows, once per item id, in id order."""
    rows = [r for part in all_gather_objects(rows) for r in part]
    return sorted({r["id"]: r for r in rows}.values(), key=lambda r: r["id"])


def summarise(kind: str, rows: list[dict[str, Any]], normalizer: str = "whisper") -> dict[str, float]:
    """The metrics of one evaluation set from its per-item rows (WER after ``normalizer``)."""
    if kind == "wer":
        total, _ = corpus_errors([r["ref"] for r in rows], [r["hyp"] for r in rows], normalizer)
        return {"wer": total.wer, "substitutions": total.substitutions, "deletions": total.deletions,
                "insertions": total.insertions, "ref_words": total.ref_words}
    if kind == "measure":
        m_count = sum(r["m_count"] for r in rows)
        f_count = sum(r["f_count"] for r in rows)
        return {"M": sum(r["m_sum"] for r in rows) / max(m_count, 1), "F": sum(r["f_sum"] for r in rows) / max(f_count, 1),
                "M_positions": m_count}
    if kind == "mc":
        n = max(len(rows), 1)
        acc = {key: sum(r[key] == r["answer"] for r in rows) / n for key in ("speech", "text", "text_original")}
        return {"acc_speech": acc["speech"], "acc_text": acc["text"], "acc_text_original": acc["text_original"],
                "gap": acc["text_original"] - acc["speech"], "text_gap": acc["text_original"] - acc["text"]}
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
            hyps = self.model.transcribe(batch["waveform"])
            rows = [{"ref": r, "hyp": h} for r, h in zip(batch["target"], hyps)]
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
                # Every rank holds the same gathered numbers: no further reduction.
                self.log(f"{split}/{name}/{key}", float(value), add_dataloader_idx=False, sync_dist=False)
            if kind == "wer" and self.global_rank == 0 and rows:
                self.log_text_samples(f"{split}/{name}", rows)

    def log_text_samples(self, name: str, rows: list[dict[str, Any]]) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_text"):
            return
        lines = [f"**{r['id']}**  \nREF: {r['ref']}  \nHYP: {r['hyp']}" for r in rows[: self.cfg.trainer.log_text_samples]]
        experiment.add_text(f"{name}/samples", "\n\n".join(lines), self.global_step)
