"""Reading JSON Lines files (prompt sets, benchmark results) with errors that name the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .errors import ConfigError


def read_jsonl(path: str | Path, what: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line of ``path``; ``what`` names the file
    in the error raised when it cannot be read."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
