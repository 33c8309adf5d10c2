"""Every ```python block of README.md and docs/**/*.md runs as written (tests/test_docs_site.py builds the site).

Each block runs on its own, in a fresh namespace, in a temporary working directory. A block
preceded by the line ``<!-- skip -->`` is not run (for the few that need several processes);
one preceded by ``<!-- slow -->`` is marked ``slow``.

Run: .venv/bin/python -m pytest -q tests/test_docs_examples.py
"""

from __future__ import annotations

import linecache
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<ticks>`{3,})\s*(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Block:
    path: str
    line: int
    code: str
    marker: str | None  # "skip", "slow" or None


def extract_blocks(text: str, path: str) -> list[Block]:
    """The fenced ```python blocks of a Markdown text, with the marker comment before each."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    previous = ""  # the last non-blank line before the current one
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        ticks, info, start = m["ticks"], m["info"].strip(), i
        body: list[str] = []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(ticks) and lines[i].strip().strip("`") == ""):
            body.append(lines[i][len(m["indent"]) :] if lines[i].startswith(m["indent"]) else lines[i])
            i += 1
        i += 1  # the closing fence
        language = info.split()[0].lower() if info else ""
        if language in ("python", "py"):
            marker = re.fullmatch(r"<!--\s*(skip|slow)\s*-->", previous)
            blocks.append(Block(path, start + 1, "\n".join(body) + "\n", marker[1] if marker else None))
        previous = ""
    return blocks


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _all_blocks() -> list[Block]:
    out: list[Block] = []
    for path in _markdown_files():
        out += extract_blocks(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    return out


BLOCKS = _all_blocks()


def _param(block: Block) -> object:
    marks = []
    if block.marker == "skip":
        marks.append(pytest.mark.skip(reason="marked <!-- skip --> in the page"))
    elif block.marker == "slow":
        marks.append(pytest.mark.slow)
    return pytest.param(block, id=f"{block.path}:{block.line}", marks=marks)


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS])
def test_example_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    name = f"{block.path}:{block.line}"
    linecache.cache[name] = (len(block.code), None, block.code.splitlines(True), name)  # readable tracebacks
    code = compile(block.code, name, "exec")
    with warnings.catch_warnings():
        # torch's own internals deprecate each other (torch.compile touches torch.jit); every other
        # warning stays an error, as in the rest of the suite
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch(\.|$)")
        exec(code, {"__name__": "__docs_example__"})


def test_examples_are_found_and_rarely_skipped() -> None:
    """The extractor sees the README's usage example and the pages' examples; skips stay rare
    (the examples that need several processes or a CUDA device)."""
    readme = [b for b in BLOCKS if b.path == "README.md"]
    assert readme and "batchnorm.convert" in readme[0].code
    assert len({b.path for b in BLOCKS}) >= 5
    skipped = [b for b in BLOCKS if b.marker == "skip"]
    assert len(skipped) <= max(3, len(BLOCKS) // 10), [f"{b.path}:{b.line}" for b in skipped]


def test_extractor_honours_fences_and_markers() -> None:
    text = "\n".join(
        [
            "```python",
            "a = 1",
            "```",
            "<!-- skip -->",
            "",
            '```python title="several processes"',
            "b = 2",
            "```",
            "````markdown",
            "```python",
            "not_a_block = 3",
            "```",
            "````",
            "```sh",
            "echo no",
            "```",
            "<!-- slow -->",
            "```py",
            "c = 3",
            "```",
        ]
    )
    blocks = extract_blocks(text, "x.md")
    assert [(b.code, b.marker, b.line) for b in blocks] == [
        ("a = 1\n", None, 1),
        ("b = 2\n", "skip", 6),
        ("c = 3\n", "slow", 18),
    ]


def test_readme_links_resolve() -> None:
    """README.md is read outside the site (mkdocs does not check it): its relative links exist."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
    assert targets
    missing = [t for t in targets if t and not (ROOT / t).exists()]
    assert not missing, missing
