"""``python -m stages prepare broad-text``: broad-domain English text that installs offline, as documents.

The demo's other text comes from Debian's fortunes (``stages.prepare_demo_data``): jokes and quips.
This step builds a broader pool, in the same document form, from three offline sources (``--sources``):

    wordnet   Debian ``wordnet-base`` (WordNet 3.0, Princeton's WordNet licence): every synset's gloss
              as "Lemma: gloss." and its example sentences; topic = the lexicographer file
              (``noun.animal``, ``verb.motion``, ...), consecutive synsets of one file form a document.
    gcide     Debian ``dict-gcide`` (the Collaborative International Dictionary of English, GPL-2+,
              from Webster's 1913): each sense's definition as "Headword: definition.", its quotations
              and usage notes; topic = the sense's field label (``(Zool.)`` -> zoology, otherwise
              ``general``), consecutive senses of one topic form a document. Senses copied from WordNet
              (tagged ``[WordNet 1.5]``) are left out: the wordnet source has them.
    gensim    the test data of the PyPI wheel ``gensim`` (read as a zip, never imported): the Lee et al.
              (2005) news stories (``lee_background.cor``, ``lee.cor``: source ``gensim-news``, topic
              ``news``, one story a document or a few) and the English Wikipedia sample
              (``enwiki-latest-pages-articles1...-shortened.bz2``, CC-BY-SA: source ``gensim-wiki``,
              topic = the article's title, its paragraphs in documents of consecutive sentences).

The packages are looked for in ``--debs`` (default ``.cache/debs``) and fetched there when missing
(``apt-get download``; ``pip download --no-deps``); a .deb is read without dpkg
(``stages.prepare_real_speech.read_deb``).

Every sentence is cleaned the way the fortunes are (``prepare_demo_data``): plain prose of the same
characters (letters, digits, ``. , ; : ! ? ' " ( ) -``; digits kept as digits, which the TTS voices read),
``&`` ``%`` ``$`` spelled as words, dashes as commas, accents dropped, anything else (markup, slashes,
symbols) drops the sentence; quotes and brackets must balance, 4-30 words, a capital first letter and
a closing ``. ! ?``. A sentence is kept once in the whole pool (case and punctuation blind, first
source first), so no sentence can sit on both sides of a split. Dropped sentences are counted by reason.

Documents (``DOC_SENTENCES``: 5-15 sentences, a seeded target of 5-10 each; shorter when the story,
article paragraph run or topic ends) go to dev/test (``HELDOUT_FRACTION`` each) by a hash of their source
and split key: the story for news, the article for Wikipedia (all of an article's documents land on
one side), the document itself for the dictionaries. The rest, in a seeded hash order, fill the train
documents and then the pool (counted in sentences), so train and pool never share a document (unlike
``prepare_demo_data``, whose spoken training documents are drawn from its pool). Each scale's counts
(``SCALES``) are dealt out in equal shares over the sources, a source that has fewer giving its
shortfall to the others.

Writes under ``--out``::

    docs/{train,dev,test,pool}.jsonl        {"id", "text", "topic", "n_words", "source", "n_sentences"}
                                            (the fortunes' docs/pool.jsonl fields, plus source)
    sentences/{train,dev,test,pool}.jsonl   {"id", "text", "topic", "n_words", "source", "doc"}
                                            (the speech-sized units of those documents)
    mc/test.jsonl, mc/wav/<id>.wav          the spoken multiple-choice test (the fortunes' mc/test.jsonl
                                            fields: speech fields of the spoken context, "topic",
                                            "options", "answer"; plus "source", "doc")
    spoken/dev.jsonl, spoken/wav/dev/<id>.wav
                                            the broad held-out set of M and F: dev documents (their
                                            first sentences, up to SPOKEN_WORDS words) spoken chunk by
                                            chunk by the held-out voices, as the fortunes' docs/dev.jsonl
                                            (speech fields, "words" chunk spans, "doc", "topic",
                                            "n_words"; plus "source", "n_sentences")
    summary.json                            per source: documents, sentences, words, top topics,
                                            licence, package; drops by reason; the test; the fingerprint

and asserts that no dev/test sentence appears in train or pool (exact normalised text). A second run
on the same packages, scale, sources, seed, voices and code does nothing.

The multiple-choice test (``SCALES`` ``mc`` questions, ``--n-mc``; 0: none) is the fortunes' StoryCloze-like
test (``prepare_demo_data``) on encyclopedia, dictionary and news text: a sentence of a test document is
cut into a context of at least 5 words and a rest of at least 3 (``prepare_demo_data.split_for_continuation``:
after a clause end where one falls in range), the context is spoken by a held-out voice
(``--heldout-voices``, the demo's, never heard in training), and the true rest must be told from the rests
of ``MC_OPTIONS - 1`` sentences of *other* test documents (the same source first, then the same topic,
the same capitalisation, the closest length; seeded ties), shuffled, so neither style nor subject gives
the answer away. Questions are dealt equally over the
sources and drawn by a seeded hash; every context and option comes from the test split and is checked
against train and pool (``check_mc_heldout``). The audio is made by ``prepare_demo_data``'s synthesis
step (resumable clip by clip).
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import html
import json
import logging
import random
import re
import shutil
import subprocess
import sys
import time
import unicodedata
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from speechllm.io import atomic_write
from speechllm.synthesis import SynthesisItem, chunk_words
from stages.corpus_io import split_sentences, write_if_changed
from stages.prepare_demo_data import (
    _SPEAKABLE,
    CHUNK_WORDS,
    HELDOUT_VOICES,
    MC_CONTEXT_WORDS,
    MC_OPTIONS,
    MC_REST_WORDS,
    SpokenSet,
    _digest,
    _resolve_voices,
    _speak,
    split_for_continuation,
    text_key,
)
from stages.prepare_demo_data import (
    Entry as Sentence,  # a text with its topic: the fortunes' unit, here one sentence
)
from stages.prepare_real_speech import RealSpeechError, licence_of, read_deb

log = logging.getLogger(__name__)

SOURCES = ("wordnet", "gcide", "gensim")  # --sources: one package each
DEB_PACKAGES = {"wordnet": "wordnet-base", "gcide": "dict-gcide"}
KNOWN_VERSIONS = {"wordnet-base": "1:3.0-37", "dict-gcide": "0.48.5+nmu2"}  # Debian bookworm main
GENSIM_PIP = "gensim==4.4.0"
GENSIM_DATA = "gensim/test/test_data/"
GENSIM_NEWS = ("lee_background.cor", "lee.cor")
GENSIM_WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# corpora (the "source" of a document) of each --sources name, in the order they are read
CORPORA = {"wordnet": ("wordnet",), "gcide": ("gcide",), "gensim": ("gensim-news", "gensim-wiki")}
PIP = (sys.executable, "-m", "pip")  # how the wheel is fetched (a test replaces it)

SPLITS = ("train", "dev", "test", "pool")
HELDOUT = ("dev", "test")
SCALES = {  # documents per split; the pool in sentences; spoken multiple-choice questions; spoken dev documents
    "demo": {"train": 300, "dev": 40, "test": 40, "pool_sentences": 3000, "mc": 60, "spoken": 40},
    "full": {"train": 1500, "dev": 100, "test": 100, "pool_sentences": 30000, "mc": 200, "spoken": 100},
}
HELDOUT_FRACTION = 0.10  # of the split keys, for dev and for test
SENTENCE_WORDS = (4, 30)
DOC_SENTENCES = (5, 15)  # a document's sentences: at least (unless its story or topic ends), at most
DOC_TARGET = (5, 10)  # each document's seeded target
SPOKEN_WORDS = 80  # a spoken dev document's leading sentences, at most (the fortunes' documents: 40-80)
GCIDE_SENSES = 3  # the first senses of a GCIDE entry (its main meanings; the rest repeat the headword)
SETTINGS = {"format": 1, "heldout_fraction": HELDOUT_FRACTION, "sentence_words": SENTENCE_WORDS,
            "doc_sentences": DOC_SENTENCES, "doc_target": DOC_TARGET, "gcide_senses": GCIDE_SENSES}
DROP_REASONS = ("markup", "symbols", "unbalanced", "too_short", "too_long", "not_a_sentence", "duplicate")


class BroadTextError(RuntimeError):
    """A package this step needs and cannot have, or a broken invariant: the message says which."""


@dataclass(frozen=True)
class Document:
    """Related sentences of one source and topic; ``split_key`` is what the split hashes."""

    source: str
    split_key: str
    sentences: tuple[Sentence, ...]

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.sentences)

    @property
    def topic(self) -> str:
        return Counter(s.topic for s in self.sentences).most_common(1)[0][0]

    @property
    def n_words(self) -> int:
        return sum(s.n_words for s in self.sentences)

    @property
    def id(self) -> str:
        return "doc-" + hashlib.sha1(f"{self.source}\n{self.text}".encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------
# Sentences
# ---------------------------------------------------------------------------------------------------

MARK = "\x00"  # where markup was cut out of a sentence (the sentence is dropped)
_DASH_RANGE = re.compile(r"(?<=\d)\s*[\u2013\u2014]\s*(?=\d)")
_EN_DASH_WORD = re.compile(r"(?<=\w)\u2013(?=\w)")  # "K\u201312", "Sino\u2013Soviet": a hyphen
_DASH = re.compile(r"\s*(?:[\u2013\u2014\u2015]|(?<!-)--(?!-))\s*")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
                         "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"', "`": "'",
                         "\u00a0": " ", "\u2009": " ", "\u202f": " ", "\u2026": "...", "\u2010": "-",
                         "\u2011": "-", "\u2212": "-"})
_DOLLARS = re.compile(r"\$\s?(\d[\d,]*(?:\.\d+)?)(\s(?:thousand|million|billion|trillion)\b)?")
_END = re.compile(r"[.!?][\"')]*$")


def _ascii(text: str) -> str:
    """Accents dropped (cafe, Malatesta), typographic quotes and dashes as ASCII."""
    text = text.translate(_QUOTES)
    text = _DASH_RANGE.sub(" to ", text)
    text = _EN_DASH_WORD.sub("-", text)
    text = _DASH.sub(", ", text)
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def _balanced(text: str) -> bool:
    if text.count('"') % 2:
        return False
    depth = 0
    for c in text:
        depth += (c == "(") - (c == ")")
        if depth < 0:
            return False
    return depth == 0


def sentence_problem(text: str) -> tuple[str | None, str | None]:
    """``(cleaned sentence, None)``, or ``(None, reason)`` with a ``DROP_REASONS`` reason."""
    text = _ascii(text)
    text = _DOLLARS.sub(lambda m: f"{m[1]}{m[2] or ''} dollars", text)
    text = re.sub(r"\s*%", " percent", text)
    text = re.sub(r"\s*&\s*", " and ", text)
    text = re.sub(r"\s+([,;:.!?])", r"\1", " ".join(text.split()))
    text = re.sub(r",(?:\s*,)+", ",", text).replace(",...", "...").strip(" ,;:")
    text = re.sub(r"^[,;:]\s*", "", text)
    if not text:
        return None, "not_a_sentence"
    if MARK in text or re.search(r"\w\?\w", text) or "()" in text or "( " in text or "[" in text or "{" in text:
        return None, "markup"
    if not _SPEAKABLE.fullmatch(text):
        return None, "symbols"
    if not _balanced(text):
        return None, "unbalanced"
    n = len(text.split())
    if n < SENTENCE_WORDS[0]:
        return None, "too_short"
    if n > SENTENCE_WORDS[1]:
        return None, "too_long"
    first = next((c for c in text if c.isalnum()), "")
    words = re.findall(r"[A-Za-z]+", text)
    if not (first.isupper() or first.isdigit()) or not _END.search(text) or len(words) * 2 < n:
        return None, "not_a_sentence"
    return text, None


_TITLE_END = re.compile(
    r"(?:^|\s)(?:[A-Z]|Gen|Brig|Col|Lt|Capt|Cmdr|Adm|Maj|Sgt|Gov|Sen|Rep|Rev|Hon|Pres|Mt|Ft|Gen|Co|Corp|Inc|"
    r"Ltd|Bros|Jan|Feb|Mar|Apr|Aug|Sep|Sept|Oct|Nov|Dec|U\.S|U\.K|a\.m|p\.m|ca|c|approx|cf|viz|al)\.$")


def sentences_of(text: str) -> list[str]:
    """``corpus_io.split_sentences``, then pieces put back together: after an initial or a title
    ("John F.", "Brig. Gen."), and while a quotation is open (an odd number of double quotes), for up
    to three sentences."""
    out: list[str] = []
    open_quote = 0
    for part in split_sentences(text):
        if out and (_TITLE_END.search(out[-1]) or (out[-1].count('"') % 2 and open_quote < 3)):
            out[-1] = f"{out[-1]} {part}"
            open_quote = open_quote + 1 if out[-1].count('"') % 2 else 0
        else:
            out.append(part)
            open_quote = 0
    return out


def as_sentence(text: str) -> str:
    """A fragment (a WordNet example, a gloss) as a sentence: capital first letter, a closing period."""
    text = " ".join(text.split()).strip(" ;,")
    if text and text[0].islower():
        text = text[0].upper() + text[1:]
    if text and not _END.search(text):
        text = text.rstrip(".:") + "."
    return text


class SentenceFilter:
    """Cleans sentences and keeps each (normalised) text once across every source; counts the drops."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.dropped: dict[str, Counter] = {}

    def __call__(self, source: str, texts: Iterable[str], topic: str) -> list[Sentence]:
        out = []
        drops = self.dropped.setdefault(source, Counter())
        for raw in texts:
            text, reason = sentence_problem(raw)
            if text is not None:
                key = text_key(text)
                if key in self.seen:
                    reason = "duplicate"
                else:
                    self.seen.add(key)
                    out.append(Sentence(text, topic))
            if reason is not None:
                drops[reason] += 1
        return out


# ---------------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------------


def group_units(units: list[list[Sentence]], rng: random.Random) -> list[list[Sentence]]:
    """Consecutive units (a synset's or a sense's sentences, a paragraph) as documents of
    ``DOC_SENTENCES`` sentences: each closes at the first unit boundary past its seeded ``DOC_TARGET``;
    a unit never straddles two documents unless it alone is longer than the maximum. The short end is
    merged into the document before it (split in two halves when together they are too long), or is
    a document of its own when it is the only one."""
    lo, hi = DOC_SENTENCES
    docs: list[list[Sentence]] = []
    current: list[Sentence] = []
    target = rng.randint(*DOC_TARGET)
    for unit in units:
        while len(unit) > hi:  # a long paragraph: pieces of the maximum
            units_head, unit = unit[:hi], unit[hi:]
            if current:
                docs.append(current)
                current, target = [], rng.randint(*DOC_TARGET)
            docs.append(units_head)
        if current and len(current) + len(unit) > hi:
            docs.append(current)
            current, target = [], rng.randint(*DOC_TARGET)
        current = current + unit
        if len(current) >= target:
            docs.append(current)
            current, target = [], rng.randint(*DOC_TARGET)
    if current:
        if len(current) >= lo or not docs:
            docs.append(current)
        elif len(docs[-1]) + len(current) <= hi:
            docs[-1] = docs[-1] + current
        else:
            both = docs.pop() + current
            docs += [both[: len(both) // 2], both[len(both) // 2:]]
    return [d for d in docs if len(d) >= 2]


def make_documents(source: str, split_key: str | None, units: list[list[Sentence]], seed: int,
                   group: str) -> list[Document]:
    """Documents of ``units`` (one story, article or topic: ``group``); the split key is the given one
    (a story, an article) or, for None, each document's own id."""
    units = [u for u in units if u]
    chunks = group_units(units, random.Random(f"{seed}/{source}/{group}"))
    docs = [Document(source, split_key or "", tuple(c)) for c in chunks]
    return docs if split_key else [Document(source, d.id, d.sentences) for d in docs]


# ---------------------------------------------------------------------------------------------------
# WordNet
# ---------------------------------------------------------------------------------------------------

# WordNet 3.0's lexicographer files, by number (its lexnames file, which wordnet-base does not ship)
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
    "adj.ppl"
).split()
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
WORDNET_DIR = "usr/share/wordnet/"


def parse_wordnet_line(line: str) -> tuple[str, str, str, list[str]] | None:
    """``(lexicographer file, lemma, definition, examples)`` of a data.* line (None: the licence header)."""
    if line.startswith(" ") or "|" not in line:
        return None
    fields, _, gloss = line.partition(" | ")
    parts = fields.split()
    lexname = LEXNAMES[int(parts[1])]
    lemma = re.sub(r"\((?:a|p|ip)\)$", "", parts[4]).replace("_", " ")
    definition, examples = [], []
    for part in re.split(r';\s*(?=(?:[^"]*"[^"]*")*[^"]*$)', gloss.strip()):  # ';' outside quotes
        part = part.strip()
        if part.startswith('"'):
            quoted = re.match(r'"([^"]*)"', part)
            if quoted:
                examples.append(quoted[1])  # an attribution after the quote ("- Mark Twain") is dropped
        elif part:
            definition.append(part)
    return lexname, lemma, "; ".join(definition), examples


def wordnet_documents(files: dict[str, bytes], keep: SentenceFilter, seed: int,
                      progress: bool) -> list[Document]:
    by_lexname: dict[str, list[list[Sentence]]] = {}
    for name in WORDNET_FILES:
        data = files.get(WORDNET_DIR + name)
        if data is None:
            raise BroadTextError(f"wordnet-base: no {WORDNET_DIR}{name} in the package")
        lines = data.decode("utf-8", "replace").splitlines()
        for line in tqdm(lines, desc=f"wordnet {name}", unit="synset", disable=not progress, mininterval=1):
            parsed = parse_wordnet_line(line)
            if parsed is None:
                continue
            lexname, lemma, definition, examples = parsed
            texts = ([as_sentence(f"{lemma[0].upper() + lemma[1:]}: {definition}")] if definition else [])
            texts += [as_sentence(e) for e in examples]
            by_lexname.setdefault(lexname, []).append(keep("wordnet", texts, lexname))
    docs = []
    for lexname in sorted(by_lexname):
        docs += make_documents("wordnet", None, by_lexname[lexname], seed, lexname)
    return docs


# ---------------------------------------------------------------------------------------------------
# GCIDE (the dictd files of dict-gcide)
# ---------------------------------------------------------------------------------------------------

GCIDE_DIR = "usr/share/dictd/"
_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
# field labels -> topics (others: the label in lower case, without its dots)
GCIDE_FIELDS = {
    "Zool.": "zoology", "Bot.": "botany", "Chem.": "chemistry", "Med.": "medicine", "Anat.": "anatomy",
    "Naut.": "nautical", "Law": "law", "Mus.": "music", "Arch.": "architecture", "Math.": "mathematics",
    "Geom.": "geometry", "Her.": "heraldry", "Mil.": "military", "Min.": "mineralogy", "Geol.": "geology",
    "Physics": "physics", "Physiol.": "physiology", "Eccl.": "church", "Com.": "commerce",
    "Astron.": "astronomy", "Mech.": "mechanics", "Print.": "printing", "Gram.": "grammar",
    "Logic": "logic", "Rhet.": "rhetoric", "Zool. & Bot.": "zoology", "Elec.": "electricity",
    "Biol.": "biology", "Pathol.": "medicine", "Surg.": "medicine", "Paleon.": "paleontology",
    "Theol.": "theology", "Myth.": "mythology", "Pros.": "prosody", "Mar.": "nautical", "Anc. Hist.": "history",
    "Metaph.": "philosophy", "Philos.": "philosophy", "Cookery": "cookery", "Far.": "farriery",
    "Falconry": "falconry", "Mining": "mining", "Carp.": "carpentry", "Astrol.": "astrology",
    "R. C. Ch.": "church", "Eccl. Hist.": "church", "Music": "music", "Sport": "sport", "Fort.": "military",
}
_LABEL = re.compile(r"^\(((?:[A-Z][A-Za-z]*\.?)(?:\s*(?:&|[A-Z][A-Za-z]*\.?))*)\)\s*")
_ACCENT = re.compile(r"\[(?:[\"=^.`'~]([a-z]{1,2})|([a-z]{1,2})[\^`~]|(ae|oe|AE|OE)|(a)(?:um|dd))\]")
_TAG_LINE = re.compile(r"^\s*\[[^\]]*\]\s*(?:\S.*)?$")
_SOURCE_TAG = re.compile(r"\[(?:[^\]]*(?:Webster|WordNet|PJC|Century|Suppl|Dict)[^\]]*)\]")


_COMMON_START = re.compile(
    r"(?:A|An|The|To|Of|One|Any|Some|That|Which|In|On|At|By|For|From|Not|Having|Being|Pertaining|Relating|"
    r"Like|Without|With|Belonging|Made|Something|Someone|Capable|Full|Characterized|Consisting|Used|Same|"
    r"Resembling|Showing|Causing|Marked|Containing|Formed|Designating|Denoting|Abounding|Covered|Furnished|"
    r"Provided|Destitute|Free|Able|Serving|Tending|Situated|Done|Each|Either|Anything|Anyone|Having)\b")


def gcide_offsets(index: str) -> list[tuple[str, int, int]]:
    """``(headword, offset, length)`` of each entry of gcide.index, in file order, one per text span."""
    def number(s: str) -> int:
        n = 0
        for c in s:
            n = n * 64 + _B64[c]
        return n

    spans: dict[int, tuple[str, int]] = {}
    for line in index.splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or parts[0].startswith("00-"):
            continue
        start, length = number(parts[1]), number(parts[2])
        if length > spans.get(start, ("", 0))[1]:
            spans[start] = (parts[0], length)
    out, end = [], 0
    for start in sorted(spans):
        if start >= end:  # entries inside a longer one are read with it
            out.append((spans[start][0], start, spans[start][1]))
            end = start + spans[start][1]
    return out


def _gcide_text(text: str) -> str:
    """Markup out: accent codes (``k["o]ttr`` -> kottr), cross-reference braces, bracketed notes."""
    text = _ACCENT.sub(lambda m: next(g for g in m.groups() if g), text)
    text = text.replace("{", "").replace("}", "")
    return re.sub(r"\[[^\]]*\]", " ", text)


def _field(text: str, default: str) -> tuple[str, str]:
    """A leading field label ``(Zool.)`` -> (topic, rest); without one, (default, text)."""
    m = _LABEL.match(text)
    if not m:
        return default, text
    label = m[1]
    return GCIDE_FIELDS.get(label, label.lower().replace(".", "").replace(" ", "-")), text[m.end():]


def lowercase_words(text: str) -> set[str]:
    """Common words: those written in lower case inside sentences more often than capitalised. A
    definition starting with one is written after the headword's colon in lower case ("Tedium:
    irksomeness"), one starting with a name is not ("Tarheel: North Carolina")."""
    inside = Counter(re.findall(r"(?<=[a-z,;] )[A-Za-z][a-z]+\b", text))
    return {w for w, n in inside.items() if w.islower() and n > inside.get(w.capitalize(), 0)}


def parse_gcide_entry(entry: str, lower: set[str] = frozenset()) -> list[tuple[str, str, list[str]]]:
    """The senses of one entry: ``(topic, definition as a sentence or "", quotations and notes)``;
    ``lower``: capitalised words written in lower case after the colon (``lowercase_words``)."""
    lines = entry.splitlines()
    if not lines:
        return []
    headword = lines[0].split(" \\", 1)[0].strip()
    # the header: the first line and, while a bracket (the etymology) is open, the lines after it
    depth, n_header = 0, 0
    while n_header < len(lines):
        depth += lines[n_header].count("[") - lines[n_header].count("]")
        n_header += 1
        if depth <= 0:
            break
    header = " ".join(lines[:n_header])
    labels = re.findall(r"\(([A-Z][A-Za-z. &]*)\)", re.sub(r"\[[^\]]*\]", " ", header))
    entry_topic = next((GCIDE_FIELDS[lb] for lb in labels if lb in GCIDE_FIELDS), "general")
    blocks: list[list[str]] = [[]]
    for line in lines[n_header:]:
        if not line.strip():
            blocks.append([])
        else:
            blocks[-1].append(line)
    senses: list[tuple[str, str, list[str]]] = []
    for block in blocks:
        if not block:
            continue
        joined = " ".join(block)
        if "WordNet" in " ".join(_SOURCE_TAG.findall(joined)):
            continue  # copied from WordNet: the wordnet source has it
        block = [ln for ln in block if not _TAG_LINE.match(ln)]
        if not block:
            continue
        indent = min(len(ln) - len(ln.lstrip()) for ln in block)
        text = " ".join(ln.strip() for ln in block)
        if indent >= 8:  # a quotation under the sense before it, with its attribution
            quote = _gcide_text(re.sub(r"\s--(?!.*\s--).*$", "", " " + text))  # from the last " --"
            if senses:
                senses[-1][2].extend(sentences_of(quote.replace(". . .", "...")))
            continue
        if text.startswith("Syn:"):
            continue
        if text.startswith(("Note:", "Usage:")):
            note = _gcide_text(text.split(":", 1)[1])
            (senses[-1][2] if senses else []).extend(sentences_of(note))
            continue
        # definitions: "1. ...", "(a) ...", or the unnumbered definition of a one-sense entry
        for part in re.split(r"(?:^|\s)(?:\d+\.|\([a-z]\))\s+", text):
            part = part.strip()
            if not part:
                continue
            topic, part = _field(part, entry_topic)
            word = headword
            if compound := re.match(r"\{([^{}]+)\},?\s*", part):  # "{Giant's Causeway}, a vast ..."
                word, part = compound[1].replace("*", "").replace('"', "").replace("`", ""), part[compound.end():]
                topic, part = _field(part, topic)
            # the definition ends at its first full stop, "-- said of", "; as, <example>", "See {X}"
            part = re.split(r"\s--\s?|;?\s+as,\s|\s+See\s|(?<=[a-z])\.\s", part)[0]
            part = " ".join(_gcide_text(part).split()).strip(" ;,.")
            first = re.match(r"[A-Z][a-z]*\b", part)
            if first and (first[0].lower() in lower or _COMMON_START.match(part)):  # "A native" -> "a native"
                part = part[0].lower() + part[1:]
            if part.lower().startswith(word.lower() + " "):  # "Helium has a density ..." needs no "Helium:"
                sentence = as_sentence(part)
            else:
                sentence = as_sentence(f"{word}: {part}") if part else ""
            senses.append((topic, sentence, []))
    return senses[:GCIDE_SENSES]


def gcide_documents(files: dict[str, bytes], keep: SentenceFilter, seed: int,
                    progress: bool) -> list[Document]:
    try:
        index = files[GCIDE_DIR + "gcide.index"].decode("utf-8", "replace")
        data = gzip.decompress(files[GCIDE_DIR + "gcide.dict.dz"])
    except KeyError as err:
        raise BroadTextError(f"dict-gcide: no {err.args[0]} in the package") from None
    by_topic: dict[str, list[list[Sentence]]] = {}
    lower = lowercase_words(data.decode("utf-8", "replace"))
    for _, start, length in tqdm(gcide_offsets(index), desc="gcide entries", unit="entry",
                                 disable=not progress, mininterval=1):
        entry = data[start:start + length].decode("utf-8", "replace")
        for topic, definition, extra in parse_gcide_entry(entry, lower):
            texts = ([definition] if definition else []) + extra
            by_topic.setdefault(topic, []).append(keep("gcide", texts, topic))
    docs = []
    for topic in sorted(by_topic):
        docs += make_documents("gcide", None, by_topic[topic], seed, topic)
    return docs


# ---------------------------------------------------------------------------------------------------
# gensim's test data: news stories and a Wikipedia sample
# ---------------------------------------------------------------------------------------------------


def news_documents(stories: list[tuple[str, str]], keep: SentenceFilter, seed: int) -> list[Document]:
    """``(story id, text)`` -> documents; a story is a split key (its parts stay on one side)."""
    docs = []
    for story_id, text in stories:
        sentences = keep("gensim-news", sentences_of(text), "news")
        docs += make_documents("gensim-news", story_id, [[s] for s in sentences], seed, story_id)
    return docs


_WIKI_SKIP_SECTIONS = {"references", "see also", "external links", "further reading", "notes",
                       "bibliography", "sources", "footnotes", "citations", "works cited", "works",
                       "filmography", "discography", "gallery", "publications", "notes and references"}


def _strip_nested(text: str, open_: str, close: str) -> str:
    """``text`` without the (nested) spans from ``open_`` to ``close``."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


# templates whose removal leaves the sentence whole (citations, maintenance tags, page furniture)
_WIKI_HARMLESS = re.compile(
    r"\s*(?:cite|citation|sfn|harv|efn|refn|r|rp|ref|webarchive|dead link|clarify|citation needed|cn|fact|when|"
    r"who|which|by whom|dubious|vague|page needed|verification needed|according to whom|specify|"
    r"use |pp|main|see also|further|about|redirect|other uses|distinguish|infobox|hatnote|portal|commons|"
    r"authority control|reflist|coord|taxobox|good article|featured article|anchor|toc|clear|defaultsort|"
    r"sister|wiktionary|multiple image|wide image|navbox|bots|italic title|lowercase|engvar|good|featured|"
    r"spoken|wikiquote|wikisource|cleanup|refimprove|more citations|original research|update|expand|"
    r"sfnp|harvnb|harvtxt|nbsp)\b", re.I)


_TEMPLATE = re.compile(r"\{\{([^{}]*)\}\}")  # an innermost template


def _strip_templates(text: str) -> str:
    """``{{...}}`` (nested) cut out: without a trace for citations, maintenance tags and templates
    that start a line (infoboxes, hatnotes); as ``MARK`` inside running text (a number converted by
    ``{{convert}}``, a foreign word in ``{{lang}}``), so that sentence is dropped."""
    def replace(m: re.Match) -> str:
        at_line_start = m.start() == 0 or m.string[m.start() - 1] == "\n"
        return "" if at_line_start or _WIKI_HARMLESS.match(m[1]) else MARK

    while (new := _TEMPLATE.sub(replace, text)) != text:
        text = new
    return text


def _wiki_link(m: re.Match) -> str:
    target, _, label = m[1].partition("|")
    if ":" in target:  # File:, Image:, Category:, interlanguage links
        return ""
    return label or target


def wiki_paragraphs(wikitext: str) -> list[str]:
    """The prose paragraphs of an article's wikitext (sections such as References left out)."""
    text = html.unescape(wikitext)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.S | re.I)
    text = re.sub(r"<(math|gallery|timeline|syntaxhighlight|source|pre|code|score)[^>]*>.*?</\1>", "", text,
                  flags=re.S | re.I)
    text = _strip_nested(_strip_templates(text), "{|", "|}")
    for _ in range(3):  # links inside file captions
        text = re.sub(r"\[\[([^\[\]]*)\]\]", _wiki_link, text)
    text = re.sub(r"\[(?:https?:)?//\S+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.I)
    text = re.sub(r"<[^>]+>", MARK, text)  # any other HTML-like tag: the sentence around it is dropped
    text = re.sub(r"'{2,}", "", text)
    paragraphs, current, skipping = [], [], False
    for line in text.splitlines():
        stripped = line.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", stripped)
        if heading or not stripped or stripped[0] in "*#:;|!{}[":
            if current:
                paragraphs.append(" ".join(current))
                current = []
            if heading:
                skipping = heading[2].lower() in _WIKI_SKIP_SECTIONS
            continue
        if not skipping:
            current.append(stripped)
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def wiki_articles(xml_bytes: bytes) -> Iterator[tuple[str, str]]:
    """``(title, wikitext)`` of the main-namespace articles of a MediaWiki dump (no redirects, lists or
    disambiguation pages)."""
    root = ET.fromstring(xml_bytes)
    for page in root.iter():
        if not page.tag.endswith("}page"):
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in page}
        title = (fields["title"].text or "").strip()
        if "redirect" in fields or (fields["ns"].text or "0") != "0":
            continue
        if title.startswith("List of") or "(disambiguation)" in title:
            continue
        revision = {c.tag.rsplit("}", 1)[-1]: c for c in fields["revision"]}
        text = revision["text"].text or ""
        if text.lstrip().lower().startswith("#redirect"):
            continue
        yield title, text


def wiki_documents(articles: Iterable[tuple[str, str]], keep: SentenceFilter, seed: int,
                   progress: bool) -> list[Document]:
    docs = []
    for title, text in tqdm(list(articles), desc="wikipedia articles", unit="article", disable=not progress):
        units = [keep("gensim-wiki", sentences_of(p), title) for p in wiki_paragraphs(text)]
        docs += make_documents("gensim-wiki", title, units, seed, title)
    return docs


def gensim_documents(wheel: Path, keep: SentenceFilter, seed: int, progress: bool) -> dict[str, list[Document]]:
    try:
        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
            missing = [n for n in (*GENSIM_NEWS, GENSIM_WIKI) if GENSIM_DATA + n not in names]
            if missing:
                raise BroadTextError(f"{wheel}: no {', '.join(GENSIM_DATA + n for n in missing)} in the wheel")
            news = [z.read(GENSIM_DATA + n).decode("latin-1") for n in GENSIM_NEWS]
            wiki = bz2.decompress(z.read(GENSIM_DATA + GENSIM_WIKI))
    except zipfile.BadZipFile:
        raise BroadTextError(f"{wheel}: not a wheel (zip archive)") from None
    stories = [(f"{name}:{i}", line) for name, text in zip(GENSIM_NEWS, news)
               for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
    return {"gensim-news": news_documents(stories, keep, seed),
            "gensim-wiki": wiki_documents(wiki_articles(wiki), keep, seed, progress)}


# ---------------------------------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------------------------------


def _fetch_hint(cache: Path, sources: Iterable[str]) -> str:
    hints = []
    for source in sources:
        if source in DEB_PACKAGES:
            package = DEB_PACKAGES[source]
            hints.append(f"the Debian package {package} ({KNOWN_VERSIONS[package]} in Debian bookworm main, "
                         f"architecture all): `cd {cache} && apt-get download {package}` after `apt-get update`")
        else:
            hints.append(f"the PyPI wheel {GENSIM_PIP}: `pip download --no-deps --only-binary=:all: "
                         f"-d {cache} {GENSIM_PIP}`")
    return "fetch " + "; ".join(hints) + f" (or copy the files into {cache}, or point --debs at them)"


def find_package(cache: Path, source: str) -> Path | None:
    """The file of ``source``'s package in ``cache`` (an error when there are several versions)."""
    pattern = f"{DEB_PACKAGES[source]}_*.deb" if source in DEB_PACKAGES else "gensim-*.whl"
    paths = sorted(cache.glob(pattern)) if cache.is_dir() else []
    if len(paths) > 1:
        raise BroadTextError(f"{cache}: several files for {source}: {', '.join(p.name for p in paths)}; keep one")
    return paths[0] if paths else None


def _download(command: list[str], cache: Path) -> str | None:
    """Run a download command in ``cache``; what went wrong, or None."""
    try:
        done = subprocess.run(command, cwd=cache, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    if done.returncode != 0:
        said = " ".join((done.stderr or done.stdout or "").strip().splitlines()[-3:])
        return f"exit {done.returncode}" + (f": {said}" if said else "")
    return None


def fetch_packages(cache: Path, sources: Iterable[str]) -> dict[str, Path]:
    """Each source's package file in ``cache``, downloaded when missing (apt-get download, pip download)."""
    sources = list(sources)
    found = {s: p for s in sources if (p := find_package(cache, s)) is not None}
    missing = [s for s in sources if s not in found]
    if not missing:
        return found
    cache.mkdir(parents=True, exist_ok=True)
    failures = []
    debs = [DEB_PACKAGES[s] for s in missing if s in DEB_PACKAGES]
    if debs:
        apt_get = shutil.which("apt-get")
        log.info("fetching %s into %s with apt-get download", " ".join(debs), cache)
        why = "apt-get is not available" if apt_get is None else _download([apt_get, "download", *debs], cache)
        if why:
            failures.append(f"`apt-get download {' '.join(debs)}` failed ({why})")
    if "gensim" in missing:
        log.info("fetching %s into %s with pip download", GENSIM_PIP, cache)
        why = _download([*PIP, "download", "--no-deps", "--only-binary=:all:", "-d", str(cache.resolve()),
                         GENSIM_PIP], cache)
        if why:
            failures.append(f"`pip download {GENSIM_PIP}` failed ({why})")
    for source in missing:
        if (path := find_package(cache, source)) is not None:
            found[source] = path
    still = [s for s in sources if s not in found]
    if still:
        names = ", ".join(DEB_PACKAGES.get(s, GENSIM_PIP) for s in still)
        raise BroadTextError(f"{names} not found in {cache} and could not be fetched"
                             + (f" ({'; '.join(failures)})" if failures else "") + ": " + _fetch_hint(cache, still))
    return found


def _deb(path: Path, package: str, wanted) -> tuple[dict[str, bytes], dict]:
    try:
        deb = read_deb(path, lambda n: wanted(n) or n.endswith(f"doc/{package}/copyright"))
    except RealSpeechError as err:
        raise BroadTextError(str(err)) from None
    if deb.package != package:
        raise BroadTextError(f"{path}: holds package {deb.package!r}, expected {package!r}")
    copyright_text = next((b.decode("utf-8", "replace") for n, b in deb.files.items()
                           if n.endswith(f"doc/{package}/copyright")), "")
    info = {"package": package, "version": deb.version, "file": path.name, "sha256": deb.sha256,
            **licence_from(copyright_text)}
    return deb.files, info


def licence_from(copyright_text: str) -> dict[str, str]:
    """The licence a debian/copyright states: its ``Files: *`` paragraph, or (a free-form file) the GPL
    version it names."""
    found = licence_of(copyright_text)
    if not found["license"].startswith("unknown"):
        return found
    gpl = re.search(r"GNU General Public License as published\s+by\s+the\s+Free\s+Software\s+Foundation;\s+"
                    r"either\s+version\s+(\d)(,?\s+or\s+\(at\s+your\s+option\)\s+any\s+later)?", copyright_text)
    if gpl:
        return {"license": f"GPL-{gpl[1]}" + ("+" if gpl[2] else ""), "copyright": "see debian/copyright"}
    return {"license": "unknown (see the package's debian/copyright)", "copyright": ""}


def _wheel_info(path: Path) -> dict:
    with zipfile.ZipFile(path) as z:
        meta_name = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
        meta = z.read(meta_name).decode("utf-8", "replace") if meta_name else ""
    fields = dict(line.split(": ", 1) for line in meta.split("\n\n", 1)[0].splitlines() if ": " in line)
    return {"package": fields.get("Name", "gensim"), "version": fields.get("Version", ""), "file": path.name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "license": fields.get("License-Expression") or fields.get("License", "unknown")}


LICENCES = {  # of the text itself, beside the package's licence
    "wordnet": "WordNet 3.0 licence (Princeton University; free use, copy and distribution with the notice)",
    "gcide": "GPL-2+ (GCIDE, from Webster's Revised Unabridged Dictionary 1913, public domain, and WordNet)",
    "gensim-news": "shipped in gensim's test data (LGPL-2.1-only); Lee, Pincombe & Welsh (2005) corpus of "
                   "Australian Broadcasting Corporation news stories, no separate licence stated",
    "gensim-wiki": "CC-BY-SA-3.0 and GFDL (English Wikipedia articles, 2016), shipped in gensim's test data",
}


# ---------------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------------


def _unit(*parts: str) -> float:
    return int.from_bytes(hashlib.sha256("\n".join(parts).encode()).digest()[:8], "big") / 2**64


def heldout_split(doc: Document, seed: int) -> str | None:
    """dev, test or None (the training side), from a hash of the source and the split key."""
    u = _unit(str(seed), "split", doc.source, doc.split_key)
    return "test" if u < HELDOUT_FRACTION else "dev" if u < 2 * HELDOUT_FRACTION else None


def shares(total: int, available: dict[str, int]) -> dict[str, int]:
    """``total`` dealt out equally over the sources (in their order); a source with fewer than its share
    gives all it has and the rest is dealt out again among the others."""
    out = {s: 0 for s in available}
    left, open_ = total, [s for s in available if available[s] > 0]
    while left > 0 and open_:
        each, extra = divmod(left, len(open_))
        for i, s in enumerate(open_):
            out[s] += min(each + (i < extra), available[s] - out[s])
        left = total - sum(out.values())
        open_ = [s for s in open_ if out[s] < available[s]]
    return out


def assign_splits(documents: dict[str, list[Document]], counts: dict, seed: int) -> dict[str, list[Document]]:
    """train/dev/test documents and the pool, each source's share in a seeded hash order."""
    held: dict[str, dict[str, list[Document]]] = {s: {h: [] for h in HELDOUT} for s in documents}
    rest: dict[str, list[Document]] = {s: [] for s in documents}
    for source, docs in documents.items():
        for doc in docs:
            split = heldout_split(doc, seed)
            (held[source][split] if split else rest[source]).append(doc)
    order = lambda d: _unit(str(seed), "order", d.source, d.id)  # noqa: E731
    out: dict[str, list[Document]] = {split: [] for split in SPLITS}
    for split in HELDOUT:
        n = shares(counts[split], {s: len(held[s][split]) for s in documents})
        for source in documents:
            out[split] += sorted(held[source][split], key=order)[: n[source]]
    n_train = shares(counts["train"], {s: len(rest[s]) for s in documents})
    pool_left = {}
    for source in documents:
        ranked = sorted(rest[source], key=order)
        out["train"] += ranked[: n_train[source]]
        pool_left[source] = ranked[n_train[source]:]
    n_pool = shares(counts["pool_sentences"], {s: sum(len(d.sentences) for d in pool_left[s]) for s in documents})
    for source in documents:
        taken = 0
        for doc in pool_left[source]:
            if taken >= n_pool[source]:
                break
            out["pool"].append(doc)
            taken += len(doc.sentences)
    return out


def check_no_leak(splits: dict[str, list[Document]]) -> None:
    """Raise when a dev/test sentence's normalised text is also in train or the pool (a bug)."""
    training = {s.key for split in ("train", "pool") for d in splits[split] for s in d.sentences}
    leaked = [s.text for split in HELDOUT for d in splits[split] for s in d.sentences if s.key in training]
    if leaked:
        raise BroadTextError(f"{len(leaked)} dev/test sentence(s) also in train or pool, e.g. {leaked[0]!r}")


@dataclass(frozen=True)
class Question:
    """One multiple-choice item: ``context`` + " " + ``options[answer]`` is the test sentence ``key``
    of document ``doc``; ``option_docs`` / ``option_keys`` say where each option was cut from."""

    context: str
    options: tuple[str, ...]
    answer: int
    doc: str
    source: str
    topic: str
    key: str
    option_docs: tuple[str, ...]
    option_keys: tuple[str, ...]


def mc_questions(test_docs: list[Document], n: int, seed: int) -> list[Question]:
    """``n`` questions from the sentences of ``test_docs`` (see the module docstring), dealt equally over
    the sources (``shares``), each source's in a seeded hash order; deterministic whatever the order of
    ``test_docs``. Fewer (with a warning) when fewer sentences are long enough."""
    cands: list[tuple[Document, Sentence, str, str]] = []  # (document, sentence, context, rest)
    for doc in sorted(test_docs, key=lambda d: d.id):
        for sent in doc.sentences:
            if sent.n_words >= MC_CONTEXT_WORDS + MC_REST_WORDS:
                context, rest = split_for_continuation(sent, random.Random(f"{seed}/broad-mc-cut/{sent.key}"))
                cands.append((doc, sent, context, rest))
    by_source: dict[str, list] = {}
    for c in cands:
        by_source.setdefault(c[0].source, []).append(c)
    n_by_source = shares(n, {src: len(cs) for src, cs in by_source.items()})
    if sum(n_by_source.values()) < n:
        log.warning("mc: asked for %d questions but only %d test sentences qualify", n, len(cands))
    picked = []
    for src, cs in by_source.items():
        picked += sorted(cs, key=lambda c: _unit(str(seed), "mc", c[1].key))[: n_by_source[src]]
    picked.sort(key=lambda c: _unit(str(seed), "mc-order", c[1].key))
    questions = []
    for doc, sent, context, rest in picked:
        rng = random.Random(f"{seed}/broad-mc-options/{sent.key}")
        others = [c for c in cands if c[0].id != doc.id]
        rng.shuffle(others)
        others.sort(key=lambda c: (c[0].source != doc.source, c[1].topic != sent.topic,
                                   c[3][0].isupper() != rest[0].isupper(), abs(len(c[3].split()) - len(rest.split()))))
        options = [(rest, doc.id, sent.key)]
        keys = {text_key(rest)}
        for other_doc, other, _, other_rest in others:
            if len(options) == MC_OPTIONS:
                break
            if text_key(other_rest) not in keys:
                options.append((other_rest, other_doc.id, other.key))
                keys.add(text_key(other_rest))
        if len(options) < MC_OPTIONS:
            raise BroadTextError(f"mc: needs {MC_OPTIONS} different rests from other test documents, "
                                 f"found {len(options)} for {sent.text!r}")
        rng.shuffle(options)
        texts, option_docs, option_keys = zip(*options)
        questions.append(Question(context, texts, texts.index(rest), doc.id, doc.source, sent.topic, sent.key,
                                  option_docs, option_keys))
    return questions


def check_mc_heldout(questions: list[Question], splits: dict[str, list[Document]]) -> None:
    """Raise unless every question's sentence and every option's sentence is a test-split sentence of
    a test document, of a document other than the question's for the wrong options, and never in
    train or the pool (normalised text)."""
    test = {d.id: {s.key for s in d.sentences} for d in splits["test"]}
    training_docs = {d.id for split in ("train", "pool") for d in splits[split]}
    training = {s.key for split in ("train", "pool") for d in splits[split] for s in d.sentences}
    for q in questions:
        for i, (doc, key) in enumerate(zip(q.option_docs, q.option_keys)):
            where = "its context" if i == q.answer else f"option {i}"
            if doc in training_docs or key in training:
                raise BroadTextError(f"mc: {where} of {q.context!r} comes from a train/pool document ({doc})")
            if key not in test.get(doc, ()):
                raise BroadTextError(f"mc: {where} of {q.context!r} is not a sentence of a test document ({doc})")
            if (i == q.answer) != (doc == q.doc):
                raise BroadTextError(f"mc: {where} of {q.context!r} is from the wrong document ({doc})")


def plan_mc(questions: list[Question], voices: list[str]) -> SpokenSet:
    """The spoken contexts (the voices dealt out in turn) and the fortunes' manifest fields."""
    items, extra = [], {}
    for i, q in enumerate(questions):
        speaker = voices[i % len(voices)]
        rest = q.options[q.answer]
        item_id = f"mc-{_digest(speaker, q.context, rest)}"
        items.append(SynthesisItem(item_id, q.context, speaker))
        extra[item_id] = {"topic": q.topic, "options": list(q.options), "answer": q.answer, "source": q.source,
                          "doc": q.doc}
    return SpokenSet("mc", "test", items, extra)


def spoken_text(doc: Document, max_words: int = SPOKEN_WORDS) -> tuple[str, int]:
    """The document's leading sentences up to ``max_words`` words (at least its first), and how many."""
    kept, words = [], 0
    for sent in doc.sentences:
        if kept and words + sent.n_words > max_words:
            break
        kept.append(sent.text)
        words += sent.n_words
    return " ".join(kept), len(kept)


def plan_spoken_docs(dev_docs: list[Document], n: int, voices: list[str], seed: int) -> SpokenSet:
    """``n`` dev documents, dealt equally over the sources (each source's in a seeded hash order), each
    spoken chunk by chunk as the fortunes' held-out documents are (``prepare_demo_data``: exact chunk
    spans in ``words``), its leading sentences up to ``SPOKEN_WORDS`` words, the voices dealt out in turn:
    the broad held-out set of misalignment M and forgetting F."""
    by_source: dict[str, list[Document]] = {}
    for doc in sorted(dev_docs, key=lambda d: _unit(str(seed), "spoken", d.id)):
        by_source.setdefault(doc.source, []).append(doc)
    counts = shares(n, {src: len(docs) for src, docs in by_source.items()})
    picked = sorted((d for src, docs in by_source.items() for d in docs[: counts[src]]),
                    key=lambda d: _unit(str(seed), "spoken-order", d.id))
    items, extra = [], {}
    for i, doc in enumerate(picked):
        speaker = voices[i % len(voices)]
        text, n_sentences = spoken_text(doc)
        chunks = chunk_words(text, CHUNK_WORDS, random.Random(f"{seed}/broad-chunks/{doc.id}"))
        item_id = f"broad-dev-{_digest(speaker, *chunks)}"
        items.append(SynthesisItem(item_id, text, speaker, chunks, audio=f"wav/dev/{item_id}.wav"))
        extra[item_id] = {"doc": doc.id, "topic": doc.topic, "n_words": len(text.split()), "source": doc.source,
                          "n_sentences": n_sentences}
    return SpokenSet("spoken", "dev", items, extra)


def doc_rows(docs: list[Document]) -> list[dict]:
    return [{"id": d.id, "text": d.text, "topic": d.topic, "n_words": d.n_words, "source": d.source,
             "n_sentences": len(d.sentences)} for d in docs]


def sentence_rows(docs: list[Document]) -> list[dict]:
    return [{"id": f"{d.id}-s{k}", "text": s.text, "topic": s.topic, "n_words": s.n_words, "source": d.source,
             "doc": d.id} for d in docs for k, s in enumerate(d.sentences)]


def _stats(docs: list[Document]) -> dict:
    lengths = sorted(s.n_words for d in docs for s in d.sentences)

    def pct(q: float) -> int:
        return lengths[min(len(lengths) - 1, int(q * len(lengths)))] if lengths else 0

    return {"documents": len(docs), "sentences": len(lengths), "words": sum(lengths),
            "topics": len({d.topic for d in docs}),
            "top_topics": dict(Counter(d.topic for d in docs).most_common(10)),
            "sentence_words": {"mean": round(sum(lengths) / len(lengths), 2) if lengths else 0,
                               "p10": pct(0.1), "p50": pct(0.5), "p90": pct(0.9)}}


def fingerprint(packages: dict[str, Path], scale: str, seed: int, mc: dict | None = None,
                spoken: dict | None = None) -> dict:
    inputs = {"packages": {s: hashlib.sha256(p.read_bytes()).hexdigest() for s, p in sorted(packages.items())},
              "scale": scale, "counts": SCALES[scale], "seed": seed, "settings": SETTINGS, "mc": mc,
              "spoken": spoken,
              "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]}
    return json.loads(json.dumps(inputs))  # as summary.json holds it (tuples as lists)


def _up_to_date(out: Path, inputs: dict) -> dict | None:
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = [out / group / f"{split}.jsonl" for group in ("docs", "sentences") for split in SPLITS]
    for key, manifest in (("mc", out / "mc" / "test.jsonl"), ("spoken", out / "spoken" / "dev.jsonl")):
        if inputs.get(key):
            if not manifest.is_file():
                return None
            files += [manifest.parent / json.loads(line)["audio"]
                      for line in manifest.read_text(encoding="utf-8").splitlines()]
    return summary if summary.get("inputs") == inputs and all(f.is_file() for f in files) else None


def read_sources(packages: dict[str, Path], seed: int, progress: bool) -> tuple[dict, dict, SentenceFilter]:
    """Every source's documents, the packages' details, and the filter (its drop counts)."""
    keep = SentenceFilter()
    documents: dict[str, list[Document]] = {}
    info: dict[str, dict] = {}
    for source in SOURCES:  # a fixed order: which copy of a repeated sentence is kept
        if source not in packages:
            continue
        if source == "wordnet":
            files, info["wordnet"] = _deb(packages[source], "wordnet-base", lambda n: n.startswith(WORDNET_DIR))
            documents["wordnet"] = wordnet_documents(files, keep, seed, progress)
        elif source == "gcide":
            files, info["gcide"] = _deb(packages[source], "dict-gcide", lambda n: n.startswith(GCIDE_DIR + "gcide."))
            documents["gcide"] = gcide_documents(files, keep, seed, progress)
        else:
            info["gensim-news"] = info["gensim-wiki"] = _wheel_info(packages[source])
            documents.update(gensim_documents(packages[source], keep, seed, progress))
    return documents, info, keep


def prepare_broad_text(out: str | Path, debs: str | Path = ".cache/debs", scale: str = "demo",
                       sources: Iterable[str] = SOURCES, seed: int = 0, progress: bool = True, *,
                       n_mc: int | None = None, n_spoken: int | None = None,
                       heldout_voices: Iterable[str] = HELDOUT_VOICES, workers: int = 2) -> dict:
    """Build the manifests under ``out`` (see the module docstring) and return the summary; a finished
    run on the same inputs is left as it is (the summary says ``"unchanged": true``). ``n_mc`` and
    ``n_spoken`` override the scale's multiple-choice questions and spoken dev documents, spoken by
    ``heldout_voices`` in ``workers`` processes."""
    start = time.perf_counter()
    out, debs = Path(out), Path(debs)
    if scale not in SCALES:
        raise BroadTextError(f"unknown scale {scale!r}: one of {', '.join(SCALES)}")
    sources = [s.strip() for s in sources if s.strip()]
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise BroadTextError(f"unknown source(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(SOURCES)}")
    packages = fetch_packages(debs, [s for s in SOURCES if s in sources])
    n_mc = SCALES[scale].get("mc", 0) if n_mc is None else n_mc
    n_spoken = SCALES[scale].get("spoken", 0) if n_spoken is None else n_spoken
    mc_settings = spoken_settings = None
    if n_mc or n_spoken:
        try:
            voices = _resolve_voices(heldout_voices, "held-out")
        except RuntimeError as err:
            raise BroadTextError(f"{err} (--n-mc 0 --n-spoken 0 synthesise nothing)") from None
        mc_settings = {"questions": n_mc, "voices": voices} if n_mc else None
        spoken_settings = ({"documents": n_spoken, "voices": voices, "max_words": SPOKEN_WORDS,
                            "chunk_words": CHUNK_WORDS} if n_spoken else None)
    inputs = fingerprint(packages, scale, seed, mc_settings, spoken_settings)
    if (summary := _up_to_date(out, inputs)) is not None:
        return {**summary, "unchanged": True}

    documents, info, keep = read_sources(packages, seed, progress)
    empty = [s for s, docs in documents.items() if not docs]
    if empty:
        raise BroadTextError(f"no documents from {', '.join(empty)}: is the package the right one?")
    splits = assign_splits(documents, SCALES[scale], seed)
    check_no_leak(splits)
    for split in SPLITS:
        if not splits[split]:
            raise BroadTextError(f"no document fell into the {split} split")
        write_if_changed(out / "docs" / f"{split}.jsonl", doc_rows(splits[split]))
        write_if_changed(out / "sentences" / f"{split}.jsonl", sentence_rows(splits[split]))
    mc_summary = None
    if mc_settings:
        questions = mc_questions(splits["test"], n_mc, seed)
        check_mc_heldout(questions, splits)
        spoken = _speak(out, plan_mc(questions, mc_settings["voices"]), workers, progress, None)
        log.info("mc: %d questions, %d clips synthesised in %.0f s", len(questions), spoken["synthesized"],
                 spoken["synthesis_seconds"])
        mc_summary = {"questions": len(questions), "options": MC_OPTIONS, "hours": round(spoken["hours"], 4),
                      "voices": spoken["voices"], "sources": dict(Counter(q.source for q in questions))}
    spoken_summary = None
    if spoken_settings:
        plan = plan_spoken_docs(splits["dev"], n_spoken, spoken_settings["voices"], seed)
        spoken = _speak(out, plan, workers, progress, None)
        log.info("spoken dev: %d documents, %d synthesised in %.0f s", len(plan.items), spoken["synthesized"],
                 spoken["synthesis_seconds"])
        spoken_summary = {"documents": len(plan.items), "hours": round(spoken["hours"], 4), "voices": spoken["voices"],
                          "sources": dict(Counter(plan.extra[it.id]["source"] for it in plan.items)),
                          "words": sum(plan.extra[it.id]["n_words"] for it in plan.items)}

    per_source = {}
    for source, docs in documents.items():
        per_source[source] = {
            "available": _stats(docs),
            "written": {split: _stats([d for d in splits[split] if d.source == source]) for split in SPLITS},
            "dropped_sentences": dict(sorted(keep.dropped.get(source, Counter()).items())),
            "license": LICENCES[source],
            "package": info[source],
        }
    summary = {
        "inputs": inputs,
        "scale": scale,
        "sources": per_source,
        "splits": {split: _stats(splits[split]) for split in SPLITS},
        "mc": mc_summary,
        "spoken": spoken_summary,
        "seconds": round(time.perf_counter() - start, 2),
    }
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return {**summary, "unchanged": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder: docs/ and sentences/ {train,dev,test,pool}.jsonl, summary.json")
    parser.add_argument("--debs", type=Path, default=Path(".cache/debs"),
                        help="folder of the packages (wordnet-base and dict-gcide .deb, the gensim wheel), "
                             "fetched there when missing (default: %(default)s)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="demo",
                        help="documents per split and pool sentences (default: %(default)s)")
    parser.add_argument("--sources", default=",".join(SOURCES),
                        help="comma-separated, of: " + ", ".join(SOURCES) + " (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits and documents (default: %(default)s)")
    parser.add_argument("--n-mc", type=int, help="spoken multiple-choice questions from the test documents "
                                                  "(default: the scale's; 0: none, and no TTS needed)")
    parser.add_argument("--n-spoken", type=int, help="dev documents spoken as the broad held-out set of M and F "
                                                      "(default: the scale's; 0: none)")
    parser.add_argument("--heldout-voices", nargs="+", default=list(HELDOUT_VOICES), metavar="SPEC",
                        help="TTS voices of the multiple-choice contexts and spoken documents, never heard in training "
                             "(default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="synthesis processes (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = prepare_broad_text(args.out, args.debs, args.scale, args.sources.split(","), args.seed,
                                     progress=not args.no_progress, n_mc=args.n_mc, n_spoken=args.n_spoken,
                                     heldout_voices=args.heldout_voices, workers=args.workers)
    except BroadTextError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    splits = summary["splits"]
    if summary["unchanged"]:
        counts = ", ".join(f"{split} {splits[split]['documents']}" for split in SPLITS)
        print(f"{args.out}: up to date ({counts} documents "
              "from the same packages, scale, seed and code); nothing to do")
        return 0
    for source, s in summary["sources"].items():
        a = s["available"]
        print(f"{source}: {a['documents']} documents, {a['sentences']} sentences, {a['words']} words, "
              f"{a['topics']} topics available ({s['license'].split(' (')[0]})")
    for split in SPLITS:
        s = splits[split]
        print(f"{args.out / 'docs' / (split + '.jsonl')}: {s['documents']} documents, {s['sentences']} sentences, "
              f"{s['words']} words, {s['topics']} topics")
    if summary.get("mc"):
        mc = summary["mc"]
        print(f"{args.out / 'mc' / 'test.jsonl'}: {mc['questions']} spoken questions of {mc['options']} options "
              f"({', '.join(f'{k} {v}' for k, v in mc['sources'].items())}), {mc['hours'] * 3600:.0f} s of speech")
    if summary.get("spoken"):
        sp = summary["spoken"]
        print(f"{args.out / 'spoken' / 'dev.jsonl'}: {sp['documents']} spoken dev documents "
              f"({', '.join(f'{k} {v}' for k, v in sp['sources'].items())}), {sp['hours'] * 3600:.0f} s of speech")
    print(f"done in {summary['seconds']:.1f} s")
    return 0
