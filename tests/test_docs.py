"""Every document the repository points at is in the repository.

A user who clones the project follows the references in its comments, docstrings, configs and README;
each must lead somewhere. Checked over the files git knows (tracked, plus new files it does not
ignore):

- every ``*.md`` path (``docs/methods.md#cps``, ``README.md``, a relative Markdown link) names a file,
  relative to the referring file's folder or to the repository root, and its ``#anchor``, if any, is a
  heading or an ``<a id=...>`` of that file;
- every relative link target in a Markdown file exists, and every same-page ``(#anchor)`` is on the page;
- nothing points at a numbered issue of a tracker the repository does not hold, nor at a "section sign"
  section of a document it does not contain.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A path ending in .md, not part of a longer path or URL, with an optional #anchor.
DOC_REF = re.compile(r"(?<![\w/.:-])((?:\.{1,2}/)*[\w][\w./-]*\.md)(#[\w-]+)?(?![\w/])")
# [text](target) in Markdown.
MD_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
ISSUE_NUMBER = re.compile(r"\bissues?\s*#?\s*\d+(?:\s*[-\u2013,]\s*\d+)*", re.IGNORECASE)
SECTION_SIGN = "\u00a7"
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"", re.IGNORECASE)
# Markdown files the code writes into run directories (not documents of the repository).
GENERATED = {"report.md"}


def repository_files(root: Path) -> list[Path]:
    """The files git knows in ``root``: tracked ones and new ones it does not ignore (text only)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=root, capture_output=True, check=True).stdout
    files = []
    for name in sorted(set(out.decode().split("\0")) - {""}):
        path = root / name
        if path.is_file() and not path.is_symlink():
            files.append(path)
    return files


def read_text(path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    return {slug(h) for h in HEADING.findall(text)} | set(HTML_ANCHOR.findall(text))


def _resolve(root: Path, referrer: Path, target: str) -> Path | None:
    for base in (referrer.parent, root):
        candidate = (base / target).resolve()
        if candidate.exists() and candidate.is_relative_to(root.resolve()):
            return candidate
    return None


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def dead_references(root: Path) -> list[str]:
    """``path:line: problem`` for each reference that leads nowhere."""
    problems = []
    texts = {path: text for path in repository_files(root) if (text := read_text(path)) is not None}
    anchor_cache: dict[Path, set[str]] = {}

    def check_anchor(where: str, target: Path, anchor: str) -> None:
        if target.suffix != ".md":
            return
        if target not in anchor_cache:
            anchor_cache[target] = anchors(read_text(target) or "")
        if anchor not in anchor_cache[target]:
            problems.append(f"{where}: {target.relative_to(root.resolve())} has no anchor #{anchor}")

    for path, text in texts.items():
        rel = path.relative_to(root)
        for match in DOC_REF.finditer(text):
            ref, anchor = match.group(1), match.group(2)
            if Path(ref).name in GENERATED:
                continue
            where = f"{rel}:{_line(text, match.start())}"
            target = _resolve(root, path, ref)
            if target is None:
                problems.append(f"{where}: {ref} is not in the repository")
            elif anchor:
                check_anchor(where, target, anchor[1:])
        if path.suffix == ".md":
            for match in MD_LINK.finditer(text):
                link = match.group(1).strip("<>")
                if re.match(r"^[a-z][a-z0-9+.-]*:", link, re.IGNORECASE):  # http:, mailto:, ...
                    continue
                if DOC_REF.fullmatch(link):  # a .md target: checked above
                    continue
                where = f"{rel}:{_line(text, match.start())}"
                target_part, _, anchor = link.partition("#")
                if not target_part:
                    if anchor and anchor not in anchors(text):
                        problems.append(f"{where}: no anchor #{anchor} on this page")
                    continue
                target = _resolve(root, path, target_part)
                if target is None:
                    problems.append(f"{where}: link {link} leads to no file")
                elif anchor:
                    check_anchor(where, target, anchor)
        for match in ISSUE_NUMBER.finditer(text):
            problems.append(f"{rel}:{_line(text, match.start())}: refers to {match.group(0)!r} of no tracker in "
                            "the repository; point at docs/ or a paper's arXiv id")
        for pos in (m.start() for m in re.finditer(SECTION_SIGN, text)):
            problems.append(f"{rel}:{_line(text, pos)}: a {SECTION_SIGN} section of a document; point at a docs/ "
                            "anchor instead")
    return list(dict.fromkeys(problems))  # a link's text and target may name the same path


needs_git = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                               reason="needs a git checkout")


@needs_git
def test_every_reference_leads_to_a_document_in_the_repository() -> None:
    problems = dead_references(ROOT)
    assert not problems, "dead references:\n" + "\n".join(problems)


@needs_git
def test_docs_exist_and_have_the_anchors_code_points_at() -> None:
    for doc in ("docs/README.md", "docs/methods.md", "docs/assets.md", "docs/extending.md"):
        assert (ROOT / doc).is_file(), f"{doc} is missing"
    methods = anchors((ROOT / "docs/methods.md").read_text(encoding="utf-8"))
    for anchor in ("cps", "lsd", "projector", "align", "tesu", "curriculum", "difficulty", "distillation",
                   "measures", "multiple-choice", "selection", "choices"):
        assert anchor in methods, f"docs/methods.md has no #{anchor}"


@needs_git
def test_the_checker_finds_planted_dead_references(tmp_path: Path) -> None:
    # The planted names are assembled here so that this file itself holds no dead reference.
    missing, no_anchor, issue = "PAPERS" + ".md", "docs/methods.md#" + "nowhere", "issues " + "4-6"
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/methods.md").write_text('# Methods\n\n<a id="cps"></a>\n## CPS\n\nSee [LSD](#lsd).\n')
    (tmp_path / "README.md").write_text("See docs/methods.md#cps, [assets](docs/assets" + ".md), [code](src/x.py).\n")
    (tmp_path / "code.py").write_text(
        f'"""CPS (docs/methods.md#cps), LSD ({missing}), M ({no_anchor})."""\n'
        f"# the comparison runs of {issue}\n"
        f"# see {SECTION_SIGN}2.2\n"
        'out = "report.md"  # a generated file: not a reference\n')
    problems = dead_references(tmp_path)
    found = "\n".join(problems)
    assert f"code.py:1: {missing} is not in the repository" in found
    assert "code.py:1: docs/methods.md has no anchor #nowhere" in found
    assert f"code.py:2: refers to {issue!r}" in found
    assert f"code.py:3: a {SECTION_SIGN} section" in found
    assert "README.md:1: docs/assets" + ".md is not in the repository" in found
    assert "README.md:1: link src/x.py leads to no file" in found
    assert "docs/methods.md:6: no anchor #lsd on this page" in found
    assert "#cps" not in found and "report" not in found
    assert len(problems) == 7, found
