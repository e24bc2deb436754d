"""Every Python example of the docs site, and of the README, runs.

Each page of `docs/` (and `README.md`) is one test: its Python code blocks
run in page order, in one namespace (a module named after the page, as a
user's script would be), in a fresh folder. A block that cannot run (a
sketch, a placeholder path) says so on the line before it,
`<!-- not run: why -->`, and there are few of them. The docstrings'
examples run as doctests (`--doctest-modules`).
"""

import dataclasses
import pathlib
import re
import sys
import types

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
NOT_RUN = re.compile(r"<!-- not run: (?P<why>.+) -->")
# Blocks marked not to run, at most.
MOST_NOT_RUN = 4


@dataclasses.dataclass(frozen=True)
class Block:
    """A Python code block of a page: its first line, code and mark."""

    line: int
    code: str
    not_run: str | None


def blocks(page: pathlib.Path) -> list[Block]:
    """The Python code blocks of `page`, in order (also those indented in
    a list item)."""
    lines = page.read_text().splitlines()
    found = []
    i = 0
    while i < len(lines):
        fence = re.fullmatch(r"(\s*)```python", lines[i])
        if fence is None:
            i += 1
            continue
        indent = len(fence.group(1))
        end = i + 1
        while lines[end].strip() != "```":
            end += 1
        code = "\n".join(line[indent:] for line in lines[i + 1 : end])
        before = lines[i - 1].strip() if i else ""
        mark = NOT_RUN.fullmatch(before)
        found.append(Block(i + 2, code, mark and mark.group("why")))
        i = end + 1
    return found


def _name(page: pathlib.Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_page_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stem = re.sub(r"\W", "_", _name(page).removesuffix(".md"))
    module = types.ModuleType(f"docs_{stem}")
    module.__file__ = str(page)
    sys.modules[module.__name__] = module
    try:
        for block in blocks(page):
            if block.not_run is None:
                code = compile(block.code, f"{page}:{block.line}", "exec")
                exec(code, module.__dict__)  # noqa: S102
    finally:
        del sys.modules[module.__name__]
        keras.distribution.set_distribution(None)


def test_few_blocks_are_marked_not_to_run():
    marked = [
        f"{_name(page)}:{block.line}: {block.not_run}"
        for page in PAGES
        for block in blocks(page)
        if block.not_run is not None
    ]
    print("\n".join(marked))
    assert len(marked) <= MOST_NOT_RUN, marked


def test_every_guide_has_examples_that_run():
    # The guides without Python: commands for other backends, and R.
    commands_only = {"docs/guides/backends.md", "docs/guides/r.md"}
    without = [
        _name(page)
        for page in sorted((DOCS / "guides").glob("*.md"))
        if not any(block.not_run is None for block in blocks(page))
    ]
    assert without == sorted(commands_only)


def test_blocks_are_found():
    # A check of the check: a page's blocks, indented ones and marks too.
    page = DOCS / "guides" / "nnx.md"
    found = blocks(page)
    assert len(found) >= 3
    assert any(block.code.startswith("class Sowing") for block in found)
    marked = [b for p in PAGES for b in blocks(p) if b.not_run]
    assert all(block.not_run.strip() for block in marked)


def test_the_readme_links_to_pages_that_exist():
    # `mkdocs build --strict` checks the site's links; the README's here.
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme)
    assert links, "the README links into the documentation"
    assert [link for link in links if not (ROOT / link).exists()] == []
