#!/usr/bin/env python
"""Cut the benchmark prompt set from the running interpreter's standard library.

The pycode models never saw the standard library (models/README.md), so its files are held-out
Python for the benchmark. The cut is deterministic: a fixed list of modules, each read at a fixed
fraction of its length, moved forward to the next line that starts a ``def``, then whole lines
until the excerpt holds at least ``MIN_CHARS`` characters (never more than ``MAX_CHARS``).

The excerpts depend on the exact standard library, so every record carries the Python version it
was cut from; ``--check`` regenerates the set and compares it with the committed file.

    python scripts/make_prompts.py                  # writes benchmarks/prompts.jsonl
    python scripts/make_prompts.py --check          # exit 1 if the committed file differs
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "benchmarks" / "prompts.jsonl"

# Sorted, fixed; 10 modules of everyday Python with long function bodies.
MODULES = [
    "argparse",
    "calendar",
    "configparser",
    "difflib",
    "fractions",
    "heapq",
    "pathlib",
    "shlex",
    "statistics",
    "textwrap",
]
OFFSET_FRACTION = 0.4  # where in each file the search for a ``def`` starts
MIN_CHARS = 1500  # stop adding lines once the excerpt is this long ...
MAX_CHARS = 2000  # ... and never exceed this (a line that would is left out)
FLOOR_CHARS = 1200  # an excerpt shorter than this is an error (the file changed shape)


def excerpt(source: str) -> tuple[str, int, int]:
    """(text, first line, last line) of the excerpt of one file; lines are 1-based, inclusive."""
    lines = source.splitlines(keepends=True)
    offset = int(len(source) * OFFSET_FRACTION)
    position = 0
    first = 0
    while first < len(lines) and position < offset:  # the first line starting at or after offset
        position += len(lines[first])
        first += 1
    while first < len(lines) and not lines[first].lstrip().startswith("def "):
        first += 1
    if first == len(lines):
        raise SystemExit("no 'def' after the offset")
    total = 0
    last = first
    while last < len(lines) and total < MIN_CHARS and total + len(lines[last]) <= MAX_CHARS:
        total += len(lines[last])
        last += 1
    while last > first + 1 and not lines[last - 1].strip():  # do not end on blank lines
        last -= 1
    text = "".join(lines[first:last])
    if len(text) < FLOOR_CHARS:
        raise SystemExit(f"excerpt of {len(text)} characters is shorter than {FLOOR_CHARS}")
    return text, first + 1, last


def build() -> list[dict]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    records = []
    for module in MODULES:
        path = stdlib / (module.replace(".", "/") + ".py")
        text, first, last = excerpt(path.read_text(encoding="utf-8"))
        records.append(
            {
                "id": f"stdlib-{module}",
                "text": text,
                "source": f"{path.relative_to(stdlib)}:{first}-{last}",
                "python": platform.python_version(),
            }
        )
    return records


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"default: {DEFAULT_OUTPUT}")
    parser.add_argument("--check", action="store_true", help="compare with the existing file instead of writing")
    args = parser.parse_args(argv)
    content = render(build())
    if args.check:
        existing = args.output.read_text(encoding="utf-8") if args.output.is_file() else ""
        if existing != content:
            recorded = json.loads(existing.splitlines()[0]).get("python") if existing else None
            print(
                f"{args.output} differs from a fresh cut (file cut with Python {recorded}, "
                f"this is Python {platform.python_version()})",
                file=sys.stderr,
            )
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(content, encoding="utf-8")
    print(f"wrote {args.output}: {content.count(chr(10))} prompts from Python {platform.python_version()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
