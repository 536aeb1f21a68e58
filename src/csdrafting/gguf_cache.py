"""HF model folders converted to GGUF once, and reused: the cache behind ``backend="llama.cpp"``.

An HF folder on llama.cpp is converted (``convert.py``) on first use to a GGUF in
``$XDG_CACHE_HOME/csdrafting/gguf/``. The target keeps the precision it runs in (``dtype``, float32
by default, so f32); drafters get ``drafter_outtype`` (default ``DEFAULT_DRAFTER_OUTTYPE``).

Cache key: a SHA-256 over the bytes of every file in the folder (names included), the output
type and ``CONVERTER_VERSION``. Reading the bytes costs ~0.1 s for pycode-22m's 88 MB, and unlike
size + mtime it cannot miss an edit that keeps both. ``convert`` writes a temporary
file beside the final name and renames it into place (``files.atomic_write``), so a killed process
never leaves a corrupt GGUF under the final name, and two processes converting at once both end
with a whole file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .convert import OUTTYPES
from .errors import ConfigError, ModelLoadError
from .files import atomic_write, cache_dir

# Drafters may be approximate (the target verifies every token), so they get the fastest type.
# Measured in phase 1 (scripts/llamacpp_costs.py, AMD EPYC, 2 threads, one-token forward):
# pycode-5m q8_0 0.80 ms vs f32 1.14 ms; pycode-1m q8_0 0.45 ms vs f32 0.48 ms -> q8_0.
DEFAULT_DRAFTER_OUTTYPE = "q8_0"
# bump when convert.py's output changes for the same folder, so old cached files are not reused
CONVERTER_VERSION = 1
# CascadeConfig.dtype -> the GGUF type a converted target computes in
_TARGET_OUTTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f32"}


def gguf_cache_dir() -> Path:
    return cache_dir() / "gguf"


def folder_key(folder: Path, outtype: str) -> str:
    """Hash of the folder's content (every file's name and bytes), the outtype and the converter."""
    digest = hashlib.sha256(f"csd-gguf:{CONVERTER_VERSION}:{outtype}".encode())
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(b"\0" + file.name.encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:20]


def target_outtype(dtype: str) -> str:
    """The GGUF type of a converted target: the precision the torch backend would run it in
    (``CascadeConfig.dtype``, float32 by default), so the target is exact whatever its drafters.
    (The pycode folders store bf16 weights; float32 holds them exactly and computes as torch does.)"""
    return _TARGET_OUTTYPES[dtype]


def cached_gguf(folder: str | os.PathLike, outtype: str, cache: Path | None = None) -> Path:
    """The GGUF of HF ``folder`` in ``outtype``, converted on first use and reused afterwards."""
    from .convert import convert

    if outtype not in OUTTYPES:
        raise ConfigError(f"unknown outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder not found: {folder}")
    cache = cache or gguf_cache_dir()
    path = cache / f"{folder.name}-{outtype}-{folder_key(folder, outtype)}.gguf"
    if path.is_file():
        return path
    # the cache's own atomic write, whatever the converter does: no half-written GGUF under this name
    return atomic_write(path, lambda temporary: convert(folder, temporary, outtype))
