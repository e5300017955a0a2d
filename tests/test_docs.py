"""The documentation: README.md and docs/ link to files that exist, the README stays short, every
docs page says in one line what it holds, and the MkDocs site (mkdocs.yml) builds with --strict."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MARKDOWN_FILES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]

# [text](target) and ![alt](target); the target ends at the first space (a "title") or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*)?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks and without inline code spans."""
    lines, in_fence = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append((number, re.sub(r"`[^`]*`", "", line)))
    return lines


def relative_links(path: Path) -> list[tuple[int, str]]:
    """The relative link targets of a markdown file (no http(s)/mailto, no pure #anchors)."""
    links = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
                continue  # http(s)://, mailto:, ... or an anchor on the same page
            links.append((number, target))
    return links


def test_markdown_files_are_found():
    names = {path.relative_to(ROOT).as_posix() for path in MARKDOWN_FILES}
    assert {"README.md", "docs/index.md", "docs/architecture.md", "docs/results.md"} <= names


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path: Path):
    broken = []
    for number, target in relative_links(path):
        file_part = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if not (path.parent / file_part).exists():
            broken.append(f"{path.relative_to(ROOT)}:{number}: {target}")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_link_check_sees_a_broken_link(tmp_path: Path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# There\n")
    page.write_text("[ok](there.md#a) [web](https://example.org) [gone](missing.md) `[code](no.md)`\n")
    assert [target for _, target in relative_links(page)] == ["there.md#a", "missing.md"]


def test_readme_is_short():
    # The README is the one screen a newcomer reads: what the package does, the install line, a
    # first example, the headline numbers and links; everything longer belongs under docs/
    # (issue 26 asks for about 150 lines).
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 160, f"README.md has {len(lines)} lines; move detail into docs/"


@pytest.mark.parametrize("path", sorted(DOCS.rglob("*.md")), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_docs_page_opens_with_a_description(path: Path):
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines and lines[0].startswith("# "), f"{path.relative_to(ROOT)} does not start with a '# title'"
    following = [line.strip() for line in lines[1:6] if line.strip()]
    assert following and not following[0].startswith(("#", "|", "```", ":::")), (
        f"{path.relative_to(ROOT)}: the line after the title should say what the page holds, "
        f"got {following[:1]}")


def test_mkdocs_strict_build(tmp_path: Path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    pytest.importorskip("mkdocstrings_handlers.python")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}"
    assert (tmp_path / "site" / "api" / "restore" / "index.html").exists()
