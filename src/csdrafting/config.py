"""Cascade configuration files (JSON): what `csd tune` writes and `csd generate --config`,
`csd bench --config`, `csd serve --config` and ``Cascade.from_config`` read.

Example::

    {
      "target": "models/pycode-22m",
      "drafters": ["models/pycode-5m"],
      "mag": true,
      "k_matrix": [[3, 5], [0, 3]],
      "lenience": 1.0,
      "adaptive": false
    }

Relative model paths are resolved against the file's folder first, then the working directory.
Unknown keys are an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import ConfigError


@dataclass(frozen=True)
class CascadeConfig:
    target: str | None = None
    drafters: list[str] = field(default_factory=list)
    mag: bool = True
    k_matrix: list[list[int]] | str | None = None  # None / "auto": default start + online adaptation
    lenience: float = 1.0
    adaptive: bool | None = None
    mag_first: int | None = None  # MaG drafts alone after a suffix match this long (None: off)
    bigram: str | None = None
    device: str = "cpu"
    dtype: str = "float32"

    def as_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict, base: Path | None = None) -> CascadeConfig:
        if not isinstance(data, dict):
            raise ConfigError("a cascade configuration must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown configuration keys {unknown}; known keys: {sorted(known)}")
        data = dict(data)
        if data.get("target") is not None:
            data["target"] = _resolve(data["target"], base)
        if "drafters" in data:
            if not isinstance(data["drafters"], list):
                raise ConfigError("'drafters' must be a list of model folders")
            data["drafters"] = [_resolve(p, base) for p in data["drafters"]]
        if data.get("bigram") is not None:
            data["bigram"] = _resolve(data["bigram"], base)
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> CascadeConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"configuration {path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
        return cls.from_dict(data, base=path.parent)


def _resolve(value, base: Path | None) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"model paths must be strings, got {value!r}")
    path = Path(value)
    if not path.is_absolute() and base is not None and (base / path).exists():
        return str(base / path)
    return str(path)
