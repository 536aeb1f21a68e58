"""The benchmark loop: every method on the same prompts, in one process, interleaved.

Models load once and every method shares them: the transformers peers call ``generate`` on the
loaded modules, and each of our configurations is a ``Cascade`` over shared ``ModelLevel``s (a
level is reset at the start of every generation, so sharing is safe when one runs at a time).

Timing is ``csdrafting.timing``'s (shared with ``csd tune``): for each trial, prompt, generation
length and mode (the cases), every method runs once, in an order rotated from case to case so no
method always runs first; wall time around the whole call, after a device synchronize on CUDA;
setup garbage frozen and a collection before every call, outside the timer. Before the timed loop
each method runs one warm-up generation per decoding (greedy, sampling), not recorded.

Each generation becomes one JSON line (see ``docs/bench.md`` for the schema). Greedy rows record
whether their tokens equal the baseline's (transformers plain ``generate``) for the same prompt.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import timing
from ..errors import ConfigError
from ..levels.kernels import cpu_model
from ..paths import PACKAGE_DIR
from .llama_server_peer import LlamaServerPeer
from .llamacpp_peers import LlamaCppPeer
from .models import Models
from .records import Outcome, Request
from .suite import Method, Suite
from .workload import encode_prompt, record_fixed_length, record_max_new_tokens

SCHEMA = "csd-bench/1"
COST_MODEL_LABEL = (
    "cost model (the paper's standardized walltime improvement): new tokens / "
    "sum over levels of forward calls x parameters relative to the target"
)


# -- environment -------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def environment(device: torch.device, dtype: str, kernel: str) -> dict:
    """Versions and machine, recorded on every row."""
    import numpy
    import transformers

    from .. import __version__

    commit, dirty = None, None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
        if commit:
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=PACKAGE_DIR,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout
            dirty = bool(status.strip())
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "csdrafting": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name(device),
        "dtype": dtype,
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "kernel": kernel,  # the lean runner's matmul kernels (forced or timed)
    }


# -- memory ------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class MemoryProbe:
    """Peak memory of one generation.

    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak. CPU: the process's peak
    RSS (VmHWM); Linux lets a process reset it (``/proc/self/clear_refs``), giving a per-row peak
    (``scope: row``); elsewhere the peak only grows over the run (``scope: process``), and the
    current RSS after the row is recorded too.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.can_reset = False
        if not self.cuda:
            try:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")
                self.can_reset = _proc_status_kib("VmHWM") is not None
            except OSError:
                self.can_reset = False
        self.start_bytes = 0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            return
        if self.can_reset:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        self.start_bytes = (_proc_status_kib("VmRSS") or 0) * 1024

    def stop(self) -> dict:
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            current = torch.cuda.memory_allocated(self.device)
            kind, scope = "cuda_max_allocated", "row"
        else:
            peak = (_proc_status_kib("VmHWM") or 0) * 1024
            current = (_proc_status_kib("VmRSS") or 0) * 1024
            kind, scope = "rss", ("row" if self.can_reset else "process")
        return {
            "kind": kind,
            "scope": scope,
            "peak_bytes": peak,
            "current_bytes": current,
            "start_bytes": self.start_bytes,
            "peak_increase_bytes": max(0, peak - self.start_bytes),
        }


# -- one generation ----------------------------------------------------------------------------


class _FirstTokenClock:
    """A transformers streamer that notes when the first new token arrives (the prompt comes first)."""

    def __init__(self, synchronize) -> None:
        self.synchronize = synchronize
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.synchronize()
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


class TransformersMethod:
    """A peer: ``model.generate`` of the target, optionally with an assistant or prompt lookup."""

    def __init__(self, method: Method, models: Models) -> None:
        self.method = method
        self.models = models
        self.model = models.modules[models.target_name]
        self.assistant_name = method.spec.get("assistant")
        self.options = dict(method.spec.get("generate_options", {}))
        if self.assistant_name is not None:
            self.options["assistant_model"] = models.modules[self.assistant_name]
        if method.spec.get("prompt_lookup_num_tokens") is not None:
            self.options["prompt_lookup_num_tokens"] = method.spec["prompt_lookup_num_tokens"]
        self.level_names = [models.target_name] + ([self.assistant_name] if self.assistant_name else [])
        self.config = {
            "engine": "transformers",
            "target": models.target_name,
            "assistant": self.assistant_name,
            "prompt_lookup_num_tokens": method.spec.get("prompt_lookup_num_tokens"),
            "generate_options": method.spec.get("generate_options", {}),
            "device": str(models.device),
            "dtype": models.dtype_name,
        }

    def generate(self, request: Request) -> Outcome:
        models = self.models
        input_ids = torch.tensor([request.prompt_ids], dtype=torch.long, device=models.device)
        kwargs = dict(
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=request.max_new_tokens,
            pad_token_id=models.pad_token_id,
            **self.options,
        )
        if request.fixed_length:
            # ignore EOS (generate past it) exactly as our ignore_eos does; min_new_tokens would
            # instead forbid EOS, a different distribution and different greedy tokens
            kwargs["eos_token_id"] = None
        if request.greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=request.temperature, top_p=request.top_p)
            kwargs["top_k"] = request.top_k or 0  # transformers defaults to top_k=50; 0 turns it off
            torch.manual_seed(request.seed)
        clock = _FirstTokenClock(models.synchronize)
        for name in self.level_names:
            models.num_forwards[name] = 0
        models.synchronize()
        started = time.perf_counter()
        output = self.model.generate(input_ids, streamer=clock, **kwargs)
        models.synchronize()
        wall = time.perf_counter() - started
        tokens = output[0, len(request.prompt_ids) :].tolist()
        finish = "length"
        if not request.fixed_length and tokens and tokens[-1] in models.eos_token_ids:
            finish = "eos"
        prefill = clock.first_token_at - started if clock.first_token_at is not None else None
        levels = [
            {
                "name": name,
                "kind": "target" if i == 0 else "drafter",
                "num_forwards": models.num_forwards[name],
                "num_params": models.num_params[name],
            }
            for i, name in enumerate(self.level_names)
        ]
        return Outcome.of_peer(tokens, finish, prefill, wall, levels, self.config)


class CascadeMethod:
    """One of ours: a ``Cascade`` over the shared levels."""

    def __init__(self, method: Method, models: Models) -> None:
        from ..cascade import Cascade
        from ..config import CascadeConfig

        spec = method.spec
        runner = spec.get("runner")
        self.backend = method.backend
        self.level_names = [models.target_name, *spec["drafters"]]
        config = CascadeConfig(
            target=models.target_name,
            drafters=tuple(spec["drafters"]),
            mag=spec["mag"],
            k_matrix=spec["k_matrix"],
            lenience=spec["lenience"],
            adaptive=spec.get("adaptive"),
            mag_first=spec.get("mag_first"),
            drafter_window=spec.get("drafter_window"),  # drafters read the prompt's end only (levels/window.py)
            tree=spec.get("tree", False),
            tree_budget=spec.get("tree_budget"),
        )
        if self.backend == "llama.cpp":
            levels = models.llama_levels()
            dtype = {n: str(models.gguf(n).name) for n in self.level_names}  # the GGUFs (f32 target)
        else:
            levels = models.levels(spec["drafters"], runner)
            dtype = models.dtype_name
        self.cascade = Cascade(levels, config)
        self.models = models
        self.config = {"engine": "csd", **self.cascade.describe(), "dtype": dtype, "backend": self.backend}
        self.config["bigram"] = models.bigram_path if spec["mag"] else None

    def generate(self, request: Request) -> Outcome:
        # "auto" may re-plan after a generation: record the plan this one ran
        config = self.config if self.cascade.plan is None else {**self.config, **self.cascade.describe()}
        result = self.cascade.generate(
            request.prompt_ids,
            max_new_tokens=request.max_new_tokens,
            temperature=0.0 if request.greedy else request.temperature,
            top_k=None if request.greedy else request.top_k,
            top_p=None if request.greedy else request.top_p,
            seed=None if request.greedy else request.seed,
            ignore_eos=request.fixed_length,
        )
        stats = result.stats.as_dict()
        return Outcome(
            token_ids=list(result.token_ids),
            finish_reason=result.finish_reason,
            prefill_seconds=stats["prefill_seconds"],
            decode_seconds=stats["decode_seconds"],
            levels=stats["levels"],
            tokens_per_target_step=stats["tokens_per_target_step"],
            acceptance_rate=stats["acceptance_rate"],
            config=config,
            # plan_seconds: "auto" observing this generation and re-planning, after its decoding
            engine_stats={
                k: stats[k] for k in ("num_target_steps", "tokens_per_second", "finish_reason", "plan_seconds")
            },
        )


def make_runner(method: Method, models: Models):
    if method.engine == "transformers":
        return TransformersMethod(method, models)
    if method.engine == "llama.cpp":
        return LlamaCppPeer(method, models)
    if method.engine == "llama-server":
        return LlamaServerPeer(method, models)
    return CascadeMethod(method, models)


def cost_model(levels: list[dict], num_new_tokens: int, target_params: int) -> tuple[float | None, float | None]:
    """(cost in target forwards, standardized walltime improvement): the paper's cost model,
    with parameter counts as the relative cost of a forward. MaG costs nothing."""
    cost = sum((lv.get("num_forwards") or 0) * (lv.get("num_params") or 0) for lv in levels) / target_params
    if cost <= 0 or num_new_tokens == 0:
        return (cost if cost > 0 else None), None
    return cost, num_new_tokens / cost


# -- the loop ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    target: str
    drafters: list[str]
    suite: Suite
    prompts: list[dict]
    output: Path
    device: str = "cpu"
    dtype: str = "float32"
    bigram: str | None = None
    runner: str = "auto"
    kernel: str = "auto"  # the lean runner's matmul kernel (CascadeConfig.kernel)
    trials: int = 1
    warmup: int = 1
    seed: int = 0
    temperature: float = 0.7
    top_k: int | None = None
    top_p: float | None = 0.95
    progress: bool = True
    save_tokens: bool = False
    prompts_file: str | None = None
    drafter_outtype: str = "q8_0"  # llama.cpp drafters' GGUF type (the target stays f32)
    gguf_dir: Path | None = None  # where converted GGUFs are cached (default: the user cache)


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, desc="csd bench", unit="gen", file=sys.stderr, dynamic_ncols=True)


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _quiet_transformers():
    """No transformers progress bars or generation warnings inside the timed loop."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def run_benchmark(config: BenchConfig, log=print) -> Path:
    """Run the suite, write one JSON line per generation to ``config.output``; returns the path."""
    suite = config.suite
    started_at = datetime.datetime.now(datetime.timezone.utc)
    clock_start = time.perf_counter()
    models = Models.for_config(config)
    common = _common_fields(config, models, started_at)
    env = common["env"]
    runners = {m.name: make_runner(m, models) for m in suite.methods}
    methods = list(suite.methods)
    prompt_ids = _encode_prompts(config, models)
    decodings = list(dict.fromkeys(m.split("-")[0] for m in suite.modes))
    num_rows = config.trials * len(config.prompts) * len(suite.lengths) * len(suite.modes) * len(methods)
    num_warmup = config.warmup * len(decodings) * len(methods)
    log(
        f"csd bench: suite {suite.name}, {len(methods)} methods x {len(config.prompts)} prompts x "
        f"{len(suite.modes)} modes x {len(suite.lengths)} lengths x {config.trials} trials = {num_rows} "
        f"generations (+{num_warmup} warm-up) on {env['device_name']} ({config.dtype}, "
        f"{env['num_threads']} threads) -> {config.output}"
    )
    memory = MemoryProbe(models.device)
    config.output.parent.mkdir(parents=True, exist_ok=True)
    bar = _progress(num_rows + num_warmup, config.progress)
    loop = _BenchLoop(config, models, runners, bar, memory)
    cases = [
        _Case(p, prompt, ids, length, m, mode)
        for p, (prompt, ids) in enumerate(zip(config.prompts, prompt_ids))
        for length in suite.lengths
        for m, mode in enumerate(suite.modes)
    ]
    try:
        with _quiet_transformers(), timing.frozen_setup_garbage(), open(config.output, "w", encoding="utf-8") as sink:
            for decoding in decodings:  # warm-up: one generation per method and decoding, not recorded
                for _ in range(config.warmup):
                    timing.warm_up(methods, lambda method, d=decoding: loop.warm(method, d, prompt_ids[0]))
            timed_calls = timing.interleaved(
                methods, cases, config.trials, loop.generate, models.synchronize, order_offset=lambda i, c: c.mode_index
            )
            for group in _by_case(timed_calls, len(methods)):  # rows are written when every method has run
                for row in loop.rows(group, common):
                    sink.write(json.dumps(row) + "\n")
                sink.flush()
    finally:
        bar.close()
        for runner in runners.values():  # peers in their own processes (llama-server) stop here
            if hasattr(runner, "close"):
                runner.close()
    elapsed = time.perf_counter() - clock_start
    log(f"csd bench: {num_rows} rows in {elapsed:.0f} s -> {config.output}")
    return config.output


def _common_fields(config: BenchConfig, models: Models, started_at: datetime.datetime) -> dict:
    """The fields every row of this run starts with: the run, the suite and the environment."""
    env = environment(models.device, config.dtype, config.kernel)
    if any(m.backend == "llama.cpp" for m in config.suite.methods):
        import llama_cpp

        env["llama_cpp_python"] = llama_cpp.__version__
        env["drafter_outtype"] = config.drafter_outtype
    return {
        "schema": SCHEMA,
        "run_id": started_at.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6],
        "started_at": started_at.isoformat(timespec="seconds"),
        "suite": config.suite.name,
        "prompts_file": config.prompts_file,
        "env": env,
    }


def _encode_prompts(config: BenchConfig, models: Models) -> list[list[int]]:
    """The prompts' token ids (a workload's ``messages`` through the target's chat template); each must
    leave room in the target's context for its longest generation."""
    prompt_ids = [encode_prompt(p, models.tokenizer) for p in config.prompts]
    for prompt, ids in zip(config.prompts, prompt_ids):
        longest = record_max_new_tokens(prompt, max(config.suite.lengths))
        if not ids:
            raise ConfigError(f"prompt {prompt['id']} encodes to no tokens")
        if len(ids) + longest > models.max_context:
            raise ConfigError(
                f"prompt {prompt['id']} ({len(ids)} tokens) + {longest} new tokens exceeds the target's "
                f"context of {models.max_context} tokens"
            )
    return prompt_ids


@dataclass
class _Case:
    """One prompt, generation length and mode: every method runs it once per trial."""

    prompt_index: int
    prompt: dict
    prompt_ids: list[int]
    length: int
    mode_index: int
    mode: str


def _request(config: BenchConfig, prompt: dict, ids: list[int], length: int, mode: str, seed: int) -> Request:
    """One generation's request; a workload record's ``max_new_tokens`` and ``ignore_eos`` win over
    the suite's length and the mode's stop rule."""
    decoding, stop = mode.split("-")
    return Request(
        prompt_ids=ids,
        max_new_tokens=record_max_new_tokens(prompt, length),
        greedy=decoding == "greedy",
        fixed_length=record_fixed_length(prompt, stop == "fixed"),
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        seed=seed,
    )


def _case_request(config: BenchConfig, case: _Case, trial: int) -> Request:
    """A case's request in one trial: sampling seeds differ by trial and prompt."""
    seed = config.seed + 1000 * trial + case.prompt_index
    return _request(config, case.prompt, case.prompt_ids, case.length, case.mode, seed)


def _by_case(timed_calls, num_methods: int):
    """The timed calls in groups of one case's calls (every method once)."""
    group = []
    for timed in timed_calls:
        group.append(timed)
        if len(group) == num_methods:
            yield group
            group = []


class _BenchLoop:
    """What the timed loop calls: a method's generation for a case, a warm-up, and a case's rows."""

    def __init__(self, config: BenchConfig, models: Models, runners: dict, bar, memory: MemoryProbe) -> None:
        self.config = config
        self.models = models
        self.runners = runners
        self.bar = bar
        self.memory = memory
        self.target_params = models.num_params[models.target_name]

    def generate(self, method: Method, case: _Case, trial: int) -> tuple[Outcome, dict]:
        self.bar.set_postfix_str(f"{case.prompt['id']} {case.mode} {case.length} {method.name}")
        self.memory.start()
        outcome = self.runners[method.name].generate(_case_request(self.config, case, trial))
        self.bar.update()
        memory = self.memory.stop()
        # a peer in its own process (llama-server) measures that process: our RSS says nothing of it
        return outcome, outcome.memory or memory

    def warm(self, method: Method, decoding: str, ids: list[int]) -> None:
        self.bar.set_postfix_str(f"warm-up {method.name} {decoding}")
        longest = max(self.config.suite.lengths)
        prompt = {**self.config.prompts[0], "ignore_eos": True}  # the whole length, whatever the record says
        request = _request(self.config, prompt, ids, longest, f"{decoding}-fixed", self.config.seed)
        self.runners[method.name].generate(request)
        self.bar.update()

    def rows(self, group: list, common: dict) -> list[dict]:
        """One case's rows, in suite order; greedy tokens compared with the baseline of each method's backend."""
        by_method = {t.method.name: t for t in group}
        req = _case_request(self.config, group[-1].case, group[-1].trial)
        rows = []
        for method in self.config.suite.methods:
            timed = by_method[method.name]
            baseline = self.config.suite.baseline_of(method)
            baseline_tokens = by_method[baseline].result[0].token_ids
            row = self._row({**common, "baseline": baseline}, timed, req, baseline_tokens)
            row["run_position"] = timed.position
            rows.append(row)
        return rows

    def _row(self, common: dict, timed, req: Request, baseline_tokens: list[int]) -> dict:
        method, case = timed.method, timed.case
        outcome, mem = timed.result
        decoding = case.mode.split("-")[0]
        stop = "fixed" if req.fixed_length else "natural"  # a workload record may override the mode's
        greedy = decoding == "greedy"
        num_new = len(outcome.token_ids)
        cost, swi = cost_model(outcome.levels, num_new, self.target_params)
        mismatch = _first_mismatch(outcome.token_ids, baseline_tokens) if greedy else None
        row = {
            **common,
            **_method_fields(method, outcome, self.models),
            "prompt_id": case.prompt["id"],
            "prompt_index": case.prompt_index,
            "num_prompt_tokens": len(req.prompt_ids),
            "trial": timed.trial,
            "mode": case.mode,
            "decoding": decoding,
            "stop": stop,
            "max_new_tokens": req.max_new_tokens,
            "sampling": {
                "temperature": 0.0 if greedy else req.temperature,
                "top_k": None if greedy else req.top_k,
                "top_p": None if greedy else req.top_p,
                "seed": None if greedy else req.seed,
                "ignore_eos": req.fixed_length,
            },
            **_speed_fields(outcome, timed.seconds),
            "cost_target_forwards": cost,
            "swi": swi,
            "matches_baseline": (mismatch is None) if greedy else None,
            "first_mismatch": mismatch,
            "memory": mem,
        }
        if outcome.engine_stats is not None:
            row["engine_stats"] = outcome.engine_stats
        if self.config.save_tokens:
            row["token_ids"] = outcome.token_ids
        return row


def _first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _method_fields(method: Method, outcome: Outcome, models: Models) -> dict:
    """The method, its configuration, the models it used and their bytes."""
    used = [lv["name"] for lv in outcome.levels if lv.get("kind") in ("target", "drafter")]
    runner = method.spec.get("runner") if method.engine == "csd" else None
    if method.backend == "llama.cpp":  # weights: the GGUF files llama.cpp maps
        weights_bytes, runner_bytes = sum(models.gguf(n).stat().st_size for n in used), 0
    else:
        weights_bytes = sum(models.weight_bytes[n] for n in used)
        runner_bytes = sum(models.runner_bytes(n, runner) for n in used) if method.engine == "csd" else 0
    return {
        "method": method.name,
        "engine": method.engine,
        "backend": method.backend,
        "ablation": method.ablation,
        "spec": method.spec,
        "config": outcome.config,
        "models": models.describe(used),
        "weights_bytes": weights_bytes,
        "runner_bytes": runner_bytes,
    }


def _speed_fields(outcome: Outcome, wall_seconds: float) -> dict:
    """Tokens, times and forwards of one generation."""
    num_new = len(outcome.token_ids)
    return {
        "num_new_tokens": num_new,
        "finish_reason": outcome.finish_reason,
        "wall_seconds": wall_seconds,
        "tokens_per_second": num_new / wall_seconds if wall_seconds > 0 else None,
        "prefill_seconds": outcome.prefill_seconds,
        "decode_seconds": outcome.decode_seconds,
        "decode_tokens_per_second": (num_new / outcome.decode_seconds if outcome.decode_seconds else None),
        "tokens_per_target_step": outcome.tokens_per_target_step,
        "acceptance_rate": outcome.acceptance_rate,
        "num_forwards": {lv["name"]: lv.get("num_forwards") for lv in outcome.levels},
        "levels": outcome.levels,
    }
