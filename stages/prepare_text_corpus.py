"""``python -m stages prepare text-corpus``: any text dataset -> a text or documents manifest.

For FineWeb-Edu-like corpora (SALAD's selection pool, a SmolLM-style text share, text-only
alignment): ``--input`` is a local file, one document a record,

    .jsonl / .jsonl.gz   a JSON object a line (``--text-field``, default ``text``)
    .parquet             a column (needs pyarrow)
    .txt / .txt.gz       one document a line

a folder written by ``datasets``' ``save_to_disk`` (``--split`` picks a ``DatasetDict``'s split), or a
Hugging Face dataset id (``HuggingFaceFW/fineweb-edu`` with ``--config sample-10BT``), streamed; both
through ``datasets`` (the ``hf`` extra). ``--n`` documents are drawn with ``--seed``: uniformly in one
pass over a local file; through a seeded shuffle buffer (``--shuffle-buffer``) of the stream for a
dataset id. They are kept as documents (``--unit documents``, cut at a sentence boundary to at most
``--max-words``) or split into sentences (``--unit sentences``). Texts that also appear in an
``--exclude`` manifest (held-out sets; case and spacing ignored) are left out.

Each line: ``id`` (``<prefix>-<record number>``, ``-s<k>`` for sentences), ``text``, ``source`` (the
input, or the record's ``--source-field``, e.g. ``url``) and ``topic`` (``--topic-field``) when present.
A manifest is rewritten only when its content changes: a second run writes nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm import tqdm

from speechllm.manifest import load_manifest
from stages.corpus_io import (
    CorpusError,
    iter_json_lines,
    iter_lines,
    normalise_sentence,
    reservoir_sample,
    split_sentences,
    write_if_changed,
)

HF_EXTRA = "pip install -e '.[hf]' (the `hf` extra), or pip install datasets"


def _suffixes(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix


def local_records(path: Path, text_field: str) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """``(record number, where, record)`` of a local file; a bad record names the file and line."""
    kind = _suffixes(path)
    if kind in (".txt", ".txt.gz"):
        for lineno, line in iter_lines(path):
            if line.strip():
                yield lineno, f"{path}:{lineno}", {text_field: line}
    elif kind in (".jsonl", ".jsonl.gz", ".json", ".json.gz"):
        yield from iter_json_lines(path)
    elif kind == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise CorpusError(f"{path}: reading parquet needs pyarrow ({HF_EXTRA}; datasets brings pyarrow)") from None
        index = 0
        for batch in pq.ParquetFile(path).iter_batches():
            for record in batch.to_pylist():
                index += 1
                yield index, f"{path} (row {index})", record
    else:
        raise CorpusError(f"{path}: unknown text file type {kind!r} (.jsonl[.gz], .parquet or .txt[.gz])")


def _datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"{what} needs `datasets`: {HF_EXTRA}") from None
    return datasets


def disk_records(path: Path, split: str) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """A dataset saved with ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` and its ``split``)."""
    datasets = _datasets(f"--input {path} (a folder, read as a `save_to_disk` dataset)")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise CorpusError(f"{path}: no split {split!r} (have {', '.join(ds)})")
        ds = ds[split]
    for index, record in enumerate(ds, start=1):
        yield index, f"{path} (record {index})", record


def hub_records(name: str, config: str | None, split: str, n: int, seed: int,
                buffer: int) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """A Hugging Face dataset, streamed; shuffled with ``seed`` through a buffer when sampling."""
    datasets = _datasets(f"--input {name!r} is not a local file, and reading a Hugging Face dataset")
    try:
        stream = datasets.load_dataset(name, name=config, split=split, streaming=True)
    except Exception as err:  # offline, unknown id, unknown config: datasets' many error types
        raise CorpusError(f"--input {name!r}: cannot open the Hugging Face dataset ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if n:
        stream = stream.shuffle(seed=seed, buffer_size=buffer)
    for index, record in enumerate(stream, start=1):
        yield index, f"{name} ({split}, record {index})", record


def document(record: dict[str, Any], where: str, args: argparse.Namespace, source: str) -> dict[str, Any] | None:
    """A record as a manifest line (before splitting), or None for an empty or too short one."""
    text = record.get(args.text_field)
    if text is None:
        raise CorpusError(f"{where}: no field {args.text_field!r} (fields: {', '.join(map(str, record))})")
    if not isinstance(text, str):
        raise CorpusError(f"{where}: field {args.text_field!r} must be a string")
    text = text.strip()
    if len(text.split()) < args.min_words:
        return None
    row = {"text": text, "source": str(record.get(args.source_field) or source) if args.source_field else source}
    topic = record.get(args.topic_field) if args.topic_field else None
    if topic not in (None, ""):
        row["topic"] = str(topic)
    return row


def cut_to_words(text: str, max_words: int) -> str:
    """The document's first sentences, at most ``max_words`` words (at least the first sentence's
    first ``max_words`` words)."""
    if not max_words or len(text.split()) <= max_words:
        return " ".join(text.split())
    kept: list[str] = []
    for sentence in split_sentences(text):
        words = sentence.split()
        if len(kept) + len(words) > max_words:
            break
        kept += words
    return " ".join(kept or text.split()[:max_words])


def excluded_texts(paths: list[Path]) -> set[str]:
    return {normalise_sentence(u.text) for p in paths for u in load_manifest(p)}


def corpus_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    path = Path(args.input)
    local = path.exists()
    source = path.name if local else args.input
    if path.is_dir():
        records = disk_records(path, args.split)
    elif local:
        records = local_records(path, args.text_field)
    else:
        records = hub_records(args.input, args.config, args.split, args.n, args.seed, args.shuffle_buffer)
    exclude = excluded_texts(args.exclude)
    prefix = args.id_prefix or Path(args.out).name.split(".")[0]

    def candidates():
        for index, where, record in tqdm(records, desc=source, unit="doc"):
            row = document(record, where, args, source)
            if row is None or (args.unit == "documents" and normalise_sentence(row["text"]) in exclude):
                continue
            yield {"id": f"{prefix}-{index:09d}", **row}

    # A local file or folder is sampled uniformly in one pass; a Hub stream is already shuffled: its first n.
    docs = reservoir_sample(candidates(), args.n, args.seed) if local else list(islice(candidates(), args.n or None))
    if args.unit == "documents":
        return [{**d, "text": cut_to_words(d["text"], args.max_words)} for d in docs]
    rows = []
    for d in docs:
        for k, sentence in enumerate(split_sentences(d["text"])):
            words = len(sentence.split())
            if words < args.min_words or (args.max_words and words > args.max_words):
                continue
            if normalise_sentence(sentence) not in exclude:
                rows.append({**d, "id": f"{d['id']}-s{k:03d}", "text": sentence})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True,
                        help="a local .jsonl[.gz] / .parquet / .txt[.gz] file, a save_to_disk folder, or a Hugging Face dataset id")
    parser.add_argument("--out", required=True, type=Path, help="the manifest to write, e.g. data/fineweb-edu/pool.jsonl")
    parser.add_argument("--n", type=int, default=0, help="documents to draw (0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (default: %(default)s)")
    parser.add_argument("--unit", choices=("documents", "sentences"), default="documents",
                        help="one line per document, or per sentence (default: %(default)s)")
    parser.add_argument("--min-words", type=int, default=1, help="leave out shorter documents/sentences (default: %(default)s)")
    parser.add_argument("--max-words", type=int, default=0,
                        help="documents: cut at a sentence boundary to at most this many words; sentences: leave out "
                             "longer ones (0 = no limit)")
    parser.add_argument("--text-field", default="text", help="the record's text field (default: %(default)s)")
    parser.add_argument("--topic-field", default="topic", help="the record's topic field, kept as `topic` when present "
                        "(default: %(default)s; '' = none)")
    parser.add_argument("--source-field", default="",
                        help="a record field kept as `source` (e.g. url; default: the input's name)")
    parser.add_argument("--id-prefix", default="", help="ids are <prefix>-<record number> (default: the output's stem)")
    parser.add_argument("--exclude", type=Path, action="append", default=[],
                        help="leave out texts that appear in this manifest (held-out sets); repeatable")
    parser.add_argument("--config", help="Hugging Face dataset config (e.g. sample-10BT for fineweb-edu)")
    parser.add_argument("--split", default="train", help="Hugging Face dataset split (default: %(default)s)")
    parser.add_argument("--shuffle-buffer", type=int, default=10_000,
                        help="Hugging Face streams: records in the seeded shuffle buffer (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    rows = corpus_rows(args)
    changed = write_if_changed(args.out, rows)
    words = sum(len(r["text"].split()) for r in rows)
    print(f"{args.out}: {len(rows)} {args.unit}, {words} words ({'written' if changed else 'unchanged'})")
    return 0
