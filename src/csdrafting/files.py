"""Files the package writes or expects: the one cache folder, the one atomic write, the one
"file not found" check.

Atomic means a reader (another process, or this one after a crash) sees the old file or the whole
new one, never half of it: the bytes go to a temporary file in the same folder (so the rename
stays on one file system) and ``os.replace`` puts it under its final name in one step.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import ModelLoadError


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/csdrafting``, or ``~/.cache/csdrafting``: kernel times, plans, GGUFs."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "csdrafting"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Have ``write(temporary)`` fill a temporary file beside ``path``, then rename it to ``path``.
    The folder is created if needed; on any error the temporary file is removed and the error
    raised (``path`` is then untouched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)  # atomic: readers see no file, the old one or the whole new one
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)  # gone already after a successful replace
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda temporary: temporary.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def require_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a ``Path`` if it is a file, else ``ModelLoadError("<what> not found: <path>")``."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{what} not found: {path}")
    return path
