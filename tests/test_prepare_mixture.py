"""``prepare mixture``: rows tagged with their source, order kept, rows holding a held-out sentence left
out (counted, logged with both places), repeated ids refused, a second run writes nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from stages import prepare_mixture as pm
from stages.__main__ import main as cli


def write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def inputs(tmp_path):
    narrow = write(tmp_path / "narrow.jsonl", [{"id": "n1", "text": "A cat sat. It slept.", "topic": "pets"},
                                               {"id": "n2", "text": "Dogs bark at night.", "topic": "pets"}])
    broad = write(tmp_path / "broad.jsonl", [{"id": "b1", "text": "Rivers flow to the sea.", "source": "wordnet"},
                                             {"id": "b2", "text": "The moon is bright. Stars shine."}])
    return narrow, broad


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_in_order_with_their_source(inputs, tmp_path):
    narrow, broad = inputs
    out = tmp_path / "mix" / "pool.jsonl"
    summary = pm.mix([("fortunes", narrow), ("broad", broad)], out)
    rows = read(out)
    assert [r["id"] for r in rows] == ["n1", "n2", "b1", "b2"]
    assert [r["source"] for r in rows] == ["fortunes", "fortunes", "wordnet", "broad"]  # a row's own source kept
    assert rows[0]["topic"] == "pets" and rows[0]["text"] == "A cat sat. It slept."
    assert summary["inputs"]["fortunes"] == {"manifest": str(narrow), "rows": 2, "words": 9, "skipped_heldout": 0}
    assert summary["inputs"]["broad"]["rows"] == 2 and summary["sources"] == {"fortunes": 2, "wordnet": 1, "broad": 1}
    stamp = out.stat().st_mtime_ns
    assert not pm.mix([("fortunes", narrow), ("broad", broad)], out)["changed"]
    assert out.stat().st_mtime_ns == stamp


def test_a_row_holding_a_heldout_sentence_is_left_out_counted_and_logged(inputs, tmp_path, caplog):
    narrow, broad = inputs
    heldout = write(tmp_path / "dev.jsonl", [{"id": "d1", "text": "Nothing here. The MOON is bright!"}])
    out = tmp_path / "out.jsonl"
    summary = pm.mix([("fortunes", narrow), ("broad", broad)], out, [heldout])
    assert [r["id"] for r in read(out)] == ["n1", "n2", "b1"]
    assert summary["inputs"]["broad"]["skipped_heldout"] == 1 and summary["inputs"]["fortunes"]["skipped_heldout"] == 0
    assert re.search(r"broad\.jsonl: 1 row\(s\) left out.*broad\.jsonl:2 holds 'The moon is bright\.' "
                     r"\(.*dev\.jsonl:1\)", caplog.text)
    short = write(tmp_path / "dev2.jsonl", [{"id": "d1", "text": "The moon is dark. Dogs bark."}])  # too short to count
    assert pm.mix([("fortunes", narrow), ("broad", broad)], out, [short])["rows"] == 4


def test_bad_inputs_say_where(inputs, tmp_path):
    narrow, _ = inputs
    twice = write(tmp_path / "twice.jsonl", [{"id": "n2", "text": "Again."}])
    with pytest.raises(pm.MixtureError, match=r"twice\.jsonl:1: id 'n2' already at .*narrow\.jsonl:2"):
        pm.mix([("a", narrow), ("b", twice)], tmp_path / "o.jsonl")
    empty_text = write(tmp_path / "bad.jsonl", [{"id": "x", "text": " "}])
    with pytest.raises(pm.MixtureError, match=r"bad\.jsonl:1: field\(s\) text missing or empty"):
        pm.mix([("a", empty_text)], tmp_path / "o.jsonl")
    with pytest.raises(pm.MixtureError, match="names repeat"):
        pm.mix([("a", narrow), ("a", narrow)], tmp_path / "o.jsonl")
    with pytest.raises(pm.MixtureError, match="expected NAME=MANIFEST"):
        pm.parse_input("data/pool.jsonl")


def test_command_line(inputs, tmp_path, capsys):
    narrow, broad = inputs
    out = tmp_path / "pool.jsonl"
    assert cli(["prepare", "mixture", f"fortunes={narrow}", f"broad={broad}", "--out", str(out)]) == 0
    assert "4 rows, written: fortunes 2 rows" in capsys.readouterr().out
    assert cli(["prepare", "mixture", f"fortunes={tmp_path / 'none.jsonl'}", "--out", str(out)]) == 2
    assert "none.jsonl: no such manifest" in capsys.readouterr().err
