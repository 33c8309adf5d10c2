"""The documentation site as a reader gets it: built with ``mkdocs build --strict`` into a temporary
folder, then read back as HTML.

    PYTHONPATH=src python -m pytest -q tests/test_docs_site.py

Fails on a raw Sphinx role left in a docstring or page (``:func:`fold```: mkdocstrings renders
Markdown, so a role shows as literal text), on an internal link or image whose target is not in
the built site (or is a folder, which opens a directory listing from disk), on an anchor that
no page defines, on a bullet list that Markdown joined into the paragraph above it or a nested
one that it flattened, and on a table-of-contents entry that repeats the one before it. Skipped where the ``docs`` extra
(mkdocs, mkdocs-material, mkdocstrings) is not installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]

ROLE = re.compile(r":(?:py:)?(?:func|mod|meth|class|attr|obj|exc|data|const|ref|doc):")
"""A Sphinx cross-reference role as it shows in rendered text (its target becomes a <code> after it)."""

LIST_IN_PARAGRAPH = re.compile(r"\n[ \t]*(?:[-*+]|\d{1,2}[.)])[ \t]+\S")
"""A line that starts like a list item inside one paragraph: the list was not recognised."""

NESTED_TOO_SHALLOW = re.compile(r"^ {1,3}(?:[-*+]|\d{1,2}[.)]) ")
"""A list item indented 1-3 spaces in a Markdown source, which Python-Markdown does not nest."""


class _Page(HTMLParser):
    """The links, anchors, paragraphs and table-of-contents labels of one built page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.paragraphs: list[str] = []
        self.text: list[str] = []
        self.toc: list[list[str]] = []  # the labels of each table of contents (Material renders it twice)
        self._paragraph: list[str] | None = None
        self._skip = 0  # depth inside <script>/<style>/<code>/<pre>: not prose
        self._toc_depth = 0  # depth inside the secondary navigation (the page's table of contents)
        self._toc_label: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {k: v or "" for k, v in attrs}
        if "id" in attr:
            self.ids.add(attr["id"])
        if tag == "a" and "name" in attr:
            self.ids.add(attr["name"])
        for key in ("href", "src"):
            if attr.get(key) and tag in ("a", "img", "link", "script", "source"):
                self.links.append(attr[key])
        if tag in ("script", "style", "code", "pre"):
            self._skip += 1
        if tag == "p" and self._skip == 0:
            self._paragraph = []
        if tag == "nav" and "md-nav--secondary" in attr.get("class", ""):
            self._toc_depth = 1
            self.toc.append([])
        elif tag == "nav" and self._toc_depth:
            self._toc_depth += 1
        if self._toc_depth and tag == "a":
            self._toc_label = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "code", "pre"):
            self._skip = max(0, self._skip - 1)
        if tag == "p" and self._paragraph is not None:
            self.paragraphs.append("".join(self._paragraph))
            self._paragraph = None
        if tag == "a" and self._toc_label is not None:
            self.toc[-1].append(" ".join("".join(self._toc_label).split()))
            self._toc_label = None
        if tag == "nav" and self._toc_depth:
            self._toc_depth -= 1

    def handle_data(self, data: str) -> None:
        if self._toc_label is not None:
            self._toc_label.append(data)
        if self._skip:
            return
        self.text.append(data)
        if self._paragraph is not None:
            self._paragraph.append(data)


@dataclass
class _Site:
    root: Path
    """The folder the site was built into."""
    pages: dict[Path, _Page]
    """Every page, parsed, by its path inside ``root``."""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> _Site:
    """The site built from this checkout."""
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason=f"{module} is not installed (the docs extra: pip install '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT / "src")},
    )
    warnings = [line for line in build.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert build.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(
        warnings or build.stderr.splitlines()[-20:]
    )
    pages = {}
    for path in sorted(out.rglob("*.html")):
        page = _Page()
        page.feed(path.read_text(encoding="utf-8"))
        pages[path.relative_to(out)] = page
    assert {Path("index.html"), Path("api/layers.html"), Path("api/tools.html")} <= set(pages), sorted(pages)
    return _Site(out.resolve(), pages)


def test_no_raw_sphinx_roles(site: _Site) -> None:
    found = []
    for path, page in site.pages.items():
        text = "".join(page.text)
        for match in ROLE.finditer(text):
            found.append(f"{path}: ...{' '.join(text[max(0, match.start() - 40) : match.end() + 40].split())}...")
    assert not found, f"{len(found)} raw role(s); write [`name`][batchnorm.name] instead:\n" + "\n".join(found)


def test_internal_links_resolve(site: _Site) -> None:
    root = site.root
    broken = []
    for path, page in site.pages.items():
        if path == Path("404.html"):
            continue  # served by a web server in place of a missing page at any depth: root-absolute links by design
        for link in page.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith("//"):
                continue  # external (http:, mailto:, data:, ...)
            target = (root / path).parent / unquote(parts.path) if parts.path else root / path
            target = target.resolve()
            if not target.is_relative_to(root):
                broken.append(f"{path}: {link} leaves the site")
            elif target.is_dir():
                broken.append(f"{path}: {link} is a folder (a directory listing when opened from disk)")
            elif not target.is_file():
                broken.append(f"{path}: {link} has no target file")
            elif parts.fragment and target.suffix == ".html":
                defined = site.pages.get(target.relative_to(root))
                if defined is not None and unquote(parts.fragment) not in defined.ids:
                    broken.append(f"{path}: {link}: no element with id {parts.fragment!r}")
    assert not broken, f"{len(broken)} broken internal link(s):\n" + "\n".join(sorted(set(broken)))


def test_lists_are_not_joined_into_paragraphs(site: _Site) -> None:
    joined = []
    for path, page in site.pages.items():
        for paragraph in page.paragraphs:
            match = LIST_IN_PARAGRAPH.search(paragraph)
            if match:
                start = " ".join(paragraph[: match.start()].split())[-60:]
                joined.append(f"{path}: ...{start} / {' '.join(match.group().split())}...")
    assert not joined, (
        f"{len(joined)} list(s) rendered as one paragraph; put a blank line before the first item:\n"
        + "\n".join(joined)
    )


def test_nested_lists_indent_four_spaces() -> None:
    # Python-Markdown reads a nested list only at 4 spaces: at 1-3 it flattens it into the outer list
    flattened = []
    for path in sorted((ROOT / "docs").rglob("*.md")):
        fenced = False
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.lstrip().startswith(("```", "~~~")):
                fenced = not fenced
            elif not fenced and NESTED_TOO_SHALLOW.match(line):
                flattened.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not flattened, "nested list items indented less than 4 spaces:\n" + "\n".join(flattened)


def test_table_of_contents_has_no_repeated_entries(site: _Site) -> None:
    def key(label: str) -> str:
        return re.sub(r"[^a-z0-9]", "", label.lower())

    repeated = []
    for path, page in site.pages.items():
        labels = page.toc[0] if page.toc else []
        for before, label in zip(labels, labels[1:]):
            if key(before) == key(label) and key(label):
                repeated.append(f"{path}: {before!r} then {label!r}")
    assert not repeated, "table-of-contents entries that repeat the one before:\n" + "\n".join(repeated)
