"""Datasets and the DataModule shared by the stages: text or speech for training, named speech sets
for validation."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from datamodules.manifest import Utterance, load_audio, load_manifest, normalize_target
from datamodules.sampling import ResumableBatchSampler
from speechllm.config import StageConfig


class TextDataset(Dataset):
    """Text-only items; the sampler's draw number becomes the seed of the item's simulated input."""

    def __init__(self, items: list[Utterance], normalization: str):
        self.items, self.normalization = items, normalization

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, draw = key
        utt = self.items[index]
        return {"id": utt.id, "text": utt.text, "target": normalize_target(utt.target_text, self.normalization), "seed": draw}


class SpeechDataset(Dataset):
    def __init__(self, items: list[Utterance], sample_rate: int, normalization: str):
        self.items, self.sample_rate, self.normalization = items, sample_rate, normalization

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, draw = key if isinstance(key, tuple) else (key, key)
        utt = self.items[index]
        return {
            "id": utt.id, "text": utt.text, "target": normalize_target(utt.target_text, self.normalization),
            "waveform": load_audio(utt.audio, self.sample_rate), "seed": draw,
        }


def collate(items: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {key: [item[key] for item in items] for key in items[0]}


class SpeechTextDataModule(L.LightningDataModule):
    """``train_on``: ``text`` (text-only alignment) or ``speech``; validation is always speech."""

    def __init__(self, cfg: StageConfig, train_on: str = "text"):
        super().__init__()
        self.cfg, self.train_on = cfg, train_on
        self.val_names: list[str] = list(cfg.data.val)
        self.test_names: list[str] = list(cfg.data.test)
        self.skipped: dict[str, int] = {}  # counted skips, reported in metrics.json

    def setup(self, stage: str | None = None) -> None:
        data = self.cfg.data
        norm, rate = data.target_normalization, self.cfg.model.encoder.sample_rate
        if stage in (None, "fit"):
            if not data.train:
                raise ValueError("data.train: no training manifest configured")
            items = load_manifest(data.train, require_audio=self.train_on == "speech")
            if data.max_train_words:
                kept = [u for u in items if len(u.target_text.split()) <= data.max_train_words]
                self.skipped["longer_than_max_train_words"] = len(items) - len(kept)
                rank_zero_info(f"{data.train}: skipped {len(items) - len(kept)} of {len(items)} items with more "
                               f"than {data.max_train_words} words (data.max_train_words)")
                items = kept
            self.train_set = TextDataset(items, norm) if self.train_on == "text" else SpeechDataset(items, rate, norm)
        def speech_sets(manifests: dict[str, str], limit: int) -> dict[str, SpeechDataset]:
            return {name: SpeechDataset(load_manifest(path, require_audio=True)[: limit or None], rate, norm)
                    for name, path in manifests.items()}

        self.val_sets = speech_sets(data.val, data.val_max_samples)
        self.test_sets = speech_sets(data.test, data.test_max_samples)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        # Exact resume: restart the stream at the batch the restored step has reached.
        start = trainer.global_step * trainer.accumulate_grad_batches if trainer else 0
        sampler = ResumableBatchSampler(
            len(self.train_set), self.cfg.data.batch_size, self.cfg.seed,
            rank=trainer.global_rank if trainer else 0, world_size=trainer.world_size if trainer else 1,
            start_batch=start,
        )
        return DataLoader(self.train_set, batch_sampler=sampler, collate_fn=collate,
                          num_workers=self.cfg.data.num_workers, persistent_workers=False)

    def _eval_loaders(self, sets: dict[str, SpeechDataset]) -> list[DataLoader]:
        return [DataLoader(ds, batch_size=self.cfg.data.val_batch_size, shuffle=False, collate_fn=collate,
                           num_workers=self.cfg.data.num_workers) for ds in sets.values()]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.val_sets)

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.test_sets)
