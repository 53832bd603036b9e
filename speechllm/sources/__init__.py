"""Data sources beyond our JSONL manifests, named by one string wherever a manifest path is accepted.

    FORMAT:LOCATION[?option=value&option=value...]

A plain path (no ``format:`` prefix) is our JSONL manifest (:mod:`speechllm.manifest`). The formats
(``SOURCE_FORMATS``, one module each, imported on first use):

- ``hf:`` Hugging Face ``datasets``: a Hub id, a ``save_to_disk`` folder, a local dataset folder, or a
  packaged builder (``parquet``, ``json``, ...) with ``data_files=``; ``streaming=true`` for large sets;
  column names configurable (:mod:`speechllm.sources.huggingface`);
- ``lhotse:`` a Lhotse ``CutSet`` manifest (``cuts.jsonl.gz``), ``lhotse-shar:`` a Shar directory
  (:mod:`speechllm.sources.lhotse_cuts`);
- ``tasu:`` TASU's released JSONL, ``key, task, target, path`` a line (:mod:`speechllm.sources.tasu`);
- ``jsonl:`` our manifest, the same as a plain path.

Option values are URL-unquoted (``%26`` is a literal ``&``). ``parse_source`` turns the string into a
typed :class:`SourceSpec`; an unknown format or option, or a value of the wrong type, is a
:class:`SourceError` listing what is allowed, and ``source_problems`` reports it for every source key
of a stage config in the validation pass, before any model is built. A format needing an optional
package (the ``hf`` and ``lhotse`` extras) names the extra when the package is missing.

A map-style source gives the ``Utterance`` items the stages consume (``Source.items``); a streaming
source (``Source.streaming``) has no random access and gives each rank its shard epoch by epoch
(``Source.rows``), read through :class:`speechllm.sources.stream.StreamReader`.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from speechllm.registry import Registry, imported
from speechllm.sources.base import BadRow, Source, SourceError

_FORMAT = re.compile(r"^([A-Za-z][A-Za-z0-9_-]+):(.*)$", re.DOTALL)
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


@dataclass(frozen=True)
class Option:
    """One ``?option=value`` of a format: its type (str, bool or int >= 0), default and help."""

    kind: type
    default: Any
    help: str


@dataclass(frozen=True)
class SourceFormat:
    """One ``format:``: how it is opened and what the rest of the pipeline may ask of it."""

    open: Callable[[SourceSpec], Source]
    options: Mapping[str, Option] = field(default_factory=dict)
    requires: tuple[str, ...] = ()  # modules that must import (the optional extras)
    extra: str = ""  # the pyproject extra that installs them
    about: str = ""  # one line for listings and errors


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source string: the format, the location, every option with its value (defaults filled)."""

    format: str
    location: str
    options: Mapping[str, Any]
    text: str  # the string as written

    def __str__(self) -> str:
        return self.text


SOURCE_FORMATS: Registry[SourceFormat] = Registry("source format")
register_source_format = SOURCE_FORMATS.register  # makes ``name:LOCATION`` open that format


def is_source_string(text: str) -> bool:
    """True for ``format:...`` (any format name, known or not: a misspelled one must fail, not be read as
    a file); False for a plain manifest path."""
    return bool(_FORMAT.match(text))


def _value(fmt_name: str, name: str, option: Option, raw: str) -> Any:
    if option.kind is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise SourceError(f"{fmt_name}: option {name!r} must be true or false, got {raw!r}")
    if option.kind is int:
        if not raw.isdigit():
            raise SourceError(f"{fmt_name}: option {name!r} must be a whole number >= 0, got {raw!r}")
        return int(raw)
    if not raw:
        raise SourceError(f"{fmt_name}: option {name!r} is empty")
    return raw


def parse_source(text: str) -> SourceSpec:
    """The typed spec of a source string (a plain path is ``jsonl``); a SourceError names what is wrong."""
    match = _FORMAT.match(text)
    fmt_name, rest = (match.group(1), match.group(2)) if match else ("jsonl", text)
    if fmt_name not in SOURCE_FORMATS:
        raise SourceError(f"{text!r}: unknown source format {fmt_name!r} (have: {', '.join(SOURCE_FORMATS)}; "
                          "a plain path is our JSONL manifest)")
    fmt = SOURCE_FORMATS[fmt_name]
    location, _, query = rest.partition("?") if match else (rest, "", "")
    location = unquote(location)
    if not location:
        raise SourceError(f"{text!r}: {fmt_name}: no location before the options")
    given: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        name, eq, raw = part.partition("=")
        name = unquote(name)
        if name not in fmt.options:
            have = ", ".join(fmt.options) or "none"
            raise SourceError(f"{text!r}: {fmt_name}: unknown option {name!r} (have: {have})")
        if not eq:
            raise SourceError(f"{text!r}: {fmt_name}: option {name!r} needs a value ({name}=...)")
        if name in given:
            raise SourceError(f"{text!r}: {fmt_name}: option {name!r} is given twice")
        given[name] = unquote(raw)
    try:
        options = {name: _value(fmt_name, name, opt, given[name]) if name in given else opt.default
                   for name, opt in fmt.options.items()}
    except SourceError as err:
        raise SourceError(f"{text!r}: {err}") from None
    return SourceSpec(fmt_name, location, options, text)


def missing_requirement(fmt_name: str) -> str | None:
    """Why a format cannot be opened here (its optional package is not installed), or None."""
    fmt = SOURCE_FORMATS[fmt_name]
    missing = [m for m in fmt.requires if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"{fmt_name}: sources need the {' and '.join(f'`{m}`' for m in missing)} package "
            f"(the `{fmt.extra}` extra: pip install -e '.[{fmt.extra}]')")


def open_source(text: str | SourceSpec) -> Source:
    """The source a string names, ready to read (nothing is read yet)."""
    spec = text if isinstance(text, SourceSpec) else parse_source(str(text))
    why = missing_requirement(spec.format)
    if why:
        raise SourceError(f"{spec.text!r}: {why}")
    return SOURCE_FORMATS[spec.format].open(spec)


def source_keys(cfg: Any) -> dict[str, str]:
    """Every key of a stage config that names a source, with its string (empty ones left out)."""
    data, measures = cfg.data, cfg.measures
    keys = {"data.train": data.train or ""}
    keys.update({f"data.sources.{n}.manifest": s.manifest for n, s in data.sources.items()})
    for section, name in ((data, "val"), (data, "test"), (measures, "sets"), (measures, "multiple_choice")):
        prefix = "data" if section is data else "measures"
        keys.update({f"{prefix}.{name}.{n}": path for n, path in section[name].items()})
    selection = getattr(cfg, "selection", None)
    if selection is not None:
        keys["selection.pool"] = selection.pool
    return {key: str(value) for key, value in keys.items() if value}


def source_problems(cfg: Any) -> list[tuple[str, str]]:
    """``(key, problem)`` for every source string of a stage config that does not parse, or whose
    format's optional package is missing. Nothing is opened or read."""
    problems = []
    for key, text in source_keys(cfg).items():
        try:
            spec = parse_source(text)
        except SourceError as err:
            problems.append((key, str(err)))
            continue
        why = missing_requirement(spec.format)
        if why:
            problems.append((key, why))
    return problems


_STREAMING = Option(bool, False, "read the source as a stream (no random access): for sets too large to load")
_SHUFFLE = Option(int, 0, "streaming: shuffle with a buffer of this many rows, seeded by seed + epoch (0: stream order)")
_COLUMNS = {
    "audio": "the audio column (an Audio feature, bytes or a path)", "text": "the transcript / text column",
    "id": "the id column (default id; absent: the row index)", "speaker": "the speaker column",
    "duration": "the duration column (seconds)", "words": 'word times: a list of {"w", "start", "end"}',
    "target": "the training-target column (default: the text)", "task": "the task column",
}

register_source_format("jsonl", SourceFormat(
    imported("speechllm.sources.jsonl:JSONLSource"),
    about="our JSONL manifest (speechllm.manifest); a plain path means the same"))
register_source_format("hf", SourceFormat(
    imported("speechllm.sources.huggingface:HFSource"),
    options={
        "name": Option(str, None, "the dataset's config name"),
        "split": Option(str, "train", "the split (a save_to_disk Dataset has none; a DatasetDict needs one)"),
        "data_files": Option(str, None, "with a packaged builder (parquet, json, csv, ...): comma-separated files or globs"),
        "revision": Option(str, None, "a Hub revision (branch, tag or commit)"),
        "streaming": _STREAMING, "shuffle_buffer": _SHUFFLE,
        **{col: Option(str, None, help_) for col, help_ in _COLUMNS.items()},
    },
    requires=("datasets",), extra="hf",
    about="Hugging Face datasets: a Hub id, a save_to_disk folder, or a builder with data_files"))
register_source_format("lhotse", SourceFormat(
    imported("speechllm.sources.lhotse_cuts:LhotseCutsSource"),
    options={"streaming": _STREAMING, "shuffle_buffer": _SHUFFLE},
    requires=("lhotse",), extra="lhotse", about="a Lhotse CutSet manifest (cuts.jsonl.gz)"))
register_source_format("lhotse-shar", SourceFormat(
    imported("speechllm.sources.lhotse_cuts:LhotseSharSource"),
    options={"shuffle_buffer": _SHUFFLE},
    requires=("lhotse",), extra="lhotse", about="a Lhotse Shar directory (always streamed)"))
register_source_format("tasu", SourceFormat(
    imported("speechllm.sources.tasu:TASUSource"),
    about="TASU's released JSONL: key, task, target, path a line (a Kaldi ark path needs kaldiio)"))

__all__ = ["SOURCE_FORMATS", "BadRow", "Option", "Source", "SourceError", "SourceFormat", "SourceSpec",
           "imported", "is_source_string", "missing_requirement", "open_source",
           "parse_source", "register_source_format", "source_keys", "source_problems"]
