"""The README and docs/ stay true to the tree: every relative link resolves, and the map of the
code in docs/architecture.md names exactly the modules of src/csdrafting (the README's shorter
map names only modules that exist)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "csdrafting"
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def outside_fences(md: Path):
    """(line number, line) of a markdown file, code blocks left out."""
    fence = False
    for number, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            fence = not fence
        elif not fence:
            yield number, line


def heading_slugs(md: Path) -> set[str]:
    """GitHub's anchors of a page's headings (lower case, punctuation dropped, spaces to dashes)."""
    out, seen = set(), {}
    for _, line in outside_fences(md):
        if not re.match(r"#{1,6} ", line):
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", line.lstrip("#").strip())
        slug = "".join(c for c in text.lower() if c.isalnum() or c in " -_").replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def broken_links(files: list[Path]) -> list[str]:
    broken = []
    for md in files:
        for number, line in outside_fences(md):
            for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
                if re.match(r"[a-z]+:", target):
                    continue  # a URL, not a file of the tree
                path, _, anchor = target.partition("#")
                destination = (md.parent / path).resolve() if path else md
                if not destination.exists():
                    broken.append(f"{md.name}:{number}: missing {target}")
                elif anchor and destination.suffix == ".md" and anchor not in heading_slugs(destination):
                    broken.append(f"{md.name}:{number}: no heading #{anchor} in {destination.name}")
    return broken


def test_every_relative_link_resolves():
    assert broken_links(markdown_files()) == []


def test_the_link_check_catches_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# Title\n")
    page = tmp_path / "page.md"
    page.write_text("[a](other.md#title) [b](other.md#nope) [c](gone.md) `[d](gone.md)`\n")
    assert broken_links([page]) == ["page.md:1: no heading #nope in other.md", "page.md:1: missing gone.md"]


def package_modules() -> set[str]:
    return {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}


def mapped_modules(md: Path) -> set[str]:
    """The ``.py`` names a map's code block lists under ``src/csdrafting/``, with their folder."""
    text = md.read_text(encoding="utf-8")
    block = text[text.index("src/csdrafting/\n") :]
    block = block[: block.index("```")]
    found, folder = set(), ""
    for line in block.splitlines()[1:]:
        match = re.match(r"( +)(\S+)", line)
        if not match:
            continue
        indent, name = len(match.group(1)), match.group(2)
        if indent == 2:
            folder = name if name.endswith("/") else ""
            if name.endswith(".py"):
                found.add(name)
        elif name.endswith(".py") and folder:
            found.add(folder + name)
    return found


def test_the_architecture_map_names_every_module_and_no_other():
    mapped = mapped_modules(ROOT / "docs" / "architecture.md")
    modules = package_modules()
    assert sorted(modules - mapped) == [] and sorted(mapped - modules) == []


def test_the_readme_map_names_only_modules_that_exist():
    mapped = mapped_modules(ROOT / "README.md")
    assert len(mapped) > 20 and sorted(mapped - package_modules()) == []
