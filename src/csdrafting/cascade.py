"""``Cascade``: loads and validates the levels, owns the configuration, generates and streams."""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, GenerationInputError, ModelLoadError
from .kmatrix import KMatrix
from .levels.base import NeuralLevel
from .levels.mag import BigramTable, MaG
from .levels.model import ModelLevel
from .output import OutputCollector
from .sampling import SamplingParams
from .stats import GenerationStats
from .step import CascadeStep

AUTO_MAG_FIRST = 3  # with k_matrix="auto": a MaG match of 3+ tokens drafts alone (README: ablation)
BIGRAM_FILENAME = "csd_bigram.npy"  # looked up in the target's folder when no table is given
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class GenerationResult:
    """token_ids: the new tokens only (EOS included when it ended the generation)."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "eos", "length" or "stop"
    stats: GenerationStats

    def as_dict(self) -> dict:
        return {
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "stats": self.stats.as_dict(),
        }


@dataclass(frozen=True)
class StreamChunk:
    """A piece of streamed output: consecutive tokens first proposed by the same level.

    ``level`` names that level (the target's name for tokens the target produced itself).
    The last chunk of a stream carries ``finish_reason`` and ``stats`` (its text may be empty).
    """

    text: str
    token_ids: list[int]
    level: str
    finish_reason: str | None = None
    stats: GenerationStats | None = None


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


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


def load_model(path, device: torch.device, dtype: torch.dtype):
    """A transformers causal LM from a local folder, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"no model at {path!s}: expected a folder with config.json and weights")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # keep the weight-loading progress bar off the terminal
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
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


class Cascade:
    """A target model, its drafters (largest first) and MaG, configured by a K-matrix and lenience.

    Build one with ``Cascade.from_pretrained`` (folders) or ``Cascade(...)`` (loaded models).
    One generation runs at a time per Cascade (a lock serialises callers).
    """

    def __init__(
        self,
        target: torch.nn.Module,
        drafters: Sequence[torch.nn.Module] = (),
        tokenizer=None,
        mag: bool | MaG = True,
        k_matrix=None,
        lenience: float = 1.0,
        bigram: BigramTable | None = None,
        names: Sequence[str] | None = None,
        runner: str = "auto",
        eos_token_ids: Sequence[int] | None = None,
        adaptive: bool | None = None,
        mag_first: int | None = None,
    ) -> None:
        if isinstance(lenience, bool) or not isinstance(lenience, (int, float)) or not math.isfinite(lenience):
            raise ConfigError(f"lenience must be a number >= 1, got {lenience!r}")
        if lenience < 1:
            raise ConfigError(f"lenience must be >= 1 (1 is strict review), got {lenience}")
        if runner not in ("auto", "lean", "transformers"):
            raise ConfigError(f"runner must be 'auto', 'lean' or 'transformers', got {runner!r}")
        if mag_first is not None and (isinstance(mag_first, bool) or not isinstance(mag_first, int) or mag_first < 1):
            raise ConfigError(f"mag_first must be a positive integer (a match length) or None, got {mag_first!r}")
        names = list(names) if names is not None else ["target"] + [f"drafter{i + 1}" for i in range(len(drafters))]
        if len(names) != 1 + len(drafters):
            raise ConfigError(f"names must give one name per level ({1 + len(drafters)}), got {len(names)}")
        self.tokenizer = tokenizer
        self.target = _as_level(names[0], target, runner)
        self.drafters = [_as_level(name, model, runner) for name, model in zip(names[1:], drafters)]
        vocab_size = self.target.vocab_size
        for level in self.drafters:
            if level.vocab_size != vocab_size:
                raise ModelLoadError(
                    f"drafter {level.name} has a vocabulary of {level.vocab_size} tokens, the target "
                    f"{vocab_size}: drafters must share the target's tokenizer"
                )
        if isinstance(mag, MaG):
            self.mag = mag
        elif mag:
            if bigram is not None and bigram.vocab_size != vocab_size:
                raise ConfigError(
                    f"bigram table covers {bigram.vocab_size} tokens, the target's vocabulary {vocab_size}"
                )
            self.mag = MaG(bigram)
        else:
            self.mag = None
        num_drafting = len(self.drafters) + int(self.mag is not None)
        automatic = k_matrix is None or (isinstance(k_matrix, str) and k_matrix in ("auto", "default"))
        if automatic:
            self.k_matrix = KMatrix.default(len(self.drafters), self.mag is not None)
        else:
            self.k_matrix = KMatrix.parse(k_matrix, num_drafting)
        # "auto" adapts the schedule online and lets a long MaG match draft alone; an explicit
        # K-matrix is used as given unless asked
        self.adaptive = bool(automatic if adaptive is None else adaptive)
        if automatic and mag_first is None and self.mag is not None:
            mag_first = AUTO_MAG_FIRST
        self.lenience = float(lenience)
        if eos_token_ids is None:
            eos_token_ids = _eos_ids(target, tokenizer) if isinstance(target, torch.nn.Module) else []
        self.eos_token_ids = frozenset(eos_token_ids)
        self.device = self.target.device
        # every level must fit the sequence: the usable context is the smallest level's
        self.max_context = min(level.max_positions for level in [self.target, *self.drafters])
        self._step = CascadeStep(
            self.target,
            self.drafters,
            self.mag,
            self.k_matrix,
            self.lenience,
            self.eos_token_ids,
            self.adaptive,
            mag_first,
        )
        self.mag_first = self._step.mag_first
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        target: str | Path,
        drafters: Sequence[str | Path] = (),
        mag: bool = True,
        k_matrix=None,
        lenience: float = 1.0,
        device: str = "cpu",
        dtype: str = "float32",
        bigram: str | Path | None = None,
        runner: str = "auto",
        adaptive: bool | None = None,
        mag_first: int | None = None,
    ) -> Cascade:
        """Load a target and drafters from local Hugging Face folders.

        MaG's bigram table is ``bigram`` if given, else ``csd_bigram.npy`` in the target's folder
        if present (without one MaG falls back to repeating the last token).
        """
        device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype)
        for path in [target, *drafters]:
            if not (Path(path) / "config.json").is_file():
                raise ModelLoadError(f"no model at {path!s}: expected a folder with config.json and weights")
        tokenizer = load_tokenizer(target)
        for path in drafters:
            check_same_tokenizer(tokenizer, path)
        target_model = load_model(target, device, torch_dtype)
        drafter_models = [load_model(path, device, torch_dtype) for path in drafters]
        table = None
        if mag:
            bigram_path = Path(bigram) if bigram is not None else Path(target) / BIGRAM_FILENAME
            if bigram is not None and not bigram_path.is_file():
                raise ConfigError(f"bigram table not found: {bigram_path}")
            if bigram_path.is_file():
                table = BigramTable.load(bigram_path)
        names = [Path(target).name] + [Path(p).name for p in drafters]
        return cls(
            target_model,
            drafter_models,
            tokenizer,
            mag=mag,
            k_matrix=k_matrix,
            lenience=lenience,
            bigram=table,
            names=names,
            runner=runner,
            adaptive=adaptive,
            mag_first=mag_first,
        )

    @classmethod
    def from_config(cls, config, runner: str = "auto") -> Cascade:
        """Build from a ``CascadeConfig``, a dict of its fields, or a path to a JSON config file."""
        from .config import CascadeConfig

        if isinstance(config, (str, Path)):
            config = CascadeConfig.load(config)
        elif isinstance(config, dict):
            config = CascadeConfig.from_dict(config)
        if config.target is None:
            raise ConfigError("the configuration names no target model")
        return cls.from_pretrained(
            config.target,
            config.drafters,
            mag=config.mag,
            k_matrix=config.k_matrix,
            lenience=config.lenience,
            device=config.device,
            dtype=config.dtype,
            bigram=config.bigram,
            runner=runner,
            adaptive=config.adaptive,
            mag_first=config.mag_first,
        )

    # -- configuration -------------------------------------------------------------------------

    def describe(self) -> dict:
        """The configuration as plain data (for JSON output and benchmark records)."""
        return {
            "target": self.target.name,
            "drafters": [d.name for d in self.drafters],
            "mag": self.mag is not None,
            "k_matrix": self.k_matrix.as_lists(),
            "lenience": self.lenience,
            "adaptive": self.adaptive,
            "mag_first": self.mag_first,
            "device": str(self.device),
            "dtype": str(getattr(getattr(self.target, "backend", None), "dtype", "")).replace("torch.", ""),
            "runner": self.target.runner_name,
        }

    # -- generation ----------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Prompt text or token ids -> validated token ids."""
        if isinstance(prompt, str):
            if not prompt:
                raise GenerationInputError("prompt is empty")
            if self.tokenizer is None:
                raise GenerationInputError("this cascade has no tokenizer: pass token ids")
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            try:
                ids = [int(t) for t in prompt]
            except (TypeError, ValueError):
                raise GenerationInputError("prompt must be a string or a sequence of token ids") from None
            bad = [t for t in ids if not 0 <= t < self.target.vocab_size]
            if bad:
                raise GenerationInputError(
                    f"token id {bad[0]} is outside the vocabulary (0..{self.target.vocab_size - 1})"
                )
        if not ids:
            raise GenerationInputError("prompt is empty (it encodes to no tokens)")
        return ids

    def validate_request(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        """Raise ``GenerationInputError`` unless ``max_new_tokens`` is a positive int and the prompt
        plus that many tokens fits every level's context (what ``generate`` checks first)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise GenerationInputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if len(prompt_ids) >= self.max_context:
            raise GenerationInputError(
                f"prompt has {len(prompt_ids)} tokens; the cascade's context is {self.max_context} tokens"
            )
        if len(prompt_ids) + max_new_tokens > self.max_context:
            raise GenerationInputError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"cascade's context of {self.max_context} tokens; at most {self.max_context - len(prompt_ids)} new tokens fit"
            )

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        ignore_eos: bool = False,
        stop: Sequence[str] | str | None = None,
    ) -> GenerationResult:
        """Generate up to ``max_new_tokens`` tokens after ``prompt``; exactly the target's output
        (greedy: token for token; sampling: in distribution)."""
        events = self._run(prompt, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos, stop, False)
        for event in events:
            result = event
        return result  # the last event is the GenerationResult

    def stream(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        ignore_eos: bool = False,
        stop: Sequence[str] | str | None = None,
    ) -> Iterator[StreamChunk]:
        """Like ``generate``, yielding text as tokens are accepted, each chunk marked with the
        level that drafted its tokens. Arguments are validated before the first chunk."""
        events = self._run(prompt, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos, stop, True)
        next(events)  # runs validation eagerly so bad input raises here, not at first iteration
        return events  # closing it early (or dropping it) stops the generation at the next step

    def _run(self, prompt, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos, stop, streaming):
        params = SamplingParams(temperature, top_k, top_p, seed)
        prompt_ids = self.encode(prompt)
        self.validate_request(prompt_ids, max_new_tokens)
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if any(not isinstance(s, str) for s in stop):
            raise GenerationInputError("stop must be a string or a list of strings")
        if stop and self.tokenizer is None:
            raise GenerationInputError("stop strings need a tokenizer")
        yield None  # validation done
        with self._lock:
            yield from self._generate_locked(prompt_ids, max_new_tokens, params, ignore_eos, stop, streaming)

    def _generate_locked(self, prompt_ids, max_new_tokens, params, ignore_eos, stop, streaming):
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        step = self._step
        step.begin(params, generator, stop_at_eos=not ignore_eos)
        out = OutputCollector(
            self.tokenizer, max_new_tokens, self.eos_token_ids, ignore_eos, stop, track_text=streaming
        )
        started = time.perf_counter()
        step.prefill(prompt_ids)
        self._synchronize()
        prefilled = time.perf_counter()
        ids = list(prompt_ids)
        num_steps = 0
        shown = 0  # characters of text already streamed
        while out.finish_reason is None:
            tokens, origins = step.step(ids, out.remaining)
            num_steps += 1
            text_before = len(out.detokenizer.text) if streaming else 0
            kept = out.push(tokens, origins)
            ids.extend(tokens[:kept])
            if streaming and kept:
                visible = out.safe_text_length()
                first = len(out.token_ids) - kept
                text_end = text_before
                for group_start, group_end, origin in _runs(out.origins, first):
                    text_end += sum(out.piece_lengths[group_start:group_end])
                    end = min(text_end, visible)
                    piece = out.detokenizer.text[shown:end] if end > shown else ""
                    shown = max(shown, end)
                    yield StreamChunk(piece, out.token_ids[group_start:group_end], step.names[origin])
        self._synchronize()
        finished = time.perf_counter()
        text = out.final_text(self.tokenizer) if self.tokenizer is not None else ""
        emitted = [0] * len(step.levels)
        for origin in out.origins:
            emitted[origin] += 1
        stats = GenerationStats(
            num_prompt_tokens=len(prompt_ids),
            num_new_tokens=len(out.token_ids),
            target_steps=num_steps,
            prefill_seconds=prefilled - started,
            decode_seconds=finished - prefilled,
            finish_reason=out.finish_reason,
            levels=step.level_stats(emitted),
        )
        if streaming:
            yield StreamChunk(text[shown:], [], step.names[0], out.finish_reason, stats)
        else:
            yield GenerationResult(list(out.token_ids), text, out.finish_reason, stats)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _as_level(name: str, model, runner: str) -> NeuralLevel:
    """A transformers model becomes a ModelLevel; an object that already is a level is kept."""
    if isinstance(model, torch.nn.Module):
        return ModelLevel(name, model, runner)
    if isinstance(model, NeuralLevel):
        return model
    raise ConfigError(f"{name} must be a transformers causal LM or a NeuralLevel, got {type(model).__name__}")


def _runs(origins: list[int], start: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, origin) of each run of equal origins in ``origins[start:]``."""
    begin = start
    for i in range(start + 1, len(origins) + 1):
        if i == len(origins) or origins[i] != origins[begin]:
            yield begin, i, origins[begin]
            begin = i


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def check_same_tokenizer(target_tokenizer, drafter_path) -> None:
    """A drafter must tokenize exactly like the target: same vocabulary, same ids."""
    folder = Path(drafter_path)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"no model at {drafter_path!s}: expected a folder with config.json and weights")
    has_tokenizer = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    if not has_tokenizer:
        return  # nothing to compare; the vocabulary size is still checked when models load
    drafter_tokenizer = load_tokenizer(folder)
    if drafter_tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise ModelLoadError(
            f"drafter {drafter_path!s} uses a different tokenizer than the target (vocabularies differ): "
            "every level must share the target's tokenizer"
        )
