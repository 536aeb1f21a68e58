"""The benchmark's methods and suites: plain data, read from ``benchmarks/suite.json``.

A *method* is one way of generating (a transformers peer or one of our cascade configurations);
a *suite* is a list of methods plus run settings (modes, generation lengths). Methods are
defined once, under ``methods``, and suites refer to them by name, so tuning a configuration
(say ``csd-full``'s K-matrix) changes it everywhere it is used.

A method spec is a JSON object:

* ``engine``: ``"transformers"`` or ``"llama.cpp"`` (peers) or ``"csd"`` (ours; the default).
* transformers: ``assistant`` (a drafter's name: assisted generation), ``prompt_lookup_num_tokens``
  (prompt lookup decoding), ``generate_options`` (more keyword arguments for ``model.generate``).
* llama.cpp: llama-cpp-python's ``Llama.generate`` on the target's GGUF; ``prompt_lookup_num_tokens``
  (its ``LlamaPromptLookupDecoding`` as draft model).
* llama-server: llama.cpp's own server on the target's GGUF, timed through its HTTP API
  (``llama_server_peer.py``); ``spec_type`` (its ``--spec-type``, e.g. ``"ngram-mod"``; null: plain)
  and ``draft_model`` (a drafter's name, ``"smallest"`` or ``"largest"``: its ``-md``).
* csd: ``drafters`` (a list of drafter names, largest first, or ``"all"``: the default), ``mag``
  (default true), ``k_matrix`` (JSON rows, the shorthand string, or ``"auto"``: the default, a
  starting matrix adapted online), ``lenience`` (default 1.0), ``adaptive`` (true / false / null:
  the library's choice, on for ``"auto"`` and off for an explicit matrix), ``runner``
  (``auto``/``lean``/``transformers``), ``backend`` (``torch`` / ``llama.cpp``: pins the method to
  one backend; without it the method runs on every backend the run selects, see ``build_suite``).
  ``drafter_window`` (drafters read only the last N prompt tokens: ``levels/window.py``);
  ``tree`` / ``tree_budget`` (the target verifies token trees: ``tree.py``).
* derived methods: ``like`` copies another method's spec, then ``without`` removes one drafting
  level (a drafter's name or ``"mag"``) from it, K-matrix included, and ``k00`` sets ``K[0][0]``.
* ``ablation``: a label; methods that carry one appear in the report's ablation plot.
* names may hold templates: ``{drafter}`` expands over the loaded drafters (their folder names),
  ``{k00}`` and ``{lenience}`` over the list given under that key.

Modes: ``greedy-fixed``, ``greedy-natural``, ``sampling-fixed``, ``sampling-natural``. A *fixed*
run ignores EOS so every method generates exactly ``max_new_tokens``; a *natural* run stops at EOS.
"""

from __future__ import annotations

import copy
import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..paths import DEFAULT_SUITE_FILE, PACKAGE_DIR

REPOSITORY_DIR = PACKAGE_DIR.parents[1]  # src/csdrafting -> the checkout (benchmarks/ lives there)

MODES = ("greedy-fixed", "greedy-natural", "sampling-fixed", "sampling-natural")
ENGINES = ("transformers", "csd", "llama.cpp", "llama-server")
BACKENDS = ("torch", "llama.cpp")
# where each peer runs
ENGINE_BACKENDS = {"transformers": "torch", "llama.cpp": "llama.cpp", "llama-server": "llama.cpp"}
LLAMA_SUFFIX = "@llama.cpp"  # a csd method's name on the llama.cpp backend
TEMPLATE_KEYS = ("drafter", "k00", "lenience")  # "{key}" in a name expands over these
_TRANSFORMERS_KEYS = {"assistant", "prompt_lookup_num_tokens", "generate_options"}
_LLAMA_KEYS = {"prompt_lookup_num_tokens"}
_LLAMA_SERVER_KEYS = {"spec_type", "draft_model"}
_CSD_KEYS = {
    "drafters",
    "mag",
    "k_matrix",
    "lenience",
    "adaptive",
    "mag_first",
    "runner",
    "backend",
    "drafter_window",
    "tree",
    "tree_budget",
}
_COMMON_KEYS = {"engine", "description", "ablation", "like", "without", "k00"}


@dataclass(frozen=True)
class Method:
    """One benchmarked way of generating. ``spec`` is the resolved JSON object (see module doc)."""

    name: str
    engine: str
    spec: dict = field(hash=False, compare=False)

    @property
    def ablation(self) -> str | None:
        return self.spec.get("ablation")

    @property
    def backend(self) -> str:
        """Where the method's models run: a peer's library, or a csd method's ``backend``."""
        return ENGINE_BACKENDS.get(self.engine) or self.spec.get("backend") or "torch"


@dataclass(frozen=True)
class Suite:
    name: str
    methods: tuple[Method, ...]
    modes: tuple[str, ...]
    lengths: tuple[int, ...]
    baseline: str  # the first backend's plain decoding
    description: str = ""
    baselines: dict = field(default_factory=dict, hash=False, compare=False)  # backend -> its baseline
    prompts: str | None = None  # the suite's prompt set (a workload), when it names one

    def baseline_of(self, method: Method) -> str:
        """The method greedy rows are compared with and speedups are over: its backend's plain decoding."""
        return self.baselines.get(method.backend, self.baseline)


def load_suite_file(path: str | Path | None) -> dict:
    path = Path(path) if path is not None else DEFAULT_SUITE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read suite file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"suite file {path} is not valid JSON: {exc}") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("methods"), dict)
        or not isinstance(data.get("suites"), dict)
    ):
        raise ConfigError(f"suite file {path} must be an object with 'methods' and 'suites' objects")
    return data


def parse_method_flag(text: str) -> tuple[str, dict]:
    """``NAME=JSON`` (from ``--method``) -> (name, spec)."""
    name, sep, body = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ConfigError(f"--method takes NAME=JSON, got {text!r}")
    try:
        spec = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--method {name}: the spec is not valid JSON ({exc.msg}): {body!r}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"--method {name}: the spec must be a JSON object, got {body!r}")
    return name, spec


def build_suite(
    data: dict,
    suite_name: str,
    drafter_names: list[str],
    extra_methods: list[tuple[str, dict]] = (),
    only: list[str] | None = None,
    modes: list[str] | None = None,
    lengths: list[int] | None = None,
    backends: list[str] | None = None,
) -> Suite:
    """Resolve one suite of ``data`` (a suite file) for the loaded drafters.

    ``extra_methods`` (from ``--method`` / flags) are added to the suite, replacing a method of
    the same name; ``only`` keeps the methods matching any of its glob patterns (the baselines are
    always kept; a pattern matches a method on every backend); ``modes`` / ``lengths`` override the suite's settings. ``backends`` (default:
    the suite's ``backends``, else torch) says where methods run: peers of a backend not listed
    are dropped, and every csd method that names no backend runs on each one listed (on
    llama.cpp as ``NAME@llama.cpp``).
    """
    suites = data["suites"]
    if suite_name not in suites:
        raise ConfigError(f"no suite {suite_name!r} (the suite file has: {', '.join(suites)})")
    entry = suites[suite_name]
    backends = list(backends or entry.get("backends") or ["torch"])
    for backend in backends:
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r} (use {', '.join(BACKENDS)})")
    baselines = {"torch": data.get("baseline", "hf-plain"), **data.get("baselines", {})}
    baselines = {b: baselines[b] for b in backends if b in baselines}
    if len(baselines) != len(backends):
        raise ConfigError(f"the suite file names no baseline for backend(s) {set(backends) - set(baselines)}")
    definitions = dict(data["methods"])
    for name, spec in extra_methods:
        definitions[name] = spec
    names = list(entry.get("methods", []))
    for name, _ in extra_methods:
        if name not in names:
            names.append(name)
    for baseline in reversed(baselines.values()):
        if baseline not in names:
            names.insert(0, baseline)
    methods = _resolve_methods(_Resolver(definitions, drafter_names), names, backends)
    if only:
        methods = _only(methods, only, kept=set(baselines.values()))
    for baseline in baselines.values():
        if baseline not in methods:
            raise ConfigError(f"the baseline method {baseline!r} is not defined")
    return Suite(
        name=suite_name,
        methods=tuple(methods.values()),
        modes=tuple(dict.fromkeys(_modes(modes or entry.get("modes") or ["greedy-fixed"]))),
        lengths=tuple(dict.fromkeys(_lengths(lengths or entry.get("max_new_tokens") or [128]))),
        baseline=baselines[backends[0]],
        description=entry.get("description", ""),
        baselines=baselines,
        prompts=_suite_prompts(suite_name, entry.get("prompts")),
    )


def _suite_prompts(suite_name: str, prompts) -> str | None:
    """A suite's prompt set: an absolute path, else relative to the repository (``benchmarks/...``),
    else to the working directory."""
    if prompts is None:
        return None
    if not isinstance(prompts, str) or not prompts:
        raise ConfigError(f"suite {suite_name!r}: 'prompts' must be a path to a prompts JSONL file")
    path = Path(prompts)
    if not path.is_absolute() and (REPOSITORY_DIR / path).is_file():
        path = REPOSITORY_DIR / path
    return str(path)


def _resolve_methods(resolver: _Resolver, names: list[str], backends: list[str]) -> dict[str, Method]:
    """The methods ``names`` (or their templates) expand to, on the selected backends, by name."""
    methods: dict[str, Method] = {}
    seen_configs: dict[str, str] = {}
    for pattern in names:
        for resolved, from_template in resolver.expand(pattern):
            for method in _on_backends(resolved, backends):
                key = json.dumps(_config_key(method), sort_keys=True)
                if from_template and key in seen_configs:
                    continue  # a template reproduced a method already listed (e.g. k00 = csd-full's)
                seen_configs.setdefault(key, method.name)
                methods[method.name] = method
    return methods


def _only(methods: dict[str, Method], patterns: list[str], kept: set[str]) -> dict[str, Method]:
    """The methods ``kept`` and those matching a glob pattern; a pattern names a method on every
    backend: "csd-full" keeps csd-full@llama.cpp too."""
    return {
        n: m
        for n, m in methods.items()
        if n in kept or any(fnmatch.fnmatchcase(x, p) for p in patterns for x in (n, n.removesuffix(LLAMA_SUFFIX)))
    }


def _modes(modes: list[str]) -> list[str]:
    modes = list(modes)
    for mode in modes:
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r} (use {', '.join(MODES)})")
    return modes


def _lengths(lengths) -> list[int]:
    """Generation lengths: a positive integer or a list of them."""
    if isinstance(lengths, int):
        lengths = [lengths]
    lengths = list(lengths)
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ConfigError(f"generation lengths must be positive integers, got {length!r}")
    return lengths


def _on_backends(method: Method, backends: list[str]) -> list[Method]:
    """The instances of ``method`` on the selected backends (see ``build_suite``)."""
    if method.engine != "csd" or "backend" in method.spec:
        return [method] if method.backend in backends else []
    out = []
    for backend in backends:
        name = method.name if backend == "torch" else method.name + LLAMA_SUFFIX
        out.append(Method(name, method.engine, {**method.spec, "backend": backend}))
    return out


def _config_key(method: Method) -> dict:
    spec = {k: v for k, v in method.spec.items() if k not in ("description", "ablation")}
    return {"engine": method.engine, **spec}


class _Resolver:
    """Expands templates and resolves ``like`` / ``without`` / ``k00`` in method definitions."""

    def __init__(self, definitions: dict, drafter_names: list[str]) -> None:
        self.definitions = definitions
        self.drafters = list(drafter_names)
        self._resolving: set[str] = set()

    def expand(self, pattern: str) -> list[tuple[Method, bool]]:
        """Methods named by ``pattern`` (a definition's name, templates included) and whether
        each came from a template."""
        if pattern not in self.definitions:
            raise ConfigError(f"method {pattern!r} is not defined (known: {', '.join(self.definitions)})")
        raw = self.definitions[pattern]
        if not isinstance(raw, dict):
            raise ConfigError(f"method {pattern!r}: the spec must be a JSON object")
        keys = [k for k in TEMPLATE_KEYS if "{" + k + "}" in pattern]
        bindings = [{}]
        for key in keys:
            values = self.drafters if key == "drafter" else raw.get(key)
            if not isinstance(values, list) or not values:
                if key == "drafter":
                    return []  # no drafters loaded: a per-drafter method has no instances
                raise ConfigError(f"method {pattern!r}: '{key}' must be a non-empty list to expand {{{key}}}")
            bindings = [{**b, key: v} for b in bindings for v in values]
        out = []
        for binding in bindings:
            name = _substitute(pattern, binding)
            spec = _substitute(copy.deepcopy(raw), binding)
            for key, value in binding.items():
                if key != "drafter":
                    spec[key] = value  # the list becomes this instance's value
            out.append((self._resolve(name, spec), bool(keys)))
        return out

    def resolve_name(self, name: str) -> Method:
        """A concrete method by name, e.g. ``like: "csd-sd-pycode-5m"`` (template instances too)."""
        if name in self.definitions:
            found = self.expand(name)
            if len(found) == 1:
                return found[0][0]
        for pattern in self.definitions:
            if "{" in pattern:
                for method, _ in self.expand(pattern):
                    if method.name == name:
                        return method
        raise ConfigError(f"'like' refers to {name!r}, which is not a defined method")

    def _resolve(self, name: str, spec: dict) -> Method:
        spec = dict(spec)
        if "like" in spec:
            base_name = spec.pop("like")
            if base_name in self._resolving:
                raise ConfigError(f"method {name!r}: 'like' chain loops through {base_name!r}")
            self._resolving.add(base_name)
            try:
                base = self.resolve_name(base_name)
            finally:
                self._resolving.discard(base_name)
            merged = copy.deepcopy(base.spec)
            merged.pop("description", None)
            merged.update(spec)
            spec = merged
            spec.setdefault("description", f"{base_name}, modified")
        engine = spec.setdefault("engine", "csd")
        if engine not in ENGINES:
            raise ConfigError(f"method {name!r}: engine must be one of {', '.join(ENGINES)}, got {engine!r}")
        engine_keys = {
            "transformers": _TRANSFORMERS_KEYS,
            "llama.cpp": _LLAMA_KEYS,
            "llama-server": _LLAMA_SERVER_KEYS,
            "csd": _CSD_KEYS,
        }
        allowed = _COMMON_KEYS | engine_keys[engine]
        unknown = set(spec) - allowed - set(TEMPLATE_KEYS)
        if unknown:
            raise ConfigError(f"method {name!r}: unknown keys {sorted(unknown)} for engine {engine!r}")
        if engine == "transformers":
            _check_transformers(name, spec, self.drafters)
        elif engine == "llama.cpp":
            _check_lookup(name, spec)
        elif engine == "llama-server":
            spec = _normalize_server(name, spec, self.drafters)
        else:
            spec = _normalize_csd(name, spec, self.drafters)
        return Method(name, engine, spec)


def _substitute(value, binding: dict):
    if isinstance(value, str):
        for key, sub in binding.items():
            value = value.replace("{" + key + "}", str(sub))
        return value
    if isinstance(value, list):
        return [_substitute(v, binding) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, binding) for k, v in value.items()}
    return value


def _check_transformers(name: str, spec: dict, drafters: list[str]) -> None:
    assistant = spec.get("assistant")
    if assistant is not None and assistant not in drafters:
        raise ConfigError(f"method {name!r}: assistant {assistant!r} is not a loaded drafter ({', '.join(drafters)})")
    _check_lookup(name, spec)
    options = spec.get("generate_options", {})
    if not isinstance(options, dict):
        raise ConfigError(f"method {name!r}: generate_options must be a JSON object")


def _normalize_server(name: str, spec: dict, drafters: list[str]) -> dict:
    """``spec_type`` a comma-separated string or null; ``draft_model`` a loaded drafter's name."""
    spec_type = spec.get("spec_type")
    if spec_type is not None and (not isinstance(spec_type, str) or not spec_type.strip()):
        raise ConfigError(f"method {name!r}: spec_type must be a llama-server --spec-type string or null")
    draft = spec.get("draft_model")
    if draft in ("smallest", "largest"):
        if not drafters:
            raise ConfigError(f"method {name!r}: draft_model {draft!r} needs a loaded drafter")
        draft = drafters[-1] if draft == "smallest" else drafters[0]
    if draft is not None and draft not in drafters:
        raise ConfigError(f"method {name!r}: draft_model {draft!r} is not a loaded drafter ({', '.join(drafters)})")
    return {**spec, "spec_type": spec_type, "draft_model": draft}


def _check_lookup(name: str, spec: dict) -> None:
    lookup = spec.get("prompt_lookup_num_tokens")
    if lookup is not None and (isinstance(lookup, bool) or not isinstance(lookup, int) or lookup < 1):
        raise ConfigError(f"method {name!r}: prompt_lookup_num_tokens must be a positive integer")


def _normalize_csd(name: str, spec: dict, drafters: list[str]) -> dict:
    """Drafters as an explicit list, MaG as a bool, ``without`` and ``k00`` applied."""
    chosen = spec.get("drafters", "all")
    if chosen == "all":
        chosen = list(drafters)
    elif chosen in ("smallest", "largest"):  # family-independent picks (drafters are largest first)
        chosen = drafters[-1:] if chosen == "smallest" else drafters[:1]
    if not isinstance(chosen, list) or any(d not in drafters for d in chosen):
        raise ConfigError(
            f"method {name!r}: drafters must be 'all', 'smallest', 'largest' or a list of loaded drafters "
            f"({', '.join(drafters)})"
        )
    spec["drafters"] = list(chosen)
    spec["mag"] = bool(spec.get("mag", True))
    if spec.get("k_matrix") in (None, "default"):
        spec["k_matrix"] = "auto"  # the library's default: a starting K-matrix, adapted online
    spec.setdefault("lenience", 1.0)
    spec.setdefault("adaptive", None)  # None: the library decides (on for "auto", off for explicit)
    spec.setdefault("mag_first", None)  # None: MaG only drafts through the K-matrix
    if spec.get("backend", "torch") not in BACKENDS:
        raise ConfigError(f"method {name!r}: backend must be one of {', '.join(BACKENDS)}, got {spec['backend']!r}")
    without = spec.pop("without", None)
    if without is not None:
        spec = _remove_level(name, spec, without)
    k00 = spec.pop("k00", None)
    if k00 is not None:
        rows = _explicit_rows(name, spec)
        if isinstance(k00, bool) or not isinstance(k00, int) or k00 < 0:
            raise ConfigError(f"method {name!r}: k00 must be a non-negative integer, got {k00!r}")
        if not rows:
            raise ConfigError(f"method {name!r}: k00 needs a cascade with at least one drafting level")
        rows[0][0] = k00
        spec["k_matrix"] = rows
    return spec


def _explicit_rows(name: str, spec: dict) -> list[list[int]]:
    from ..kmatrix import KMatrix

    num_levels = len(spec["drafters"]) + int(spec["mag"])
    k_matrix = spec["k_matrix"]
    if k_matrix in (None, "auto", "default"):
        return KMatrix.default(len(spec["drafters"]), spec["mag"]).as_lists()
    try:
        return KMatrix.parse(k_matrix, num_levels).as_lists()
    except ConfigError as exc:
        raise ConfigError(f"method {name!r}: {exc}") from None


def _remove_level(name: str, spec: dict, level: str) -> dict:
    """Drop one drafting level: its K-matrix column, and the row it or its reviewer no longer needs.

    Column ``c`` belongs to drafting level ``c``; its own review row is ``c + 1``. The smallest
    level has no row of its own (nothing drafts for it); removing it frees the row of the level
    above, which reviewed only it: in both cases row ``min(c + 1, n - 1)`` goes.
    """
    rows = _explicit_rows(name, spec)
    levels = list(spec["drafters"]) + (["mag"] if spec["mag"] else [])
    if level not in levels:
        raise ConfigError(f"method {name!r}: cannot remove {level!r}, the levels are {', '.join(levels)}")
    column = levels.index(level)
    n = len(levels)
    drop_row = min(column + 1, n - 1)
    rows = [[v for c, v in enumerate(row) if c != column] for r, row in enumerate(rows) if r != drop_row]
    spec = dict(spec)
    if level == "mag":
        spec["mag"] = False
    else:
        spec["drafters"] = [d for d in spec["drafters"] if d != level]
    if rows and not any(rows[0]):
        raise ConfigError(f"method {name!r}: without {level!r} the target's row of the K-matrix is empty")
    spec["k_matrix"] = rows
    return spec
