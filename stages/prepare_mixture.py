"""``python -m stages prepare mixture``: several text manifests as one, each row tagged with its source.

SALAD's text share and stage-II pool are broad web text, wider than the natural speech. This step builds
such a pool from manifests that already exist (the demo's fortunes pool and the broad-text pool, or a
user's own), so the stages read one manifest and the selection report can say which source each
cluster holds::

    python -m stages prepare mixture --out data/demo/mixture/pool.jsonl \\
        fortunes=data/demo/docs/pool.jsonl broad=data/demo/broad/docs/pool.jsonl \\
        --heldout data/demo/docs/dev.jsonl --heldout data/demo/broad/docs/dev.jsonl

- Each row keeps its fields; ``source`` is set to the input's NAME where the row has none (the
  broad-text rows name their corpus: ``wordnet``, ``gensim-news``, ...).
- Inputs are written in the order given, rows in their order. A row id met twice is an error, not a skip.
- **No held-out sentence in the mixture:** every sentence of ``MIN_WORDS`` words or more of every
  ``--heldout`` manifest (case and punctuation blind) is looked for in every row, and a row holding one
  is left out, counted per input and logged with both places. (Shorter sentences, "Yes." or an initial
  cut off as "H.", recur in any two corpora and say nothing of a leak.) The demo's fortunes need it:
  their split is by fortune, and a few fortunes of the pool repeat a sentence of a held-out one.
- A second run on the same inputs rewrites nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

from stages.corpus_io import split_sentences, write_if_changed
from stages.prepare_demo_data import text_key

log = logging.getLogger(__name__)

MIN_WORDS = 4  # the shortest sentence the leak check compares (broad-text's sentences have 4-30 words)


class MixtureError(RuntimeError):
    """An input that cannot be mixed: the message says where."""


def parse_input(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise MixtureError(f"input {spec!r}: expected NAME=MANIFEST, e.g. fortunes=data/demo/docs/pool.jsonl")
    return name, Path(path)


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a JSONL manifest whose rows have ``id`` and ``text``."""
    if not path.is_file():
        raise MixtureError(f"{path}: no such manifest")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise MixtureError(f"{path}:{number}: not JSON ({err})") from None
        missing = [k for k in ("id", "text") if not isinstance(row.get(k), str) or not row[k].strip()]
        if missing:
            raise MixtureError(f"{path}:{number}: field(s) {', '.join(missing)} missing or empty")
        out.append((number, row))
    return out


def sentence_keys(text: str) -> list[tuple[str, str]]:
    """(sentence, normalised form) for the text's sentences of ``MIN_WORDS`` words or more."""
    return [(s, key) for s in split_sentences(text) if len((key := text_key(s)).split()) >= MIN_WORDS]


def heldout_sentences(paths: list[Path]) -> dict[str, str]:
    """Normalised held-out sentence -> where it is (``file:line``)."""
    where: dict[str, str] = {}
    for path in paths:
        for number, row in read_rows(path):
            for _, key in sentence_keys(row["text"]):
                where.setdefault(key, f"{path}:{number}")
    return where


def mix(inputs: list[tuple[str, Path]], out: Path, heldout: list[Path] = ()) -> dict:
    """Write the mixture (see the module docstring); returns rows and words per input and whether the
    file changed."""
    if not inputs:
        raise MixtureError("nothing to mix: give NAME=MANIFEST inputs")
    names = [name for name, _ in inputs]
    if len(set(names)) < len(names):
        raise MixtureError(f"input names repeat: {names}")
    held = heldout_sentences(list(heldout))
    rows, seen, summary = [], {}, {}
    for name, path in inputs:
        kept = words = 0
        leaks = []
        for number, row in read_rows(path):
            where = f"{path}:{number}"
            if row["id"] in seen:
                raise MixtureError(f"{where}: id {row['id']!r} already at {seen[row['id']]}")
            seen[row["id"]] = where
            if leak := next(((s, held[k]) for s, k in sentence_keys(row["text"]) if k in held), None):
                leaks.append(f"{where} holds {leak[0]!r} ({leak[1]})")
                continue
            rows.append({**row, "source": row.get("source") or name})
            kept += 1
            words += len(row["text"].split())
        if leaks:
            log.warning("%s: %d row(s) left out, each holding a held-out sentence: %s", path, len(leaks),
                        "; ".join(leaks[:3]) + (" ..." if len(leaks) > 3 else ""))
        summary[name] = {"manifest": str(path), "rows": kept, "words": words, "skipped_heldout": len(leaks)}
    changed = write_if_changed(out, rows)
    sources = Counter(r["source"] for r in rows)
    return {"out": str(out), "inputs": summary, "sources": dict(sources), "rows": len(rows), "changed": changed}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="NAME=MANIFEST",
                        help="text manifests to mix, in this order; NAME is the source of rows that name none")
    parser.add_argument("--out", required=True, type=Path, help="the mixed manifest (JSONL)")
    parser.add_argument("--heldout", action="append", type=Path, default=[], metavar="MANIFEST",
                        help="held-out manifest none of whose sentences may be in the mixture (repeatable)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = mix([parse_input(spec) for spec in args.inputs], args.out, args.heldout)
    except MixtureError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    parts = ", ".join(f"{name} {s['rows']} rows ({s['words']} words"
                      + (f", {s['skipped_heldout']} left out: a held-out sentence" if s["skipped_heldout"] else "") + ")"
                      for name, s in summary["inputs"].items())
    state = "written" if summary["changed"] else "up to date"
    print(f"{summary['out']}: {summary['rows']} rows, {state}: {parts}; "
          f"{len(args.heldout)} held-out manifest(s) checked")
    return 0
