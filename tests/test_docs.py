"""The user-facing docs: every relative link resolves, the README stays short, and the
README's quickstart runs.

Checked files: README.md, CONTRIBUTING.md and every markdown file under docs/. A relative
link (or image) must point at a file or directory inside the repository; a `#anchor` on a
markdown file (or on the same file) must be the slug of one of its headings, as GitHub
makes them. External links (http, https, mailto) are not checked.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
    files += sorted((ROOT / "docs").rglob("*.md"))
    return [f for f in files if f.is_file()]


_FENCE = re.compile(r"^\s{0,3}(```|~~~)")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target); target without spaces, optional "title".
_INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]"  # [text] or ![alt], one level of nested brackets
    r"\(\s*<?([^\s<>)]+)>?(?:\s+\"[^\"]*\")?\s*\)"  # (target "optional title")
)
# [label]: target (reference-style definitions)
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\".*\")?\s*$")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks, with inline code spans blanked."""
    fenced = False
    for n, line in enumerate(text.splitlines(), start=1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield n, _INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)


def links(text: str) -> list[tuple[int, str]]:
    found = []
    for n, line in prose_lines(text):
        found += [(n, m.group(1)) for m in _INLINE_LINK.finditer(line)]
        ref = _REF_DEF.match(line)
        if ref:
            found.append((n, ref.group(1)))
    return found


def slugify(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed
    (letters, digits, '-', '_' and spaces kept), spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = text.strip().lower()
    kept = "".join(
        c for c in text if c in "-_ " or unicodedata.category(c)[0] in "LN" or c == "\u00a0"
    )
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    slugs = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else _HEADING.match(line)
        if not m:
            continue
        slug = slugify(m.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        slugs.add(slug if count == 0 else f"{slug}-{count}")
    return slugs


def broken_links(path: Path) -> list[str]:
    problems = []
    where = path.relative_to(ROOT)
    for n, target in links(path.read_text(encoding="utf-8")):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = path if not file_part else (path.parent / unquote(file_part)).resolve()
        if ROOT not in dest.parents and dest != ROOT:
            problems.append(f"{where}:{n}: {target} points outside the repository")
            continue
        if not dest.exists():
            problems.append(f"{where}:{n}: {target}: no such file or directory")
            continue
        if anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
            problems.append(f"{where}:{n}: {target}: no heading makes #{anchor}")
    return problems


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_the_checked_files_have_links():
    """Guards the parser: the README links to the docs, so zero links means it broke."""
    targets = {t for _, t in links((ROOT / "README.md").read_text(encoding="utf-8"))}
    assert "docs/method.md" in targets
    assert "docs/kernels.md" in targets


def test_the_link_checker_catches_breakage(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "a.md").write_text(
        "# Title: `one` (two)\n\n## Title: one two\n\n"
        "[ok](#title-one-two) [ok too](#title-one-two-1) [file](b.md) "
        "[missing](c.md) [bad anchor](b.md#nope) [good anchor](b.md#b-heading) "
        "[web](https://example.com/x) `[code](d.md)`\n\n```\n[fenced](e.md)\n```\n"
        "![img](f.png) [up](../outside.md)\n",
        encoding="utf-8",
    )
    (tmp_path / "b.md").write_text("## B heading\n", encoding="utf-8")
    problems = broken_links(tmp_path / "a.md")
    assert [p.split(": ", 1)[1] for p in problems] == [
        "c.md: no such file or directory",
        "b.md#nope: no heading makes #nope",
        "f.png: no such file or directory",
        "../outside.md points outside the repository",
    ]


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail to docs/"


def readme_python_block(section: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1]
    return body.split("```python\n", 1)[1].split("\n```", 1)[0]


@pytest.mark.slow
def test_readme_quickstart_runs(one_thread, capsys):
    """The quickstart, as printed, on its tiny local Llama: pruned entries stay zero."""
    torch.manual_seed(0)
    ns: dict = {"__name__": "readme_quickstart"}
    exec(compile(readme_python_block("Quickstart"), "README.md:Quickstart", "exec"), ns)
    model, plan, opt = ns["model"], ns["plan"], ns["opt"]
    assert len(plan) > 0 and opt.nonfinite_count() == 0
    for name, p in model.named_parameters():
        if ".layers." in name and p.dim() == 2:
            assert (p == 0).float().mean().item() >= 0.5, name
    assert "total" in capsys.readouterr().out  # plan.to_text() was printed
