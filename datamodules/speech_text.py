"""The data module every stage shares: named training sources mixed by share, checked up front, and
named speech sets for validation / test.

A source is a manifest, or a source string of another format (``hf:``, ``lhotse:``, ``lhotse-shar:``,
``tasu:``; :mod:`speechllm.sources`), of one ``kind`` (``speech``, ``simulated`` or ``text``, see
:class:`speechllm.config.SourceConfig`). Each source has its own endless batch stream (fixed size, or
duration-bucketed under ``data.batching``); :class:`MixtureBatchSampler` picks the source of each batch
from the shares at that step. Every position is a pure function of the batch index, and the global
batch count is saved in the checkpoint, so a resumed run sees exactly the batches an uninterrupted run
would have seen.

Speech is checked before training (file present and readable, sample rate, length): a bad clip is a
counted, logged skip (``skipped/<reason>`` in TensorBoard and ``metrics.json``), never a crash at step
10,000 or a silent wrong input.

A streaming source (no random access) is probed before training (it opens, its columns are there, it
has a usable item) and read by a :class:`~speechllm.sources.stream.StreamReader` per rank: the ``j``-th
batch a rank draws from it is positions ``[j*B, (j+1)*B)`` of the rank's shard (``data.batch_size``;
duration bucketing needs every duration up front, so it applies to map-style sources only), so resume
is exact here too. Its bad rows and clips are counted skips as they are met (in this process: with
``data.num_workers > 0`` the workers' counts are not gathered).

Training speech is augmented where it is loaded (``data.augment``, or a source's own
``data.sources.<name>.augment``; :mod:`speechllm.augment`), in the loader's workers, with a generator
seeded by the run seed, the source and the draw number: a resumed run augments every sample as an
uninterrupted one. Validation and test sets are never augmented.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

import lightning as L
import soundfile as sf
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.sampling import (
    BucketingStream,
    FixedSizeStream,
    MixtureBatchSampler,
    SequentialStream,
    sample_seed,
)
from speechllm.augment import AugmentConfig, augment
from speechllm.config import SourceConfig, SourceKind, StageConfig
from speechllm.manifest import AudioRef, Utterance, load_audio, normalize_target
from speechllm.schedules import ramp
from speechllm.sources import Source, open_source
from speechllm.sources.stream import StreamReader


def check_clip(utt: Utterance, sample_rate: int, max_seconds: float) -> Utterance | str:
    """The clip with its duration read from the audio, or why it cannot be used (a skip reason).

    A file of our manifests must be at ``sample_rate``; an :class:`AudioRef` (another format's audio) is
    resampled, so its rate is no reason to skip it."""
    audio = utt.audio
    try:
        if isinstance(audio, AudioRef):
            frames, rate = audio.info()
        else:
            info = sf.info(str(audio))
            frames, rate = info.frames, info.samplerate
    except FileNotFoundError:
        return "missing_audio"
    except Exception:  # soundfile raises its own error types for unreadable files
        return "unreadable_audio" if audio.exists() else "missing_audio"
    if rate != sample_rate and not isinstance(audio, AudioRef):
        return "wrong_sample_rate"
    if frames == 0:
        return "empty_audio"
    if frames / rate > max_seconds:
        return "too_long"
    return replace(utt, duration=frames / rate)


def check_audio(items: list[Utterance], sample_rate: int, max_seconds: float) -> tuple[list[Utterance], Counter]:
    """The clips that can be used as they are, with durations read from the audio, and the skip counts."""
    kept, skipped = [], Counter()
    for utt in items:
        checked = check_clip(utt, sample_rate, max_seconds)
        if isinstance(checked, str):
            skipped[checked] += 1
        else:
            kept.append(checked)
    return kept, skipped


class SourceItems(Dataset):
    """All training sources behind one index: ``(source name, item index, draw number)``; the index of a
    streaming source is a position of its rank's ``StreamReader``.

    ``augment`` names the speech sources whose clips are augmented (prob > 0) and how; ``seed`` is the
    run seed that, with the source and the draw number, seeds each clip's augmentation."""

    def __init__(self, sources: dict[str, tuple[str, list[Utterance] | StreamReader]], sample_rate: int,
                 normalization: str, augment: dict[str, AugmentConfig] | None = None, seed: int = 0,
                 max_seconds: float = 0.0):
        self.sources, self.sample_rate, self.normalization = sources, sample_rate, normalization
        self.augment, self.seed, self.max_seconds = augment or {}, seed, max_seconds

    def __len__(self) -> int:  # the map-style items (a stream has no length)
        return sum(len(items) for _, items in self.sources.values() if isinstance(items, list))

    def __getitem__(self, key: tuple[str, int, int]) -> dict[str, Any]:
        name, index, draw = key
        kind, items = self.sources[name]
        utt = items[index]
        item = {"source": name, "kind": kind, "id": utt.id, "text": utt.text, "seed": draw,
                "target": normalize_target(utt.target_text, self.normalization), "words": utt.words}
        if kind == "speech":
            item["waveform"] = load_audio(utt.audio, self.sample_rate)
            if name in self.augment:
                item["waveform"], item["words"], item["augmented"] = self.augmented(name, draw, item["waveform"], utt.words)
        return item

    def augmented(self, name: str, draw: int, wave: torch.Tensor, words: list[dict] | None
                  ) -> tuple[torch.Tensor, list[dict] | None, bool]:
        """The clip as ``augment`` makes it for this (source, draw), its word times stretched with it,
        and whether it was augmented.

        The generator comes from the same per-sample seed as ``SpeechLLMModule.sample_generators``, of
        the stream ``<source>/augment``: independent of the sample's span plan or simulation noise. A clip
        that speed perturbation would push past ``data.max_audio_seconds`` (an encoder's limit) is
        augmented again from the same seed without it: its other transforms are the same draws.
        """
        cfg, seed = self.augment[name], sample_seed(self.seed, f"{name}/augment", draw)
        out = augment(wave, self.sample_rate, cfg, torch.Generator().manual_seed(seed))
        if self.max_seconds and out.numel() > self.max_seconds * self.sample_rate >= wave.numel():
            out = augment(wave, self.sample_rate, replace(cfg, speed_prob=0.0), torch.Generator().manual_seed(seed))
        if words and out.numel() != wave.numel():  # speed perturbation: every time scales with the length
            ratio = out.numel() / wave.numel()
            words = [{**w, **{k: w[k] * ratio for k in ("start", "end") if isinstance(w.get(k), (int, float))}}
                     for w in words]
        return out, words, out is not wave  # augment hands back the very clip it leaves alone


class EvalItems(Dataset):
    """A named speech set for validation/test (every clip already checked)."""

    def __init__(self, items: list[Utterance], sample_rate: int, normalization: str):
        self.items, self.sample_rate, self.normalization = items, sample_rate, normalization

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        utt = self.items[index]
        return {"id": utt.id, "text": utt.text, "target": normalize_target(utt.target_text, self.normalization),
                "waveform": load_audio(utt.audio, self.sample_rate), "words": utt.words, "meta": utt.meta,
                "seed": index}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {key: [item[key] for item in items] for key in items[0]}
    for key in ("source", "kind"):  # one source per batch
        if key in batch:
            batch[key] = batch[key][0]
    return batch


class SpeechTextDataModule(L.LightningDataModule):
    """Training sources of a stage (``data.sources``, or ``data.train`` alone of ``default_kind``)."""

    def __init__(self, cfg: StageConfig, default_kind: SourceKind = SourceKind.simulated, tokenizer=None):
        super().__init__()
        self.cfg, self.default_kind, self.tokenizer = cfg, default_kind, tokenizer
        # Evaluation sets in dataloader order: (what is measured, set name). `wer`: transcribe and score;
        # `measure`: misalignment / forgetting; `mc`: multiple choice on text and on speech.
        self.val_index = ([("wer", n) for n in cfg.data.val] + [("measure", n) for n in cfg.measures.sets]
                          + [("mc", n) for n in cfg.measures.multiple_choice])
        self.test_index = [("wer", n) for n in cfg.data.test]
        self.skipped: Counter = Counter()  # "<source or set>/<reason>" -> count, for metrics.json
        self.manifest_overrides: dict[str, str] = {}  # source -> manifest decided at run time (selection)
        self._train_items: dict[str, tuple[str, list[Utterance] | Source]] = {}  # a Source: streaming
        self._global_batches = 0  # restored from a checkpoint (see state_dict)

    # ------------------------------------------------------------------ sources

    def source_configs(self) -> dict[str, SourceConfig]:
        data = self.cfg.data
        if data.sources:
            sources = {name: OmegaConf.to_object(src) for name, src in data.sources.items()}
        elif data.train:
            sources = {"train": SourceConfig(manifest=data.train, kind=self.default_kind)}
        else:
            raise ValueError("data: set `train` (a manifest) or `sources` (named manifests with shares)")
        # A share that is 0 throughout switches a source off (a preset's source a stage does not use).
        sources = {name: src for name, src in sources.items()
                   if not (src.share.start == 0 and not src.share.end)}
        if not sources:
            raise ValueError("data.sources: every source has share 0")
        for name, src in sources.items():
            src.manifest = self.manifest_overrides.get(name, src.manifest)
        return sources

    def augment_configs(self) -> dict[str, AugmentConfig]:
        """The augmentation of each speech training source that has one on (prob > 0): its own
        ``augment`` if set, else ``data.augment``. Text sources and evaluation sets have none."""
        stage_wide = OmegaConf.to_object(self.cfg.data.augment)
        configs = {name: src.augment if src.augment is not None else stage_wide
                   for name, src in self.source_configs().items() if src.kind == SourceKind.speech}
        return {name: cfg for name, cfg in configs.items() if cfg.prob > 0}

    def _load(self, where: str, path: str, speech: bool, limit: int = 0) -> list[Utterance]:
        """A source's first ``limit`` items (0 = all; a stream's first rows), checked (skips counted)."""
        items = open_source(path).items(require_audio=speech, limit=limit)
        if speech:
            items, skipped = check_audio(items, self.cfg.model.encoder.sample_rate, self.cfg.data.max_audio_seconds)
            self._count(where, path, skipped, len(items))
        max_words = self.cfg.data.max_train_words if where.startswith("train/") else 0
        if max_words:
            kept = [u for u in items if len(u.target_text.split()) <= max_words]
            self._count(where, path, Counter(longer_than_max_train_words=len(items) - len(kept)), len(kept))
            items = kept
        if not items:
            raise ValueError(f"{path}: no usable item left (skipped: {dict(self.skipped)})")
        return items

    def _count(self, where: str, path: str, skipped: Counter, kept: int) -> None:
        for reason, n in skipped.items():
            if n:
                self.skipped[f"{where}/{reason}"] += n
                rank_zero_warn(f"{path}: skipped {n} item(s): {reason.replace('_', ' ')} ({kept} kept)")

    def setup(self, stage: str | None = None) -> None:
        data, measures = self.cfg.data, self.cfg.measures
        paths = {"wer": (data.val, data.val_max_samples), "measure": (measures.sets, measures.max_samples),
                 "mc": (measures.multiple_choice, measures.mc_max_samples)}
        self.val_sets = [self._eval_set(f"val/{n}", paths[kind][0][n], paths[kind][1]) for kind, n in self.val_index]
        self.test_sets = [self._eval_set(f"test/{n}", data.test[n], data.test_max_samples) for _, n in self.test_index]

    def _eval_set(self, where: str, path: str, limit: int) -> EvalItems:
        rate, norm = self.cfg.model.encoder.sample_rate, self.cfg.data.target_normalization
        return EvalItems(self._load(where, path, True, limit), rate, norm)

    def eval_index(self, split: str) -> list[tuple[str, str]]:
        return self.val_index if split == "val" else self.test_index

    def check_sources(self) -> None:
        """Load and check every training source whose manifest is known now, before anything runs
        (a bad manifest fails in seconds, not after the first evaluation)."""
        for name, src in self.source_configs().items():
            if src.manifest and name not in self._train_items:
                source = open_source(src.manifest)
                if source.streaming:
                    # Probe: it opens, its columns are there, it has a usable item (skips not counted here:
                    # the training reader counts them as it meets them).
                    self._reader(name, src.kind, source, 0, 1, count=False)[0]
                    self._train_items[name] = (src.kind, source)
                else:
                    self._train_items[name] = (src.kind, self._load(f"train/{name}", src.manifest, src.kind == "speech"))

    def _reader(self, name: str, kind: str, source: Source, rank: int, world: int, count: bool = True) -> StreamReader:
        """Rank ``rank``'s reader of a streaming training source, with the checks ``_load`` makes."""
        data, speech = self.cfg.data, kind == "speech"
        rate, max_seconds, max_words = self.cfg.model.encoder.sample_rate, data.max_audio_seconds, data.max_train_words

        def keep(utt: Utterance) -> Utterance | str:
            if max_words and len(utt.target_text.split()) > max_words:
                return "longer_than_max_train_words"
            return check_clip(utt, rate, max_seconds) if speech else utt

        def counted(reason: str, message: str) -> None:
            key = f"train/{name}/{reason}"
            if not self.skipped[key]:
                rank_zero_warn(f"{source}: skipping {reason.replace('_', ' ')} ({message}); further skips are "
                               f"counted in skipped/{key}")
            self.skipped[key] += 1

        return StreamReader(source, require_audio=speech, rank=rank, world_size=world, seed=self.cfg.seed,
                            keep=keep, count=counted if count else None)

    def train_items(self) -> dict[str, tuple[str, list[Utterance] | Source]]:
        """All training sources; a source may be produced at fit start (selection), so it loads here."""
        sources = self.source_configs()
        for name, src in sources.items():
            if not src.manifest:
                raise ValueError(f"data.sources.{name}.manifest is not set")
        self.check_sources()
        return {name: self._train_items[name] for name in sources}

    # ------------------------------------------------------------------ batches

    def _stream(self, kind: str, items: list[Utterance] | StreamReader, rank: int, world: int):
        data, batching = self.cfg.data, self.cfg.data.batching
        if isinstance(items, StreamReader):
            return SequentialStream(data.batch_size, rank=rank, world_size=world)
        if batching.max_seconds <= 0 and batching.max_tokens <= 0:
            return FixedSizeStream(len(items), data.batch_size, self.cfg.seed, rank=rank, world_size=world)
        if self.tokenizer is None:
            raise ValueError("data.batching by tokens needs the LLM tokenizer")
        targets = [normalize_target(u.target_text, data.target_normalization) for u in items]
        tokens = [len(ids) + 1 for ids in self.tokenizer(targets, add_special_tokens=False).input_ids]
        durations = [u.duration or 0.0 for u in items] if kind == "speech" else [0.0] * len(items)
        return BucketingStream(durations, tokens, max_seconds=batching.max_seconds, max_tokens=batching.max_tokens,
                               max_batch_size=data.batch_size, seed=self.cfg.seed, rank=rank, world_size=world,
                               pool_batches=batching.pool_batches)

    def shares(self, step: int) -> dict[str, float]:
        return {name: ramp(s.share.kind, s.share.start, s.share.end, s.share.start_step, s.share.end_step, step)
                for name, s in self.source_configs().items()}

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        accumulate = trainer.accumulate_grad_batches if trainer else 1
        sources = {name: (kind, self._reader(name, kind, items, rank, world) if isinstance(items, Source) else items)
                   for name, (kind, items) in self.train_items().items()}
        for name, (kind, items) in sources.items():
            size = "streamed" if isinstance(items, StreamReader) else f"{len(items)}"
            rank_zero_info(f"[data] source {name!r}: {size} {kind} items")
        streams = {name: self._stream(kind, items, rank, world) for name, (kind, items) in sources.items()}
        # Exact resume: the restored global batch count (or, for old checkpoints, the step) says where
        # the stream stands. On the same device count the batches are exactly those an uninterrupted run
        # would see; on another count the run continues at the same step, not with identical batches.
        consumed = self._global_batches or (trainer.global_step * accumulate * world if trainer else 0)
        if consumed % world:
            raise ValueError(f"cannot resume {consumed} global batches on {world} devices evenly")
        self.sampler = MixtureBatchSampler(streams, self.shares, seed=self.cfg.seed, accumulate_grad_batches=accumulate,
                                           start_batch=consumed // world)
        dataset = SourceItems(sources, self.cfg.model.encoder.sample_rate, self.cfg.data.target_normalization,
                              augment=self.augment_configs(), seed=self.cfg.seed, max_seconds=self.cfg.data.max_audio_seconds)
        return DataLoader(dataset, batch_sampler=self.sampler, collate_fn=collate,
                          num_workers=self.cfg.data.num_workers, persistent_workers=False)

    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        if trainer is None:
            return {}
        # Saved at an optimizer-step boundary: every rank has consumed step * accumulate batches.
        return {"global_batches": trainer.global_step * trainer.accumulate_grad_batches * trainer.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._global_batches = int(state.get("global_batches", 0))

    def _eval_loaders(self, sets: list[EvalItems]) -> list[DataLoader]:
        trainer = self.trainer
        loaders = []
        for ds in sets:
            # Every rank takes an equal share (padded with repeats, which evaluation drops by id).
            sampler = (DistributedSampler(ds, trainer.world_size, trainer.global_rank, shuffle=False)
                       if trainer is not None and trainer.world_size > 1 else None)
            loaders.append(DataLoader(ds, batch_size=self.cfg.data.val_batch_size, sampler=sampler,
                                      collate_fn=collate, num_workers=self.cfg.data.num_workers))
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.val_sets)

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.test_sets)
