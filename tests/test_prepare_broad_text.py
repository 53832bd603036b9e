"""``prepare broad-text`` on tiny fake packages in the real formats (a wordnet-base .deb with data.* files,
a dict-gcide .deb with its dictd index and dictzip data, a gensim wheel with the Lee news stories and a
MediaWiki dump): byte-identical output from two runs, a second run that does nothing, held-out
documents never in train or the pool (and the check that says so fires on a made leak), source and
topic kept on every document and sentence, the sentence filters, and a clear message when a package
is missing and cannot be fetched; the multiple-choice test: its questions from test documents only
(and the check that says so fires on made leaks), deterministic, spoken by a held-out voice in the
fortunes' format. One slow test runs on the real packages when they are in ``.cache/debs``."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import random
import sys
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from speechllm.manifest import load_manifest
from stages import prepare_broad_text as pbt
from stages.__main__ import main as cli
from stages.prepare_demo_data import text_key

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "dev", "test", "pool")
WORDS = ("river stone garden window music letter winter market forest doctor teacher island bridge "
         "engine kitchen summer village coffee silver paper mountain harbour yellow quiet gentle "
         "ancient narrow early bright heavy simple modern careful sudden famous walks builds carries "
         "opens follows watches finds paints remembers crosses").split()
SMALL = {"train": 8, "dev": 4, "test": 4, "pool_sentences": 30, "mc": 0}  # the mc tests ask for questions


def phrase(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def sentence(rng: random.Random) -> str:
    text = phrase(rng, rng.randint(6, 12))
    return text[0].upper() + text[1:] + "."


# ---------------------------------------------------------------------------------------------------
# Fake packages in the real formats
# ---------------------------------------------------------------------------------------------------


def tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return lzma.compress(buf.getvalue())


def write_deb(path: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    """An ar archive of debian-binary, control.tar.xz and data.tar.xz, as dpkg-deb builds it."""
    control = f"Package: {package}\nVersion: {version}\nArchitecture: all\nDescription: fake\n".encode()
    out = bytearray(b"!<arch>\n")
    for name, data in (("debian-binary", b"2.0\n"), ("control.tar.xz", tar_xz({"control": control})),
                       ("data.tar.xz", tar_xz(files))):
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(bytes(out))
    return path


WORDNET_COPYRIGHT = b"""Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: WordNet

Files: *
Copyright: 2006 Princeton University
License: WordNet3.0

Files: debian/*
Copyright: 2001-2018 Andreas Tille
License: GPL-2+
"""
GCIDE_COPYRIGHT = b"""This is the Debian GNU/Linux prepackaged version of GCIDE.

GCIDE is free software; you can redistribute it and/or modify
it under the terms of the GNU General Public License as published by
the Free Software Foundation; either version 2, or (at your option)
any later version.
"""
SHARED = "The same sentence is written in two of the sources here."  # kept once


def wordnet_deb(cache: Path) -> Path:
    """Lexicographer files of 30 synsets (2 adverbs), a gloss and an example each; a licence header."""
    rng = random.Random(1)
    files = {}
    offset = 1000
    for pos, lexnum, name, n in (("n", 4, "data.noun", 30), ("v", 38, "data.verb", 30), ("a", 0, "data.adj", 30),
                                 ("r", 2, "data.adv", 2)):
        lines = ["  1 This software and database is being provided to you, the LICENSEE, by  "]
        for i in range(n):
            lemma = f"{rng.choice(WORDS)}_{rng.choice(WORDS)}" + ("(a)" if pos == "a" else "")
            example = SHARED.rstrip(".") if (pos, i) == ("n", 3) else phrase(rng, rng.randint(5, 9))
            gloss = f'{phrase(rng, rng.randint(4, 8))}; "{example}"'
            if i == 7:
                gloss += '; "ok"'  # too short: dropped
            lines.append(f"{offset:08d} {lexnum:02d} {pos} 01 {lemma} 0 001 @ 00001740 {pos} 0000 | {gloss}  ")
            offset += 137
        files[f"usr/share/wordnet/{name}"] = ("\n".join(lines) + "\n").encode()
    files["usr/share/doc/wordnet-base/copyright"] = WORDNET_COPYRIGHT
    return write_deb(cache / "wordnet-base_1%3a3.0-37_all.deb", "wordnet-base", "1:3.0-37", files)


def b64(n: int) -> str:
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        n, r = divmod(n, 64)
        out = digits[r] + out
        if n == 0:
            return out


def gcide_entry(rng: random.Random, headword: str, i: int) -> str:
    label = " (Zool.)" if i % 2 else ""
    lines = [f'{headword} \\{headword[:2]}"{headword[2:]}\\ (h[e^]d), n. [OE. {rng.choice(WORDS)},',
             f"   akin to {{{rng.choice(WORDS).capitalize()}}}.]{label}",
             f"   1. A {phrase(rng, 6)}; a {phrase(rng, 3)}.",
             "      [1913 Webster]", "",
             f"            {sentence(rng)[:-1]}",
             f"            {phrase(rng, 5)}.       --Shak.",
             "      [1913 Webster]", "",
             f"   2. The {phrase(rng, 5)}; as, a {rng.choice(WORDS)} thing.",
             "      [1913 Webster]", "",
             f"   3. A {phrase(rng, 7)}.",
             "      [WordNet 1.5]", ""]
    return "\n".join(lines) + "\n"


def gcide_deb(cache: Path) -> Path:
    """40 entries (two senses from Webster with a quotation, one from WordNet) in dictd's format."""
    rng = random.Random(2)
    data, index = "", []
    header = "\n00-database-short\n   The Collaborative International Dictionary of English v.0.48\n\n"
    index.append(("00-database-short", 0, len(header.encode())))
    data += header
    for i in range(40):
        headword = f"{rng.choice(WORDS).capitalize()}{chr(97 + i % 26)}ing"
        entry = gcide_entry(rng, headword, i)
        index.append((headword, len(data.encode()), len(entry.encode())))
        data += entry
    index_text = "".join(f"{h}\t{b64(o)}\t{b64(n)}\n" for h, o, n in sorted(index, key=lambda r: r[0].lower()))
    files = {"usr/share/dictd/gcide.index": index_text.encode(),
             "usr/share/dictd/gcide.dict.dz": gzip.compress(data.encode(), mtime=0),
             "usr/share/doc/dict-gcide/copyright": GCIDE_COPYRIGHT}
    return write_deb(cache / "dict-gcide_0.48.5+nmu2_all.deb", "dict-gcide", "0.48.5+nmu2", files)


def wiki_page(title: str, text: str, redirect: bool = False) -> str:
    return (f"<page><title>{title}</title><ns>0</ns><id>1</id>" + ('<redirect title="X" />' if redirect else "")
            + f'<revision><id>2</id><text xml:space="preserve">{text}</text></revision></page>')


def wiki_article(rng: random.Random, title: str) -> str:
    paragraphs = []
    for _ in range(3):
        parts = [sentence(rng) for _ in range(4)]
        parts[0] = f"'''{title}''' is a [[{rng.choice(WORDS)}|{rng.choice(WORDS)}]] {parts[0].lower()}"
        parts[1] = parts[1][:-1] + "&lt;ref&gt;{{cite web|title=x}}&lt;/ref&gt;."
        paragraphs.append(" ".join(parts))
    body = "\n\n".join(paragraphs)
    return (f"{{{{Infobox thing\n| name = {title}\n}}}}\n{body}\n\n== History ==\n"
            f"It weighs {{{{convert|5|kg|lb}}}} and more than the {rng.choice(WORDS)} stone.\n\n"
            f"== References ==\n{sentence(rng)}\n[[Category:Things]]\n")


def gensim_wheel(cache: Path) -> Path:
    """A wheel holding the two Lee files (latin-1) and a shortened English Wikipedia dump."""
    rng = random.Random(3)
    stories = [" ".join(sentence(rng) for _ in range(rng.randint(4, 12))) for _ in range(20)]
    stories[0] += " " + SHARED + " Caf\xe9 owners said 5% of sales fell by $3 million."
    pages = [wiki_page(f"Thing {chr(65 + i)}", wiki_article(rng, f"Thing {chr(65 + i)}")) for i in range(16)]
    pages.append(wiki_page("Redirected", "#REDIRECT [[Thing A]]", redirect=True))
    dump = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">' + "".join(pages) + "</mediawiki>")
    data = "gensim/test/test_data/"
    path = cache / "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("gensim-4.4.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: gensim\nVersion: 4.4.0\n"
                                                      "License: LGPL-2.1-only\n\nTopic modelling.\n")
        z.writestr(data + "lee_background.cor", "\n".join(stories[:15]).encode("latin-1"))
        z.writestr(data + "lee.cor", "\n".join(stories[15:]).encode("latin-1"))
        z.writestr(data + pbt.GENSIM_WIKI, bz2.compress(dump.encode()))
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    folder = tmp_path / "debs"
    folder.mkdir()
    wordnet_deb(folder)
    gcide_deb(folder)
    gensim_wheel(folder)
    monkeypatch.setitem(pbt.SCALES, "demo", SMALL)
    monkeypatch.setattr(pbt, "HELDOUT_FRACTION", 0.2)
    return folder


def outputs(out: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.jsonl"))}
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("seconds")
    files["summary.json"] = json.dumps(summary, sort_keys=True).encode()
    return files


def rows(out: Path, group: str, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / group / f"{split}.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------------


def test_two_runs_write_the_same_bytes_and_a_second_run_does_nothing(cache, tmp_path):
    first = pbt.prepare_broad_text(tmp_path / "a", cache, progress=False)
    pbt.prepare_broad_text(tmp_path / "b", cache, progress=False)
    assert not first["unchanged"]
    assert outputs(tmp_path / "a") == outputs(tmp_path / "b")
    assert set(outputs(tmp_path / "a")) == {f"{g}/{s}.jsonl" for g in ("docs", "sentences") for s in SPLITS} | {
        "summary.json"}
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*") if p.is_file()}
    again = pbt.prepare_broad_text(tmp_path / "a", cache, progress=False)
    assert again["unchanged"]
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*") if p.is_file()}
    # another seed is another split
    pbt.prepare_broad_text(tmp_path / "c", cache, seed=1, progress=False)
    assert outputs(tmp_path / "c")["docs/train.jsonl"] != outputs(tmp_path / "a")["docs/train.jsonl"]


def test_counts_per_scale_and_every_source_shares(cache, tmp_path):
    summary = pbt.prepare_broad_text(tmp_path / "o", cache, progress=False)
    for split in ("train", "dev", "test"):
        assert summary["splits"][split]["documents"] == SMALL[split]
        assert len(rows(tmp_path / "o", "docs", split)) == SMALL[split]
    assert SMALL["pool_sentences"] <= summary["splits"]["pool"]["sentences"] < SMALL["pool_sentences"] + 4 * 15
    assert set(summary["sources"]) == {"wordnet", "gcide", "gensim-news", "gensim-wiki"}
    train_sources = [r["source"] for r in rows(tmp_path / "o", "docs", "train")]
    assert sorted(set(train_sources)) == sorted(summary["sources"])  # 8 documents over 4 sources
    for split in ("dev", "test"):
        assert {r["source"] for r in rows(tmp_path / "o", "docs", split)} == set(summary["sources"])
    assert set(summary["sources"]["gcide"]["available"]["top_topics"]) == {"zoology", "general"}
    for s in summary["sources"].values():
        assert s["available"]["documents"] > 0 and s["license"] and s["package"]["sha256"]
    assert summary["sources"]["wordnet"]["package"]["license"] == "WordNet3.0"
    assert summary["sources"]["gcide"]["package"]["license"] == "GPL-2+"
    assert summary["sources"]["gensim-wiki"]["package"]["license"] == "LGPL-2.1-only"
    assert summary["sources"]["wordnet"]["dropped_sentences"]["too_short"] == 3


def test_heldout_documents_never_in_train_or_pool(cache, tmp_path):
    pbt.prepare_broad_text(tmp_path / "o", cache, progress=False)
    keys = {split: {text_key(r["text"]) for r in rows(tmp_path / "o", "sentences", split)} for split in SPLITS}
    assert keys["dev"] and keys["test"]
    assert not (keys["dev"] | keys["test"]) & (keys["train"] | keys["pool"])
    assert not keys["dev"] & keys["test"]
    # a story or an article is on one side only, whichever of its documents were drawn
    sides: dict[str, set[str]] = {}
    docs = {split: rows(tmp_path / "o", "docs", split) for split in SPLITS}
    for split, split_rows in docs.items():
        for r in split_rows:
            if r["source"] == "gensim-wiki":
                sides.setdefault(r["topic"], set()).add("held" if split in ("dev", "test") else "training")
    assert sides and all(len(s) == 1 for s in sides.values())
    # a sentence in two sources is kept once
    all_text = [r["text"] for split in SPLITS for r in rows(tmp_path / "o", "sentences", split)]
    assert len(all_text) == len({text_key(t) for t in all_text})


def test_the_leak_check_fires_on_a_constructed_leak(cache, tmp_path, monkeypatch):
    shared = pbt.Sentence("A held out sentence that is also in training.", "news")
    held = pbt.Document("gensim-news", "story:1", (shared, pbt.Sentence("Another one of its sentences here.", "news")))
    train = pbt.Document("gensim-news", "story:2", (pbt.Sentence("A held-out sentence, that is also in training!",
                                                                 "news"),))
    splits = {"train": [train], "dev": [held], "test": [], "pool": []}
    with pytest.raises(pbt.BroadTextError, match="also in train or pool"):
        pbt.check_no_leak(splits)
    pbt.check_no_leak({**splits, "train": [], "pool": [held], "dev": []})  # training side only: fine

    # and in the step: a split that put one story's documents on both sides would be stopped
    real_assign = pbt.assign_splits

    def leaky(documents, counts, seed):
        out = real_assign(documents, counts, seed)
        out["train"].append(out["dev"][0])
        return out

    monkeypatch.setattr(pbt, "assign_splits", leaky)
    with pytest.raises(pbt.BroadTextError, match="dev/test sentence"):
        pbt.prepare_broad_text(tmp_path / "o", cache, progress=False)
    assert not (tmp_path / "o" / "docs" / "train.jsonl").exists()


def test_source_and_topic_on_every_document_and_sentence(cache, tmp_path):
    pbt.prepare_broad_text(tmp_path / "o", cache, progress=False)
    topics: dict[str, set[str]] = {}
    for split in SPLITS:
        docs = {r["id"]: r for r in rows(tmp_path / "o", "docs", split)}
        sentences = rows(tmp_path / "o", "sentences", split)
        assert {s["doc"] for s in sentences} == set(docs)
        for r in docs.values():
            assert set(r) == {"id", "text", "topic", "n_words", "source", "n_sentences"}
            assert r["n_words"] == len(r["text"].split())
            mine = [s for s in sentences if s["doc"] == r["id"]]
            assert len(mine) == r["n_sentences"] and " ".join(s["text"] for s in mine) == r["text"]
            assert all(s["source"] == r["source"] for s in mine)
            assert 2 <= r["n_sentences"] <= pbt.DOC_SENTENCES[1]
        for s in sentences:
            assert set(s) == {"id", "text", "topic", "n_words", "source", "doc"}
            topics.setdefault(s["source"], set()).add(s["topic"])
            assert pbt.SENTENCE_WORDS[0] <= s["n_words"] <= pbt.SENTENCE_WORDS[1]
        # the project's manifest reader takes them as text-only manifests, topic and source as meta
        loaded = load_manifest(tmp_path / "o" / "docs" / f"{split}.jsonl")
        assert all(u.meta["source"] and u.meta["topic"] for u in loaded)
    assert topics["wordnet"] <= {"noun.act", "verb.motion", "adj.all", "adv.all"}
    assert topics["gcide"] <= {"zoology", "general"}
    assert topics["gensim-news"] == {"news"}
    assert all(t.startswith("Thing ") for t in topics["gensim-wiki"])


def test_cleaned_text_from_each_format(cache, tmp_path):
    pbt.prepare_broad_text(tmp_path / "o", cache, progress=False)
    texts = [r for split in SPLITS for r in rows(tmp_path / "o", "sentences", split)]
    joined = " ".join(r["text"] for r in texts)
    for markup in ("[[", "{{", "'''", "<ref", "&lt;", "--Shak", "[1913", "\\", "{", "}"):
        assert markup not in joined
    assert "weighs" not in joined  # its {{convert}} cut a hole in it: dropped
    assert not any("WordNet" in r["text"] for r in texts)
    wordnet = [r["text"] for r in texts if r["source"] == "wordnet"]
    assert any(": " in t for t in wordnet) and all(t[0].isupper() and t[-1] in ".!?" for t in wordnet)


@pytest.mark.parametrize("raw, expected", [
    ("The river walks to the market.", "The river walks to the market."),
    ("Caf\u00e9 owners said 5% of sales fell by $3 million.", "Cafe owners said 5 percent of sales fell by 3 million dollars."),
    ("Salt & pepper \u2014 the old pair \u2014 came back.", "Salt and pepper, the old pair, came back."),
    ("It ran from 1990\u20131995 in the \u201cold\u201d town.", 'It ran from 1990 to 1995 in the "old" town.'),
    ("It covers K\u201312 schools in the state.", "It covers K-12 schools in the state."),
])
def test_sentence_cleaning(raw, expected):
    assert pbt.sentence_problem(raw) == (expected, None)


@pytest.mark.parametrize("raw, reason", [
    ("Too few words.", "too_short"),
    ("One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
     "seventeen eighteen nineteen twenty one two three four five six seven eight nine ten eleven.", "too_long"),
    ("The river and/or the stone are there.", "symbols"),
    ("The river walks to the market #1 today.", "symbols"),
    ('He said "the river walks to the market.', "unbalanced"),
    ("The river (and the stone walks to the market.", "unbalanced"),
    ("the river walks to the market today.", "not_a_sentence"),
    ("The river walks to the market today", "not_a_sentence"),
    ("The 12 34 56 78 99 river.", "not_a_sentence"),
    ("The spear () was carried by the river.", "markup"),
    ("It weighs \x00 and more than the stone.", "markup"),
    ("The fleet flew o'er the?urges in the night.", "markup"),
])
def test_sentence_filters(raw, reason):
    assert pbt.sentence_problem(raw) == (None, reason)


def test_sentences_are_put_back_after_initials_and_inside_quotations():
    assert pbt.sentences_of('Brig. Gen. Gideon Pillow led 5,000 men. John F. Kennedy spoke.') == [
        "Brig. Gen. Gideon Pillow led 5,000 men.", "John F. Kennedy spoke."]
    assert pbt.sentences_of('"We came. We saw," he said. Then it rained.') == [
        '"We came. We saw," he said.', "Then it rained."]


def test_wordnet_line():
    line = ('00406612 04 n 02 fold 0 folding 0 005 @ 00404403 n 0000 | the act of folding; '
            '"he gave the napkins a double fold"; "a fold" - Anon  ')
    assert pbt.parse_wordnet_line(line) == ("noun.act", "fold", "the act of folding",
                                            ["he gave the napkins a double fold", "a fold"])
    assert pbt.parse_wordnet_line("  1 This software and database is being provided to you") is None


def test_gcide_entry():
    entry = ("Spurt \\Spurt\\ (sp[^u]rt), n. [Cf. Icel. sprettr a spurt, spring,\n"
             "   run, spretta to spirt.] (Zool.)\n"
             "   1. A sudden and energetic effort, as in an emergency; an increased exertion. --Bacon.\n"
             "      [1913 Webster]\n\n"
             "         The long, steady sweep of the so-called \"paddle\" tried\n"
             "         him almost as much as the breathless strain of the\n"
             "         spurt.                                   --T. Hughes.\n"
             "   [1913 Webster]\n\n"
             "   2. (Naut.) A sudden rush of water; as, a spurt of rain.\n"
             "      [1913 Webster]\n\n"
             "   3. A short burst of activity.\n"
             "      [WordNet 1.5]\n")
    assert pbt.parse_gcide_entry(entry) == [
        ("zoology", "Spurt: a sudden and energetic effort, as in an emergency; an increased exertion.",
         ['The long, steady sweep of the so-called "paddle" tried him almost as much as the breathless '
          "strain of the spurt."]),
        ("nautical", "Spurt: a sudden rush of water.", []),
    ]


def test_wiki_paragraphs():
    text = ("{{Infobox person\n| name = A\n}}\n'''Ada''' was a [[mathematics|mathematician]]"
            "&lt;ref&gt;{{cite book|x}}&lt;/ref&gt; from [[London]].{{citation needed}}\n"
            "She wrote [[File:Ada.jpg|thumb|A [[portrait]]]] notes.\n\n"
            "* a list item\n\n== References ==\nA cited book.\n")
    assert pbt.wiki_paragraphs(text) == ["Ada was a mathematician from London. She wrote  notes."]


def test_document_sizes():
    rng = random.Random(0)
    units = [[pbt.Sentence(f"Sentence number {i} of {j} here.", "t") for j in range(n)]
             for i, n in enumerate([1, 2, 3, 1, 20, 2, 1, 1])]
    docs = pbt.group_units(units, rng)
    assert [s for d in docs for s in d] == [s for u in units for s in u]  # in order, nothing lost
    assert all(2 <= len(d) <= pbt.DOC_SENTENCES[1] for d in docs)


def test_shares_deal_out_a_shortfall():
    assert pbt.shares(12, {"a": 100, "b": 100, "c": 100}) == {"a": 4, "b": 4, "c": 4}
    assert pbt.shares(12, {"a": 1, "b": 100, "c": 100}) == {"a": 1, "b": 6, "c": 5}
    assert pbt.shares(12, {"a": 1, "b": 2, "c": 0}) == {"a": 1, "b": 2, "c": 0}


# ---------------------------------------------------------------------------------------------------
# The multiple-choice test
# ---------------------------------------------------------------------------------------------------


def fake_splits(cache: Path, seed: int = 0) -> dict[str, list]:
    documents, _, _ = pbt.read_sources(pbt.fetch_packages(cache, pbt.SOURCES), seed, progress=False)
    return pbt.assign_splits(documents, SMALL, seed)


def test_mc_questions_come_from_test_documents_only(cache):
    splits = fake_splits(cache)
    questions = pbt.mc_questions(splits["test"], 12, seed=0)
    assert len(questions) == 12
    # dealt equally over the sources of the test split (4 here)
    assert sorted(Counter(q.source for q in questions).values()) == [3, 3, 3, 3]
    test_sentences = {s.key: (d.id, s.text) for d in splits["test"] for s in d.sentences}
    training = {s.key for split in ("train", "pool") for d in splits[split] for s in d.sentences}
    training_docs = {d.id for split in ("train", "pool") for d in splits[split]}
    for q in questions:
        assert len(q.options) == len({text_key(o) for o in q.options}) == pbt.MC_OPTIONS
        doc, sentence = test_sentences[q.key]
        assert doc == q.doc and f"{q.context} {q.options[q.answer]}" == sentence  # the true continuation
        assert len(q.context.split()) >= pbt.MC_CONTEXT_WORDS and len(q.options[q.answer].split()) >= pbt.MC_REST_WORDS
        for i, (option, option_doc, key) in enumerate(zip(q.options, q.option_docs, q.option_keys)):
            assert key in test_sentences and key not in training and option_doc not in training_docs
            assert test_sentences[key][1].endswith(option)  # a continuation of that held-out sentence
            assert (option_doc == q.doc) == (i == q.answer)  # distractors: other documents
    assert len({q.key for q in questions}) == len(questions)
    # deterministic, whatever the order of the documents; another seed, other questions
    assert pbt.mc_questions(list(reversed(splits["test"])), 12, seed=0) == questions
    assert pbt.mc_questions(splits["test"], 12, seed=1) != questions
    pbt.check_mc_heldout(questions, splits)


def test_the_mc_check_fires_on_made_leaks(cache):
    splits = fake_splits(cache)
    (question,) = pbt.mc_questions(splits["test"], 1, seed=0)
    # its document also on the training side
    leaked = {**splits, "pool": splits["pool"] + [d for d in splits["test"] if d.id == question.doc]}
    with pytest.raises(pbt.BroadTextError, match="its context .* comes from a train/pool document"):
        pbt.check_mc_heldout([question], leaked)
    # a distractor cut from a training sentence
    wrong = next(i for i in range(pbt.MC_OPTIONS) if i != question.answer)
    train_doc = splits["train"][0]
    keys = list(question.option_keys)
    docs = list(question.option_docs)
    keys[wrong], docs[wrong] = train_doc.sentences[0].key, train_doc.id
    bad = pbt.Question(**{**question.__dict__, "option_keys": tuple(keys), "option_docs": tuple(docs)})
    with pytest.raises(pbt.BroadTextError, match=f"option {wrong} .* train/pool document"):
        pbt.check_mc_heldout([bad], splits)
    # a distractor from the question's own document
    docs[wrong], keys[wrong] = question.doc, question.key
    with pytest.raises(pbt.BroadTextError, match="wrong document"):
        pbt.check_mc_heldout([pbt.Question(**{**question.__dict__, "option_keys": tuple(keys),
                                               "option_docs": tuple(docs)})], splits)
    # and in the step: questions from the dev split instead are stopped before anything is spoken
    real = pbt.mc_questions
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pbt, "mc_questions", lambda docs, n, seed: real(splits["dev"], n, seed))
        patch.setattr(pbt, "_resolve_voices", lambda specs, role: list(specs))
        with pytest.raises(pbt.BroadTextError, match="not a sentence of a test document"):
            pbt.prepare_broad_text(cache.parent / "o", cache, progress=False, n_mc=2)
    assert not (cache.parent / "o" / "mc").exists()


def test_the_spoken_mc_test(cache, tmp_path, tts_voice):
    voice = tts_voice("flite:slt").name  # a held-out voice of the demo (festival's is slow to start)
    assert voice in [tts_voice(v).name for v in pbt.HELDOUT_VOICES]
    first = pbt.prepare_broad_text(tmp_path / "a", cache, progress=False, n_mc=4, heldout_voices=[voice], workers=1)
    assert first["mc"]["questions"] == 4 and first["mc"]["voices"] == {voice: 4} and first["mc"]["hours"] > 0
    rows_ = rows(tmp_path / "a", "mc", "test")
    demo_fields = {"id", "audio", "duration", "text", "speaker", "topic", "options", "answer"}  # prepare_demo_data's
    assert all(set(r) == demo_fields | {"source", "doc"} for r in rows_)
    questions = pbt.mc_questions(fake_splits(cache)["test"], 4, seed=0)
    assert [(r["text"], r["options"], r["answer"], r["doc"]) for r in rows_] == [
        (q.context, list(q.options), q.answer, q.doc) for q in questions]
    loaded = load_manifest(tmp_path / "a" / "mc" / "test.jsonl", require_audio=True)
    assert all(u.duration > 0.3 and u.speaker == voice and u.audio.is_file() for u in loaded)
    test_docs = {r["id"] for r in rows(tmp_path / "a", "docs", "test")}
    assert {r["doc"] for r in rows_} <= test_docs
    # the same bytes from a second run elsewhere; nothing done by a second run here
    pbt.prepare_broad_text(tmp_path / "b", cache, progress=False, n_mc=4, heldout_voices=[voice], workers=1)
    a, b = outputs(tmp_path / "a"), outputs(tmp_path / "b")
    assert a == b and "mc/test.jsonl" in a
    assert [p.read_bytes() for p in sorted((tmp_path / "a" / "mc" / "wav").iterdir())] == [
        p.read_bytes() for p in sorted((tmp_path / "b" / "mc" / "wav").iterdir())]
    assert pbt.prepare_broad_text(tmp_path / "a", cache, progress=False, n_mc=4, heldout_voices=[voice])["unchanged"]
    # a lost clip is made again
    loaded[0].audio.unlink()
    assert not pbt.prepare_broad_text(tmp_path / "a", cache, progress=False, n_mc=4, heldout_voices=[voice],
                                      workers=1)["unchanged"]
    assert loaded[0].audio.is_file() and outputs(tmp_path / "a") == b


def test_the_spoken_broad_heldout_documents(cache, tmp_path, tts_voice):
    voice = tts_voice("flite:slt").name
    first = pbt.prepare_broad_text(tmp_path / "a", cache, progress=False, n_spoken=3, heldout_voices=[voice],
                                   workers=1)
    assert first["spoken"]["documents"] == 3 and first["spoken"]["voices"] == {voice: 3}
    assert len(first["spoken"]["sources"]) == 3  # dealt over the sources (four here: three of them)
    rows_ = rows(tmp_path / "a", "spoken", "dev")
    dev = {r["id"]: r for r in rows(tmp_path / "a", "docs", "dev")}
    fortunes_fields = {"id", "audio", "duration", "text", "speaker", "words", "doc", "topic", "n_words"}
    assert all(set(r) == fortunes_fields | {"source", "n_sentences"} for r in rows_)
    for r in rows_:
        doc = dev[r["doc"]]  # a dev document, never train or pool
        assert doc["text"].startswith(r["text"]) and r["source"] == doc["source"]
        assert r["n_words"] == len(r["text"].split()) and (r["n_words"] <= pbt.SPOKEN_WORDS or r["n_sentences"] == 1)
        assert " ".join(w["w"] for w in r["words"]) == r["text"]  # exact chunk spans, in order
        assert all(a["end"] <= b["start"] + 1e-6 for a, b in zip(r["words"], r["words"][1:]))
        assert r["words"][-1]["end"] <= r["duration"] + 1e-3
    loaded = load_manifest(tmp_path / "a" / "spoken" / "dev.jsonl", require_audio=True)
    assert all(u.speaker == voice and u.audio.is_file() for u in loaded)
    pbt.prepare_broad_text(tmp_path / "b", cache, progress=False, n_spoken=3, heldout_voices=[voice], workers=1)
    assert outputs(tmp_path / "a") == outputs(tmp_path / "b")
    assert pbt.prepare_broad_text(tmp_path / "a", cache, progress=False, n_spoken=3,
                                  heldout_voices=[voice])["unchanged"]
    loaded[0].audio.unlink()  # a lost clip is made again
    assert not pbt.prepare_broad_text(tmp_path / "a", cache, progress=False, n_spoken=3, heldout_voices=[voice],
                                      workers=1)["unchanged"]
    assert loaded[0].audio.is_file()


def test_spoken_text_keeps_whole_leading_sentences():
    sentence = lambda n: pbt.Sentence(" ".join(["word"] * (n - 1)) + " end.", "t")  # noqa: E731
    doc = pbt.Document("wordnet", "k", (sentence(30), sentence(40), sentence(20), sentence(5)))
    assert pbt.spoken_text(doc, 80) == (" ".join(s.text for s in doc.sentences[:2]), 2)  # 70 words; 90 would pass 80
    assert pbt.spoken_text(doc, 10) == (doc.sentences[0].text, 1)  # at least the first


def test_mc_without_a_voice_says_how_to_do_without(cache, tmp_path, monkeypatch):
    def none(specs, role):
        raise RuntimeError(f"no {role} voice is available (tried {list(specs)})")

    monkeypatch.setattr(pbt, "_resolve_voices", none)
    with pytest.raises(pbt.BroadTextError, match=r"no held-out voice .*--n-mc 0"):
        pbt.prepare_broad_text(tmp_path / "o", cache, progress=False, n_mc=3)


# ---------------------------------------------------------------------------------------------------
# Packages and the command line
# ---------------------------------------------------------------------------------------------------


def test_missing_packages_that_cannot_be_fetched_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(pbt.shutil, "which", lambda name: None)  # no apt-get
    monkeypatch.setattr(pbt, "PIP", (sys.executable, "-c", "import sys; print('no index'); sys.exit(1)"))
    with pytest.raises(pbt.BroadTextError) as err:
        pbt.prepare_broad_text(tmp_path / "o", tmp_path / "empty", progress=False)
    message = str(err.value)
    for name in ("wordnet-base", "dict-gcide", pbt.GENSIM_PIP, "apt-get is not available", "apt-get download",
                 "pip download", str(tmp_path / "empty")):
        assert name in message
    assert not (tmp_path / "o").exists()


def test_a_missing_package_is_fetched_with_apt_get(cache, tmp_path, monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    (cache / "dict-gcide_0.48.5+nmu2_all.deb").rename(store / "dict-gcide_0.48.5+nmu2_all.deb")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "apt-get"
    fake.write_text(f"#!/bin/sh\n[ \"$1\" = download ] && [ \"$2\" = dict-gcide ] && cp {store}/*.deb . \n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    found = pbt.fetch_packages(cache, ["wordnet", "gcide"])
    assert found["gcide"] == cache / "dict-gcide_0.48.5+nmu2_all.deb" and found["gcide"].is_file()


def test_only_some_sources(cache, tmp_path):
    summary = pbt.prepare_broad_text(tmp_path / "o", cache, sources=["gensim"], progress=False)
    assert set(summary["sources"]) == {"gensim-news", "gensim-wiki"}
    with pytest.raises(pbt.BroadTextError, match="unknown source"):
        pbt.prepare_broad_text(tmp_path / "o", cache, sources=["fortunes"], progress=False)


def test_command_line(cache, tmp_path, capsys):
    argv = ["prepare", "broad-text", "--out", str(tmp_path / "o"), "--debs", str(cache), "--no-progress"]
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert "gensim-wiki:" in out and "docs/pool.jsonl" in out
    assert cli(argv) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert cli([*argv[:-1], "--sources", "wordnet,nothing"]) == 2
    assert "unknown source(s) nothing" in capsys.readouterr().err


@pytest.mark.slow
def test_real_packages(tmp_path):
    cache = REPO / ".cache" / "debs"
    missing = [s for s in pbt.SOURCES if pbt.find_package(cache, s) is None]
    if missing:
        pytest.skip(f"not in {cache}: {', '.join(missing)} (python -m stages prepare broad-text fetches them)")
    summary = pbt.prepare_broad_text(tmp_path / "broad", cache, scale="demo", progress=False)
    counts = pbt.SCALES["demo"]
    for split in ("train", "dev", "test"):
        assert summary["splits"][split]["documents"] == counts[split]
    assert summary["splits"]["pool"]["sentences"] >= counts["pool_sentences"]
    sources = summary["sources"]
    assert sources["wordnet"]["available"]["topics"] == 45 and sources["wordnet"]["available"]["sentences"] > 100_000
    assert sources["gcide"]["available"]["sentences"] > 100_000 and "zoology" in sources["gcide"]["available"][
        "top_topics"]
    assert sources["gensim-news"]["available"]["documents"] > 300
    assert sources["gensim-wiki"]["available"]["topics"] > 80
    assert sources["wordnet"]["package"]["license"] == "WordNet3.0"
    assert sources["gcide"]["package"]["license"] == "GPL-2+"
    keys = {split: {text_key(r["text"]) for r in rows(tmp_path / "broad", "sentences", split)} for split in SPLITS}
    assert not (keys["dev"] | keys["test"]) & (keys["train"] | keys["pool"])
    # the spoken multiple-choice test, by the demo's held-out voices, from test documents
    assert summary["mc"]["questions"] == counts["mc"] and set(summary["mc"]["sources"]) == set(sources)
    questions = load_manifest(tmp_path / "broad" / "mc" / "test.jsonl", require_audio=True)
    test_docs = {r["id"] for r in rows(tmp_path / "broad", "docs", "test")}
    assert len(questions) == counts["mc"] and all(u.meta["doc"] in test_docs for u in questions)
    assert all(text_key(u.text + " " + u.meta["options"][u.meta["answer"]]) in keys["test"] for u in questions)
