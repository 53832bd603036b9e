"""Hugging Face ``datasets`` as a source (``hf:``; the ``hf`` extra).

    hf:openslr/librispeech_asr?name=clean&split=train.100&streaming=true
    hf:data/my_saved_dataset                    # a save_to_disk folder (a DatasetDict: &split=...)
    hf:parquet?data_files=data/train-*.parquet  # a packaged builder (parquet, json, csv, ...) on local files

The location is a ``save_to_disk`` folder when it holds one (``state.json`` or ``dataset_dict.json``),
otherwise it goes to ``datasets.load_dataset`` (a Hub id, a local dataset folder or a packaged builder
with ``data_files``; ``name``, ``split``, ``revision`` and ``streaming`` passed on).

Audio is never decoded by ``datasets`` (its decoder needs torchcodec): the audio column is cast to
``Audio(decode=False)`` and each row's bytes (or path, relative to the dataset's folder or first data
file) go to ``speechllm.manifest.load_audio``, which decodes with soundfile and resamples. Columns:
``text`` (default ``text``) is required; ``audio`` (default ``audio``) for speech; ``id`` (default
``id``, otherwise the row index), ``speaker``, ``duration``, ``words``, ``target``, ``task`` are read
when named or present under that name; every other column goes to ``meta`` (``options`` and
``answer`` make a multiple-choice set). A named column that is missing, or a missing text column, is
an error naming the dataset and the columns it has.

Streaming (``streaming=true``, or a ``save_to_disk`` folder read through ``to_iterable_dataset``):
rank ``r`` of ``W`` reads ``datasets.distributed.split_dataset_by_node(ds, r, W)``; with
``shuffle_buffer=N`` each epoch is ``ds.shuffle(seed, buffer_size=N)`` at ``set_epoch(epoch)``
(datasets' own seeded shuffle: the same order in every process), otherwise the stream's order.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

from speechllm.manifest import AudioRef, Utterance
from speechllm.sources.base import (
    BadRow,
    BytesAudio,
    FileAudio,
    Source,
    SourceError,
    duration_field,
    optional_text,
    resolve,
    text_field,
    words_field,
)

ROLES = ("audio", "text", "id", "speaker", "duration", "words", "target", "task")


def _datasets():
    import datasets

    datasets.disable_progress_bars()
    return datasets


def _is_saved(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


class HFRowAudio(AudioRef):
    """Row ``index`` of a map-style dataset's audio column (cast to ``Audio(decode=False)``)."""

    def __init__(self, table: Any, column: str, index: int, base: Path | None, where: str):
        self.table, self.column, self.index, self.base, self.where = table, column, index, base, where

    def open(self) -> str | io.BytesIO:
        return _audio_value(self.table[self.index][self.column], self.base, self.where).open()

    def exists(self) -> bool:
        try:
            return _audio_value(self.table[self.index][self.column], self.base, self.where).exists()
        except SourceError:  # an empty audio cell: missing
            return False

    def __str__(self) -> str:
        return self.where


def _audio_value(value: Any, base: Path | None, where: str) -> AudioRef:
    """An ``Audio(decode=False)`` value (``{"bytes", "path"}``) or a plain path string as an AudioRef."""
    if isinstance(value, str):
        return FileAudio(resolve(value, base))
    if isinstance(value, dict) and value.get("bytes"):
        name = value.get("path")
        return BytesAudio(value["bytes"], f"{where}" + (f" ({name})" if name else ""))
    if isinstance(value, dict) and value.get("path"):
        return FileAudio(resolve(value["path"], base))
    raise SourceError(f"{where}: the audio column holds neither bytes nor a path")


class HFSource(Source):
    def __init__(self, spec):
        super().__init__(spec)
        self.opt = spec.options
        self.location = Path(spec.location).expanduser()
        self.saved = _is_saved(self.location)
        self.streaming = bool(self.opt["streaming"])
        self._dataset: Any = None
        self._columns: dict[str, str | None] | None = None
        files = [f for f in (self.opt["data_files"] or "").split(",") if f]
        self.data_files = files or None
        if self.saved or self.location.is_dir():
            self.base: Path | None = self.location
        elif files:
            self.base = Path(files[0]).expanduser().parent
        else:
            self.base = None

    # ------------------------------------------------------------------ opening

    def dataset(self) -> Any:
        """The dataset as opened (map-style ``Dataset`` or streaming ``IterableDataset``), cached."""
        if self._dataset is None:
            datasets = _datasets()
            split = self.opt["split"]
            try:
                if self.saved:
                    ds = datasets.load_from_disk(str(self.location))
                    if isinstance(ds, datasets.DatasetDict):
                        if split not in ds:
                            raise SourceError(f"{self}: split {split!r} not in the saved DatasetDict "
                                              f"(have: {', '.join(ds)}); set split=...")
                        ds = ds[split]
                    if self.streaming:
                        ds = ds.to_iterable_dataset()
                else:
                    ds = datasets.load_dataset(str(self.spec.location), name=self.opt["name"], split=split,
                                               data_files=self.data_files, revision=self.opt["revision"],
                                               streaming=self.streaming)
            except SourceError:
                raise
            except Exception as err:  # datasets raises many kinds (not found, offline, bad split, ...)
                raise SourceError(f"{self}: cannot open the dataset: {type(err).__name__}: {err}") from None
            self._dataset = ds
        return self._dataset

    def columns(self, present: list[str], require_audio: bool) -> dict[str, str | None]:
        """Role -> column name (None: not read). A named column must exist; so must the text column and,
        for speech, the audio column."""
        named = {role: self.opt[role] for role in ROLES if self.opt[role]}
        missing = [f"{role}={col}" for role, col in named.items() if col not in present]
        if missing:
            raise SourceError(f"{self}: no column {', '.join(missing)} (columns: {', '.join(present)})")
        cols = {role: named.get(role, role if role in present else None) for role in ROLES}
        needed = ["text"] + (["audio"] if require_audio else [])
        for role in needed:
            if cols[role] is None:
                raise SourceError(f"{self}: row 0: column {role!r} is missing (columns: {', '.join(present)}); "
                                  f"name the {role} column with {role}=<column>")
        if not require_audio:
            cols["audio"] = None
        return cols

    def _prepared(self, ds: Any, present: list[str], require_audio: bool) -> tuple[Any, dict[str, str | None]]:
        """The dataset with its audio column undecoded (``Audio(decode=False)``) and every other ``Audio``
        column dropped (a text source read from a speech dataset reads no audio at all)."""
        cols = self.columns(present, require_audio)
        audio = cols["audio"]
        Audio = _datasets().Audio
        features = getattr(ds, "features", None) or {}
        audio_columns = [name for name, feature in features.items() if isinstance(feature, Audio)]
        for name in audio_columns:  # first: a stream's remove_columns would decode them
            ds = ds.cast_column(name, Audio(decode=False))
        unused = [name for name in audio_columns if name != audio]
        return (ds.remove_columns(unused) if unused else ds), cols

    # ------------------------------------------------------------------ rows

    def _utterance(self, row: dict[str, Any], n: int, cols: dict[str, str | None], audio: AudioRef | None,
                   where: str) -> Utterance | BadRow:
        text = text_field(where, cols["text"], row.get(cols["text"]))
        if isinstance(text, BadRow):
            return text
        fields: dict[str, Any] = {}
        for role, check in (("target", optional_text), ("task", optional_text), ("words", words_field),
                            ("duration", duration_field)):
            col = cols[role]
            value = check(where, col, row.get(col)) if col else None
            if isinstance(value, BadRow):
                return value
            fields[role] = value
        speaker = row.get(cols["speaker"]) if cols["speaker"] else None
        uid = row.get(cols["id"]) if cols["id"] else n
        if uid is None:
            return BadRow("bad_row", f"{where}: column {cols['id']!r} is empty")
        used = {c for c in cols.values() if c}
        meta = {k: v for k, v in row.items() if k not in used and not isinstance(v, (bytes, dict))}
        return Utterance(id=str(uid), text=text, audio=audio, speaker=None if speaker is None else str(speaker),
                         meta=meta, **fields)

    def rows(self, require_audio: bool, *, rank: int = 0, world_size: int = 1, epoch: int = 0, seed: int = 0,
             shuffle: bool = False) -> Iterator[Utterance | BadRow]:
        ds = self.dataset()
        if self.streaming:
            yield from self._stream_rows(ds, require_audio, rank, world_size, epoch, seed, shuffle)
            return
        ds, cols = self._prepared(ds, list(ds.column_names), require_audio)
        audio = cols["audio"]
        table = ds.select_columns([audio]) if audio else None
        rest = ds.remove_columns([audio]) if audio else ds
        for n, row in enumerate(rest):
            where = f"{self} row {n}"
            ref = HFRowAudio(table, audio, n, self.base, where) if audio else None
            yield self._utterance(row, n, cols, ref, where)

    def _stream_rows(self, ds: Any, require_audio: bool, rank: int, world_size: int, epoch: int, seed: int,
                     shuffle: bool) -> Iterator[Utterance | BadRow]:
        from datasets.distributed import split_dataset_by_node

        features = getattr(ds, "features", None)
        first = None
        if features is None:  # a stream without declared features (json): its first row says the columns
            with closing(iter(ds)) as rows:
                first = next(rows, None)
            if first is None:
                return
        present = list(features) if features is not None else list(first)
        ds, cols = self._prepared(ds, present, require_audio)
        shuffled = shuffle and self.opt["shuffle_buffer"] > 0
        if shuffled:  # the same seed on every rank, so the ranks' shards stay disjoint
            ds = ds.shuffle(seed=seed, buffer_size=self.opt["shuffle_buffer"])
        if world_size > 1:
            ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        if shuffled:
            ds.set_epoch(epoch)  # datasets shuffles epoch e with seed + e
        shard = f" (rank {rank} of {world_size})" if world_size > 1 else ""
        for n, row in enumerate(ds):
            where = f"{self} row {n}{shard}"
            ref = None
            if cols["audio"]:
                try:
                    ref = _audio_value(row.get(cols["audio"]), self.base, where)
                except SourceError as err:
                    yield BadRow("bad_row", str(err))
                    continue
            yield self._utterance(row, n, cols, ref, where)
