"""Prompt sets: JSON Lines files of ``{"id": ..., "text": ...}`` objects, shared by ``csd bench``
and ``csd tune``. The committed set (stdlib excerpts, unseen by the pycode family) is made by
``scripts/make_prompts.py``."""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError
from .jsonl import read_jsonl
from .paths import DEFAULT_PROMPTS_FILE

__all__ = ["DEFAULT_PROMPTS_FILE", "load_prompts"]


def load_prompts(path: str | Path, num_prompts: int | None = None) -> list[dict]:
    """Prompts from a JSONL file of objects with ``id`` and ``text`` (other fields are kept)."""
    path = Path(path)
    prompts = []
    for number, record in read_jsonl(path, "prompts file"):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"]:
            raise ConfigError(f"{path}:{number}: each line must be an object with a non-empty 'text'")
        record.setdefault("id", f"prompt-{len(prompts)}")
        record["id"] = str(record["id"])
        prompts.append(record)
    ids = [p["id"] for p in prompts]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{path}: prompt ids must be unique")
    if not prompts:
        raise ConfigError(f"{path} holds no prompts")
    if num_prompts is not None:
        if num_prompts < 1:
            raise ConfigError(f"--num-prompts must be >= 1, got {num_prompts}")
        prompts = prompts[:num_prompts]
    return prompts
