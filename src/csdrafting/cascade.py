"""``Cascade``: a set of loaded levels under one configuration; generates and streams.

Loading lives in ``loading.py``, the configuration in ``config.py``, one step of drafting and
verification in ``step.py``, and truncation and stream chunks in ``output.py``. A planner for
``"auto"`` is attached from outside (``planning.py``): the engine imports no tuning code.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from . import planning
from .config import CascadeConfig
from .errors import GenerationInputError
from .levels.mag import MaG
from .levels.window import WindowedLevel
from .loading import Levels, load_levels
from .output import GenerationResult, OutputCollector, StreamChunk
from .planning import Plan, Planner
from .sampling import SamplingParams
from .schedule import AdaptiveSchedule, StaticSchedule
from .stats import GenerationStats
from .step import CascadeStep, EngineParams
from .tree import TreeSizer

__all__ = ["Cascade", "EngineParams", "GenerationResult", "StreamChunk"]

DEFAULT_PLANNER = "default"  # ask ``planning.default_planner`` (the auto-planner for "auto")


class Cascade:
    """A target model, its drafters (largest first) and MaG, drafting as a ``CascadeConfig`` says.

    Build one with ``Cascade.from_pretrained`` or ``Cascade.from_config`` (folders), or
    ``Cascade(Levels.from_models(...), config)`` (models in memory); ``with_config`` gives another
    configuration over the same loaded levels. One generation runs at a time per Cascade (a lock
    serialises callers).

    ``planner``: what plans an ``"auto"`` configuration (``planning.Planner``); by default the one
    the package attaches (measured costs, observed acceptance), None for none. ``params``: the
    schedule's and tree sizer's tuning constants and the clock (``EngineParams``).
    """

    def __init__(
        self,
        levels: Levels,
        config: CascadeConfig | None = None,
        *,
        planner: Planner | None | str = DEFAULT_PLANNER,
        params: EngineParams | None = None,
    ) -> None:
        config = config if config is not None else levels.default_config()
        target, drafters = levels.select(config)
        self.levels = levels
        self.config = config  # as given ("auto" stays "auto"; what runs is ``plan.config``)
        self.tokenizer = levels.tokenizer
        self.eos_token_ids = levels.eos_token_ids
        self.device = target.device
        # every level must fit the sequence: the usable context is the smallest level's (of all
        # the configuration may use, so a later plan cannot shrink it)
        self.max_context = min(level.max_positions for level in [target, *drafters])
        self._mag = MaG(levels.bigram) if config.mag else None
        self._lock = threading.Lock()
        self.params = params if params is not None else EngineParams()
        self._tree_sizer = TreeSizer(self.params.tree)  # kept across plans: its fitted costs are the machine's
        if planner == DEFAULT_PLANNER:
            planner = planning.default_planner(levels, config)
        self.planner = planner
        self._use(planner.plan if planner is not None else None)

    def _use(self, plan: Plan | None) -> None:
        """Run ``plan`` (or, without one, the configuration as ``resolve()`` makes it explicit)."""
        run = plan.config if plan is not None else self.config
        target, drafters = self.levels.select(run)
        if run.drafter_window is not None:
            # wrapped here, per configuration, never at load: the loaded drafter serves configurations
            # with and without a window (``with_config``), and the planner measures and keys the
            # loaded levels themselves; the target is never wrapped (its logits are the output)
            drafters = [WindowedLevel(level, run.drafter_window) for level in drafters]
        resolved = run.resolve()
        self.plan = plan
        self.target = target
        self.drafters = drafters
        self.drafter_window = run.drafter_window
        self.mag = self._mag if run.mag else None
        self.k_matrix = resolved.k_matrix
        self.lenience = resolved.lenience
        self.adaptive = resolved.adaptive
        self.mag_first = resolved.mag_first
        params = self.params.schedule
        if plan is not None:
            priors = [list(row) for row in plan.priors]
            judge = self.planner.judge(run)
            schedule = AdaptiveSchedule(resolved.k_matrix, resolved.mag_first, priors, judge, len(drafters), params)
        elif resolved.adaptive:
            schedule = AdaptiveSchedule(resolved.k_matrix, resolved.mag_first, params=params)
        else:
            schedule = StaticSchedule(resolved.k_matrix, resolved.mag_first, params)
        step_levels = [target, *drafters] + ([self.mag] if self.mag is not None else [])
        self._step = CascadeStep(
            step_levels,
            schedule,
            resolved.lenience,
            self.eos_token_ids,
            tree_budget=resolved.tree_budget,
            tree_sizer=self._tree_sizer,
            clock=self.params.clock,
        )

    @classmethod
    def from_config(
        cls,
        config: CascadeConfig | dict | str | Path,
        *,
        planner: Planner | None | str = DEFAULT_PLANNER,
        params: EngineParams | None = None,
    ) -> Cascade:
        """Build from a ``CascadeConfig``, a dict of its fields, or a path to a JSON config file."""
        if isinstance(config, (str, Path)):
            config = CascadeConfig.load(config)
        elif isinstance(config, dict):
            config = CascadeConfig.from_dict(config)
        return cls(load_levels(config), config, planner=planner, params=params)

    @classmethod
    def from_pretrained(
        cls,
        target: str | Path,
        drafters: Sequence[str | Path] = (),
        *,
        mag: bool = True,
        k_matrix="auto",
        lenience: float = 1.0,
        adaptive: bool | None = None,
        mag_first: int | None = None,
        bigram: str | Path | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        runner: str = "auto",
        kernel: str = "auto",
        backend: str = "torch",
        drafter_outtype: str | None = None,
        tree: bool = False,
        tree_budget: int | None = None,
        drafter_window: int | None = None,
        params: EngineParams | None = None,
    ) -> Cascade:
        """Load a target and drafters from local Hugging Face folders or ``.gguf`` files (a front
        end over ``CascadeConfig``; the arguments are its fields, and ``params``)."""
        config = CascadeConfig(
            target=str(target),
            drafters=tuple(str(p) for p in drafters),
            mag=mag,
            k_matrix=k_matrix,
            lenience=lenience,
            adaptive=adaptive,
            mag_first=mag_first,
            bigram=None if bigram is None else str(bigram),
            device=device,
            dtype=dtype,
            runner=runner,
            kernel=kernel,
            backend=backend,
            drafter_outtype=drafter_outtype,
            tree=tree,
            tree_budget=tree_budget,
            drafter_window=drafter_window,
        )
        return cls.from_config(config, params=params)

    def with_config(self, config: CascadeConfig) -> Cascade:
        """A cascade over these already-loaded levels with another configuration (no reload) and
        the same engine parameters. The levels are shared: use one of the two cascades at a time."""
        return Cascade(self.levels, config, params=self.params)

    # -- configuration -------------------------------------------------------------------------

    def describe(self) -> dict:
        """The configuration as run (``"auto"`` resolved or planned; ``plan``: the plan and its
        prediction, None unless planned), as plain data for JSON records."""
        return {
            "target": self.target.name,
            "drafters": [d.name for d in self.drafters],
            "mag": self.mag is not None,
            "k_matrix": self.k_matrix.as_lists(),
            "lenience": self.lenience,
            "adaptive": self.adaptive,
            "mag_first": self.mag_first,
            "tree": self._step.tree_budget is not None,
            "tree_budget": self._step.tree_budget,
            "drafter_window": self.drafter_window,
            "device": str(self.device),
            "dtype": str(getattr(getattr(self.target, "runner", None), "dtype", "")).replace("torch.", ""),
            "runner": self.target.runner_name,
            "kernel": self.config.kernel,
            "level_runners": {level.name: level.runner_name for level in (self.target, *self.drafters)},
            "plan": self.plan.as_dict() if self.plan is not None else None,
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
        request = self._request(prompt, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos, stop)
        return GenerationResult.from_chunks(self._chunks(*request, streaming=False))

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
        level that drafted its tokens. Arguments are validated before the first chunk; closing
        the iterator early (or dropping it) stops the generation at the next step."""
        request = self._request(prompt, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos, stop)
        return self._chunks(*request, streaming=True)

    def _request(self, prompt, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos, stop):
        """Validated arguments of a generation (raises ``GenerationInputError``)."""
        params = SamplingParams(temperature, top_k, top_p, seed)
        prompt_ids = self.encode(prompt)
        self.validate_request(prompt_ids, max_new_tokens)
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if any(not isinstance(s, str) for s in stop):
            raise GenerationInputError("stop must be a string or a list of strings")
        if any(not s for s in stop):
            raise GenerationInputError("stop strings must not be empty (an empty string would match everywhere)")
        if stop and self.tokenizer is None:
            raise GenerationInputError("stop strings need a tokenizer")
        return prompt_ids, max_new_tokens, params, ignore_eos, stop

    def _chunks(self, prompt_ids, max_new_tokens, params, ignore_eos, stop, streaming) -> Iterator[StreamChunk]:
        with self._lock:
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
            self.synchronize()
            prefilled = time.perf_counter()
            ids = list(prompt_ids)
            num_steps = 0
            while out.finish_reason is None:
                report = step.step(ids, out.remaining)
                num_steps += 1
                for chunk in out.push(report.tokens, report.origins, step.names):
                    ids.extend(chunk.token_ids)
                    yield chunk
            self.synchronize()
            finished = time.perf_counter()
            emitted = [0] * len(step.levels)
            for origin in out.origins:
                emitted[origin] += 1
            level_stats = step.level_stats(emitted)  # before observing, which runs the levels again
            plan_seconds = 0.0
            if self.planner is not None and self.planner.observing:
                # after the clock: observing (and, once enough is seen, re-planning) is not decoding
                plan = self.planner.observe(prompt_ids, out.token_ids)
                if plan is not None:
                    self._use(plan)
                plan_seconds = time.perf_counter() - finished
            stats = GenerationStats(
                num_prompt_tokens=len(prompt_ids),
                num_new_tokens=len(out.token_ids),
                num_target_steps=num_steps,
                prefill_seconds=prefilled - started,
                decode_seconds=finished - prefilled,
                finish_reason=out.finish_reason,
                levels=level_stats,
                plan_seconds=plan_seconds,
            )
            yield out.finish(step.names[0], stats)

    def synchronize(self) -> None:
        """Wait for the device (CUDA) to finish queued work; a no-op on CPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
