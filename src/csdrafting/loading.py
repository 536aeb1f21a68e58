"""Loading: model folders (or models already in memory) become ``Levels``.

``Levels`` is everything a cascade drafts with that costs time or memory to build: the target
and drafter levels, the tokenizer, MaG's bigram table and the EOS ids. A ``Cascade`` is a
``Levels`` plus a ``CascadeConfig``; ``Cascade.with_config`` reuses the same ``Levels`` with
another configuration, so trying configurations never reloads a model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .backends import LLAMA_CPP, is_gguf, level_backend, llama_level
from .config import CascadeConfig
from .errors import ConfigError, ModelLoadError
from .files import require_file
from .gguf_cache import DEFAULT_DRAFTER_OUTTYPE, cached_gguf, target_outtype
from .gguf_tokenizer import LlamaCppTokenizer
from .levels.base import NeuralLevel
from .levels.llamacpp import import_llama_cpp
from .levels.mag import BigramTable
from .levels.model import model_level

BIGRAM_FILENAME = "csd_bigram.npy"  # looked up in the target's folder when no table is given
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the configuration fields fixed when levels load: another value needs another load
LOAD_FIELDS = ("device", "dtype", "runner", "backend", "drafter_outtype", "bigram")
# also fixed when levels load, but not asked of a configuration over loaded levels: the planner,
# the tuner's replay and the bench build those without repeating the loaded levels' kernel
KERNEL_FIELD = "kernel"


@dataclass(frozen=True)
class Levels:
    """Loaded levels. ``sources`` says how a configuration names each neural level, target first
    (the folder path it was loaded from, or its name for levels built in memory)."""

    target: NeuralLevel
    drafters: tuple[NeuralLevel, ...]
    tokenizer: object | None
    eos_token_ids: frozenset[int]
    bigram: BigramTable | None
    sources: tuple[str, ...]
    loaded_with: CascadeConfig | None = None  # None: built in memory

    def __post_init__(self) -> None:
        vocab_size = self.target.vocab_size
        for level in self.drafters:
            if level.vocab_size != vocab_size:
                raise ModelLoadError(
                    f"drafter {level.name} has a vocabulary of {level.vocab_size} tokens, the target "
                    f"{vocab_size}: drafters must share the target's tokenizer"
                )
        if self.bigram is not None and self.bigram.vocab_size != vocab_size:
            raise ConfigError(
                f"bigram table covers {self.bigram.vocab_size} tokens, the target's vocabulary {vocab_size}"
            )

    @classmethod
    def from_models(
        cls,
        target,
        drafters: Sequence = (),
        tokenizer=None,
        *,
        names: Sequence[str] | None = None,
        runner: str = "auto",
        kernel: str = "auto",
        bigram: BigramTable | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ) -> Levels:
        """Levels from transformers models (or objects that already are ``NeuralLevel``s), named
        ``target``, ``drafter1``, ``drafter2`` ... unless ``names`` are given. ``runner`` and
        ``kernel``: as ``CascadeConfig``'s, for the models that become levels here."""
        names = list(names) if names is not None else ["target"] + [f"drafter{i + 1}" for i in range(len(drafters))]
        if len(names) != 1 + len(drafters):
            raise ConfigError(f"names must give one name per level ({1 + len(drafters)}), got {len(names)}")
        if len(set(names)) != len(names):
            raise ConfigError(f"level names must be distinct, got {names}")
        if eos_token_ids is None:
            eos_token_ids = eos_ids(target, tokenizer) if isinstance(target, torch.nn.Module) else []
        return cls(
            as_level(names[0], target, runner, kernel),
            tuple(as_level(name, model, runner, kernel) for name, model in zip(names[1:], drafters)),
            tokenizer,
            frozenset(eos_token_ids),
            bigram,
            tuple(names),
        )

    def default_config(self) -> CascadeConfig:
        """Every loaded drafter and MaG, with the automatic schedule."""
        base = self.loaded_with or CascadeConfig()
        return CascadeConfig(
            **{name: getattr(base, name) for name in (*LOAD_FIELDS, KERNEL_FIELD)},
            target=self.sources[0],
            drafters=self.sources[1:],
        )

    def select(self, config: CascadeConfig) -> tuple[NeuralLevel, list[NeuralLevel]]:
        """The target and the drafters ``config`` names, from these levels (no loading)."""
        if self.loaded_with is not None:
            for name in LOAD_FIELDS:
                if getattr(config, name) != getattr(self.loaded_with, name):
                    raise ConfigError(
                        f"{name} {getattr(config, name)!r} differs from the loaded levels' "
                        f"{getattr(self.loaded_with, name)!r}: that needs a reload (Cascade.from_config)"
                    )
        if config.target is not None and self._find(config.target) != 0:
            raise ConfigError(f"target {config.target!r} is not the loaded target {self.sources[0]!r}")
        levels = [self.target, *self.drafters]
        return self.target, [levels[self._find(ref, drafter=True)] for ref in config.drafters]

    def _find(self, ref: str, drafter: bool = False) -> int:
        """Index (0 = target) of the level a configuration names ``ref``: its source or its name."""
        levels = [self.target, *self.drafters]
        for i, (source, level) in enumerate(zip(self.sources, levels)):
            if (i > 0 or not drafter) and (ref in (source, level.name) or _same_folder(ref, source)):
                return i
        known = ", ".join(self.sources[1:]) or "none"
        what = "drafter" if drafter else "target"
        raise ConfigError(f"{what} {ref!r} is not among the loaded levels (drafters loaded: {known})")


def _same_folder(a: str, b: str) -> bool:
    """Two spellings (relative, absolute, through a link) of one existing folder."""
    return Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve()


def load_levels(config: CascadeConfig) -> Levels:
    """Load the target, the drafters, the tokenizer and the bigram table ``config`` names.

    Each level's backend: llama.cpp for a ``.gguf`` path, else ``config.backend`` (an HF folder on
    llama.cpp is converted once and cached, see ``backends.py`` and ``gguf_cache.py``)."""
    if config.target is None:
        raise ConfigError("the configuration names no target model")
    paths = [config.target, *config.drafters]
    backends = [level_backend(path, config.backend) for path in paths]
    device = resolve_device(config.device)
    if LLAMA_CPP in backends and device.type != "cpu":
        raise ConfigError(f"llama.cpp levels run on the CPU: use device 'cpu', not {config.device!r}")
    for path, backend in zip(paths, backends):
        check_level_path(path, backend)
    tokenizer = target_tokenizer(config.target)
    vocab = None  # the target's vocabulary, read once when a level needs comparing
    for path in config.drafters:
        vocab = check_same_tokenizer(tokenizer, path, vocab)
    levels, eos = [], None
    for i, (path, backend) in enumerate(zip(paths, backends)):
        name = Path(path).name
        if backend == LLAMA_CPP:
            outtype = target_outtype(config.dtype) if i == 0 else (config.drafter_outtype or DEFAULT_DRAFTER_OUTTYPE)
            levels.append(llama_level(name, path if is_gguf(path) else cached_gguf(path, outtype)))
            continue
        model = load_model(path, device, DTYPES[config.dtype])
        if i == 0:
            eos = eos_ids(model, tokenizer)
        # these modules are ours alone: the lean runner may take their weights over
        levels.append(model_level(name, model, config.runner, own_weights=True, kernel=config.kernel))
    if eos is None:  # a llama.cpp target: the HF folder's EOS ids, else the GGUF's end-of-generation ids
        eos = hf_eos_ids(config.target, tokenizer) if not is_gguf(config.target) else tokenizer.eos_token_ids
    return Levels(
        levels[0],
        tuple(levels[1:]),
        tokenizer,
        frozenset(eos),
        load_bigram(config),
        tuple(paths),
        loaded_with=config,
    )


def has_hf_tokenizer(folder) -> bool:
    return any((Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def target_tokenizer(path: str):
    """The HF tokenizer beside the target (kept when a folder is converted for llama.cpp), else the
    GGUF's own vocabulary; None for a folder without one (the cascade then takes token ids)."""
    if is_gguf(path):
        return LlamaCppTokenizer(path)
    return load_tokenizer(path) if has_hf_tokenizer(path) else None


def check_level_path(path: str, backend: str) -> None:
    if is_gguf(path):
        require_file(path, "GGUF file")
        import_llama_cpp()  # a clear error when the extra is missing, before any model loads
    else:
        check_model_folder(path)
        if backend == LLAMA_CPP:
            import_llama_cpp()


def hf_eos_ids(folder: str, tokenizer) -> list[int]:
    """EOS ids of an HF folder without loading its weights: ``eos_ids``' chain over its JSON files."""
    return _first_eos_ids(
        [_read_json_or_none(Path(folder) / name) for name in ("generation_config.json", "config.json")], tokenizer
    )


def _read_json_or_none(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def load_bigram(config: CascadeConfig) -> BigramTable | None:
    """MaG's bigram table: ``config.bigram`` if given, else ``csd_bigram.npy`` in the target's
    folder if present (without one MaG falls back to repeating the last token)."""
    if config.bigram is not None:
        if not Path(config.bigram).is_file():
            raise ConfigError(f"bigram table not found: {config.bigram}")
        return BigramTable.load(config.bigram)
    beside = Path(config.target) / BIGRAM_FILENAME
    return BigramTable.load(beside) if beside.is_file() else None


def resolve_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r} (use 'cpu', 'cuda' or 'cuda:N')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda, got {device}")
    return device


def check_model_folder(path) -> None:
    if not (Path(path) / "config.json").is_file():
        raise ModelLoadError(f"no model at {path!s}: expected a folder with config.json and weights")


def load_model(path, device: torch.device, dtype: torch.dtype):
    """A transformers causal LM from a local folder, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    check_model_folder(path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # keep the weight-loading progress bar off the terminal
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(Path(path), dtype=dtype)
    except Exception as exc:  # transformers raises many kinds; all mean "cannot load this"
        raise ModelLoadError(f"cannot load model from {path!s}: {exc}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.to(device).eval()


def load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(Path(path))
    except Exception as exc:
        raise ModelLoadError(f"cannot load tokenizer from {path!s}: {exc}") from None


def check_same_tokenizer(target_tokenizer, drafter_path, target_vocab: dict | None = None) -> dict | None:
    """A drafter must tokenize exactly like the target: same vocabulary, same ids. Works across
    backends (an HF tokenizer against a GGUF's vocabulary). Returns the target's vocabulary, read
    once (pass it back for the next drafter)."""
    if is_gguf(drafter_path):
        drafter_tokenizer = LlamaCppTokenizer(drafter_path)
        if not drafter_tokenizer.has_vocabulary:
            return target_vocab  # token ids only: the vocabulary size is still checked when levels load
    else:
        folder = Path(drafter_path)
        check_model_folder(folder)
        if not has_hf_tokenizer(folder):
            return target_vocab  # nothing to compare; the vocabulary size is still checked when levels load
        drafter_tokenizer = load_tokenizer(folder)
    if target_tokenizer is None or getattr(target_tokenizer, "has_vocabulary", True) is False:
        return target_vocab
    target_vocab = target_vocab if target_vocab is not None else target_tokenizer.get_vocab()
    if drafter_tokenizer.get_vocab() != target_vocab:
        raise ModelLoadError(
            f"drafter {drafter_path!s} uses a different tokenizer than the target (vocabularies differ): "
            "every level must share the target's tokenizer"
        )
    return target_vocab


def as_level(name: str, model, runner: str, kernel: str = "auto") -> NeuralLevel:
    """A transformers model becomes a neural level; an object that already is a level is kept."""
    if isinstance(model, torch.nn.Module):
        return model_level(name, model, runner, kernel=kernel)
    if isinstance(model, NeuralLevel):
        return model
    raise ConfigError(f"{name} must be a transformers causal LM or a NeuralLevel, got {type(model).__name__}")


def eos_ids(model, tokenizer) -> list[int]:
    """EOS ids of a loaded model: its generation config's, else its config's, else the tokenizer's."""
    return _first_eos_ids([getattr(model, "generation_config", None), model.config], tokenizer)


def _first_eos_ids(configs: list, tokenizer) -> list[int]:
    """The first ``eos_token_id`` set in ``configs`` (config objects or their JSON dicts, None
    skipped), else the tokenizer's, as a list (a config may give one id or several)."""
    for config in configs:
        eos = config.get("eos_token_id") if isinstance(config, dict) else getattr(config, "eos_token_id", None)
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    eos = getattr(tokenizer, "eos_token_id", None)
    return [] if eos is None else [eos]
