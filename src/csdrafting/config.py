"""``CascadeConfig``: the one description of a cascade, validated when built and frozen.

It is what ``csd tune`` writes, what ``--config`` reads, what bench methods and tune candidates
are, and what ``Cascade`` receives. Every value a user can get wrong is checked in the
constructor, before any model loads, and raises ``ConfigError``.

A configuration file is its JSON form::

    {
      "target": "models/pycode-22m",
      "drafters": ["models/pycode-5m"],
      "mag": true,
      "k_matrix": [[3, 5], [0, 3]],
      "lenience": 1.0,
      "adaptive": false
    }

Relative model paths are resolved against the file's folder first, then the working directory.
``backend`` ("torch" or "llama.cpp") says how HF folders load; a ``.gguf`` path always loads with
llama.cpp, so levels of both backends can mix. ``drafter_outtype`` is the GGUF type HF drafter
folders are converted to on llama.cpp (the target keeps its own precision). ``kernel`` picks the lean
runner's matmul kernels: ``"auto"`` (time them on this machine, cached) or one name for every matmul.
``drafter_window`` (an int, or null) has every neural drafter read only the last that many prompt
tokens (``levels/window.py``): less drafter prefill, the same output (the target verifies).
Unknown keys are an error (a typo must not silently fall back to a default).

``k_matrix="auto"`` (the default) is resolved into explicit values in one place,
``CascadeConfig.resolve``: the default starting K-matrix for the levels, adapted online, with
MaG first at ``AUTO_MAG_FIRST``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .convert import OUTTYPES  # the GGUF types a drafter may be converted to
from .errors import ConfigError
from .kmatrix import KMatrix

AUTO = "auto"
DEFAULT_TREE_BUDGET = 16  # tree=True: max draft-tree nodes (pycode-22m turns compute-bound near 16 on a CPU)
AUTO_MAG_FIRST = 3  # with k_matrix="auto": a MaG match of 3+ tokens drafts alone (docs/bench.md: ablation)
DTYPE_NAMES = ("float32", "float64", "bfloat16", "float16")
RUNNERS = ("auto", "lean", "transformers")  # how the torch backend runs a model's forward
BACKENDS = ("torch", "llama.cpp")  # a .gguf level always runs on llama.cpp (backends.py)
# the lean runner's matmul kernels: "auto" times them on this machine, a name forces one (levels/kernels.py)
KERNELS = ("auto", "linear", "onednn", "transposed", "packed")


@dataclass(frozen=True)
class CascadeConfig:
    """Which levels a cascade uses and how it drafts with them.

    ``target`` and ``drafters`` are model folders (or, for levels built in memory, level names);
    drafters are listed largest first. ``k_matrix`` is ``"auto"`` or explicit rows (see
    ``kmatrix.py``; its size must be the number of drafters plus one for MaG when on).
    ``adaptive`` (default: on with ``"auto"``) adapts draft lengths online; ``mag_first`` lets a
    MaG suffix match of that many tokens draft alone for a step (default: ``AUTO_MAG_FIRST``
    with ``"auto"``, off otherwise). ``tree`` lets the target verify a token tree (the chain plus
    the candidates worth their measured cost, ``tree.py``) of at most ``tree_budget`` nodes
    (default ``DEFAULT_TREE_BUDGET``); it needs MaG. ``drafter_window`` (default None: the whole prompt)
    has every neural drafter read only the last that many prompt tokens (and all it generates):
    cheaper drafter prefill, never a different output, since the target verifies every token.
    """

    target: str | None = None
    drafters: tuple[str, ...] = ()
    mag: bool = True
    k_matrix: tuple[tuple[int, ...], ...] | str = AUTO
    lenience: float = 1.0
    adaptive: bool | None = None
    mag_first: int | str | None = None  # a match length, or "auto": where it pays (payoff.py)
    bigram: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    runner: str = "auto"
    kernel: str = AUTO  # the lean runner's matmul kernel; the CLI takes its default from $CSDRAFTING_KERNEL
    backend: str = "torch"
    drafter_outtype: str | None = None  # GGUF type of converted drafters; None: gguf_cache's default
    tree: bool = False
    tree_budget: int | None = None
    drafter_window: int | None = None  # drafters read only the last N prompt tokens (levels/window.py)

    def __post_init__(self) -> None:
        # normalise in place (the dataclass is frozen, hence object.__setattr__) and validate
        set_field = object.__setattr__
        set_field(self, "target", _path_or_none("target", self.target))
        set_field(self, "drafters", _drafter_tuple(self.drafters))
        set_field(self, "bigram", _path_or_none("bigram", self.bigram))
        _check_bool("mag", self.mag)
        if self.adaptive is not None:
            _check_bool("adaptive", self.adaptive)
        set_field(self, "k_matrix", _k_matrix_value(self.k_matrix, self.num_drafting_levels))
        set_field(self, "lenience", _lenience(self.lenience))
        _check_mag_first(self.mag_first)
        _check_choice("dtype", self.dtype, DTYPE_NAMES)
        _check_choice("runner", self.runner, RUNNERS)
        _check_choice("kernel", self.kernel, KERNELS)
        _check_choice("backend", self.backend, BACKENDS)
        if self.drafter_outtype is not None:
            _check_choice("drafter_outtype", self.drafter_outtype, OUTTYPES)
        _check_device(self.device)
        _check_tree(self.tree, self.tree_budget, self.mag)
        _check_drafter_window(self.drafter_window)

    @property
    def num_drafting_levels(self) -> int:
        """Neural drafters plus MaG when on: the K-matrix's size."""
        return len(self.drafters) + int(self.mag)

    @property
    def is_auto(self) -> bool:
        return self.k_matrix == AUTO

    def resolve(self) -> ResolvedConfig:
        """``"auto"`` and the ``None`` defaults made explicit: what the step and schedule run."""
        if self.is_auto:
            k_matrix = KMatrix.default(len(self.drafters), self.mag)
        else:
            k_matrix = KMatrix(self.k_matrix)
        adaptive = self.is_auto if self.adaptive is None else self.adaptive
        mag_first = self.mag_first
        if mag_first is None and self.is_auto:
            mag_first = AUTO_MAG_FIRST
        if not self.mag or k_matrix.size == 0:
            mag_first = None  # nothing to gate (MaG off, or plain decoding)
        tree_budget = (self.tree_budget or DEFAULT_TREE_BUDGET) if self.tree else None
        return ResolvedConfig(k_matrix, self.lenience, adaptive, mag_first, tree_budget)

    # -- files -----------------------------------------------------------------------------------

    def as_dict(self) -> dict:
        data = asdict(self)
        data["drafters"] = list(self.drafters)
        if not self.is_auto:
            data["k_matrix"] = [list(row) for row in self.k_matrix]
        return data

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict, base: Path | None = None, defaults: dict | None = None) -> CascadeConfig:
        """``defaults``: values for fields ``data`` does not give (the edge's, e.g. from the
        environment: ``edge.config_defaults``), before the dataclass's own defaults."""
        if not isinstance(data, dict):
            raise ConfigError("a cascade configuration must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown configuration keys {unknown}; known keys: {sorted(known)}")
        data = {**(defaults or {}), **data}
        if data.get("k_matrix") is None or data.get("k_matrix") == "default":
            data["k_matrix"] = AUTO  # older files wrote null (or "default") for the automatic schedule
        if data.get("target") is not None:
            data["target"] = _resolve_path(data["target"], base)
        if "drafters" in data:
            if not isinstance(data["drafters"], list):
                raise ConfigError("'drafters' must be a list of model folders")
            data["drafters"] = [_resolve_path(p, base) for p in data["drafters"]]
        if data.get("bigram") is not None:
            data["bigram"] = _resolve_path(data["bigram"], base)
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path, defaults: dict | None = None) -> CascadeConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"configuration {path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
        return cls.from_dict(data, base=path.parent, defaults=defaults)


@dataclass(frozen=True)
class ResolvedConfig:
    """The drafting settings with nothing left automatic."""

    k_matrix: KMatrix
    lenience: float
    adaptive: bool
    mag_first: int | None
    tree_budget: int | None = None  # None: the target verifies chains


# -- validation helpers --------------------------------------------------------------------------


def _path_or_none(name: str, value) -> str | None:
    if value is None:
        return None
    if isinstance(value, Path):
        return str(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a path (a non-empty string), got {value!r}")
    return value


def _drafter_tuple(value) -> tuple[str, ...]:
    if isinstance(value, (str, Path)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"drafters must be a list of model folders (largest first), got {value!r}")
    return tuple(_path_or_none("each drafter", item) for item in value)


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


def _k_matrix_value(value, num_drafting: int) -> tuple[tuple[int, ...], ...] | str:
    if value is None:
        return AUTO
    if isinstance(value, str) and value.strip() in (AUTO, "default"):
        return AUTO
    return KMatrix.parse(value, num_drafting).rows


def _lenience(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"lenience must be a number >= 1, got {value!r}")
    if value < 1:
        raise ConfigError(f"lenience must be >= 1 (1 is strict review), got {value}")
    return float(value)


def _check_mag_first(value) -> None:
    if value is None or value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f'mag_first must be a positive integer (a match length), "auto" or None, got {value!r}')


def _check_drafter_window(value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"drafter_window must be a positive integer (prompt tokens) or None, got {value!r}")


def _check_tree(tree, budget, mag: bool) -> None:
    _check_bool("tree", tree)
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ConfigError(f"tree_budget must be a positive integer (draft-tree nodes) or None, got {budget!r}")
        if not tree:
            raise ConfigError("tree_budget needs tree=true")
    if tree and not mag:
        raise ConfigError("tree=true needs MaG (mag=true): the tree's alternative branches come from MaG")


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _check_device(value) -> None:
    """The device's spelling; whether CUDA is present is checked when models load."""
    if not isinstance(value, str):
        raise ConfigError(f"device must be a string such as 'cpu', 'cuda' or 'cuda:1', got {value!r}")
    kind, _, index = value.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise ConfigError(f"unknown device {value!r} (use 'cpu', 'cuda' or 'cuda:N')")


def _resolve_path(value, base: Path | None) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"model paths must be strings, got {value!r}")
    path = Path(value)
    if not path.is_absolute() and base is not None and (base / path).exists():
        return str(base / path)
    return str(path)
