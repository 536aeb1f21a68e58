"""``csd bench profile``: where the time of the hot path goes.

Two measurements, for every neural level (target and drafters):

1. **Per forward**, after caching a real prompt, at 1 and K new tokens: the raw transformers
   forward (``model(..., cache=DynamicCache)``), our backend's forward (``level.runner.forward``:
   the lean runner for Llama weights) and the whole ``level.next_token_logits`` call (the backend
   plus the level's bookkeeping: common prefix, tensor building, cache memo). The difference of
   the last two is the runner's per-forward overhead.
2. **Lean runner**: the matmul kernel chosen for every weight (``levels/kernels.py``) and where a
   forward's time goes: the output layer (the forward minus the same forward without logits),
   the projections and the attention (each timed alone, over every layer, with the runner's own
   kernels, weights and cache), and what is left: the small ops (norms, RoPE, cache writes,
   views) and Python, i.e. per-op overhead; with the forward's op count from torch.profiler.
   **llama.cpp** (``--backends llama.cpp``): per forward, the time inside ``llama_decode`` (the
   library's graph), ``LlamaCppRunner.forward`` around it (batch filling, ``seq_rm``, the logits
   copy: the runner's overhead) and the level call; no transformers forward or kernel split.
3. **In generation**: for each of our methods of a suite, one greedy generation with timers
   around every level's ``next_token_logits`` and backend forward and MaG's ``propose``; the rest
   of the decode time is the cascade logic (drafting schedule, verification, output).

Timers synchronize the device on CUDA, so the in-generation totals are slightly pessimistic there.
"""

from __future__ import annotations

import fnmatch
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class ProfileConfig:
    target: str
    drafters: list[str]
    device: str = "cpu"
    dtype: str = "float32"
    bigram: str | None = None
    runner: str = "auto"
    kernel: str = "auto"  # the lean runner's matmul kernel (CascadeConfig.kernel)
    prompts_file: str | None = None
    prompt_index: int = 0
    tokens: tuple[int, ...] = (1, 4, 8)
    repeats: int = 30
    max_new_tokens: int = 128
    suite_file: str | None = None
    suite: str = "default"
    only: list[str] | None = None
    extra_methods: list[tuple[str, dict]] = field(default_factory=list)
    out: Path | None = None
    backends: tuple[str, ...] = ("torch",)
    drafter_outtype: str = "q8_0"
    gguf_dir: Path | None = None


def _timed(fn, repeats: int, synchronize, setup=None) -> tuple[float, float]:
    """(best, median) milliseconds of ``fn()`` over ``repeats`` calls, after 3 untimed ones;
    ``setup()`` runs before each call, outside the timer. The best is the least disturbed by
    other work on a shared machine; the table reports it."""
    for _ in range(3):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        synchronize()
        started = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - started)
    return min(times) * 1000, statistics.median(times) * 1000


def per_forward(models, name: str, prompt_ids: list[int], tokens: list[int], repeats: int) -> list[dict]:
    """Rows of (level, new tokens, raw transformers forward, backend forward, next_token_logits) in ms."""
    rows = []
    for num_new in tokens:
        if num_new < 1 or num_new >= len(prompt_ids):
            raise ConfigError(f"--tokens values must be in 1..{len(prompt_ids) - 1}, got {num_new}")
        rows.append(_per_forward_at(models, name, prompt_ids, num_new, repeats))
    return rows


def _per_forward_at(models, name: str, prompt_ids: list[int], num_new: int, repeats: int) -> dict:
    """The three timings for the last ``num_new`` tokens of ``prompt_ids`` after caching the rest."""
    from transformers import DynamicCache

    model = models.modules[name]
    level = models.level(name)
    device = models.device
    sync = models.synchronize
    start = len(prompt_ids) - num_new
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    positions = torch.arange(start, len(prompt_ids), device=device).unsqueeze(0)  # (1, N)

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :start], cache=cache, use_cache=True, logits_to_keep=1)

        def crop():
            extra = cache.get_seq_length() - start
            if extra > 0:
                cache.crop(-extra)  # negative: drop that many trailing positions

        def hf_forward():
            model(input_ids=ids[:, start:], cache=cache, use_cache=True, position_ids=positions, logits_to_keep=num_new)

        hf_ms = _timed(hf_forward, repeats, sync, setup=crop)  # the crop is not the forward's cost

    level.reset()
    level.prefill(prompt_ids[:start])
    new_ids = list(prompt_ids[start:])
    backend_ms = _timed(lambda: level.runner.forward(new_ids, start, num_new), repeats, sync)
    level.reset()
    level.prefill(prompt_ids[:start])
    level_ms = _timed(lambda: level.next_token_logits(prompt_ids, num_new), repeats, sync)
    level.reset()
    return {
        "level": name,
        "runner": level.runner_name,
        "num_params": models.num_params[name],
        "context": start,
        "new_tokens": num_new,
        "repeats": repeats,
        "hf_forward_ms": hf_ms[0],
        "backend_forward_ms": backend_ms[0],
        "next_token_logits_ms": level_ms[0],
        "runner_overhead_ms": level_ms[0] - backend_ms[0],
        "median_ms": {"hf_forward": hf_ms[1], "backend_forward": backend_ms[1], "next_token_logits": level_ms[1]},
    }


def llama_per_forward(models, name: str, prompt_ids: list[int], tokens: list[int], repeats: int) -> list[dict]:
    """Per-forward rows of ``name``'s llama.cpp level: llama_decode alone, the runner's forward
    around it, the level call around that (ms, best of the repeats)."""
    levels = models.llama_levels()
    level = next(lv for lv in (levels.target, *levels.drafters) if lv.name == name)
    runner = level.runner
    lib = runner._lib
    real_decode = lib.llama_decode
    decode_times: list[float] = []

    def timed_decode(context, batch):
        started = time.perf_counter()
        status = real_decode(context, batch)
        decode_times.append(time.perf_counter() - started)
        return status

    rows = []
    for num_new in tokens:
        if num_new < 1 or num_new >= len(prompt_ids):
            raise ConfigError(f"--tokens values must be in 1..{len(prompt_ids) - 1}, got {num_new}")
        start = len(prompt_ids) - num_new
        new_ids = list(prompt_ids[start:])
        level.reset()
        level.prefill(prompt_ids[:start])
        lib.llama_decode = timed_decode  # the runner calls it through the module: time the library alone
        try:
            decode_times.clear()
            backend_ms = _timed(
                lambda ids=new_ids, at=start, n=num_new: runner.forward(ids, at, n), repeats, models.synchronize
            )
            decode_ms = min(decode_times) * 1000, statistics.median(decode_times) * 1000
        finally:
            lib.llama_decode = real_decode
        level.reset()
        level.prefill(prompt_ids[:start])
        level_ms = _timed(lambda n=num_new: level.next_token_logits(prompt_ids, n), repeats, models.synchronize)
        level.reset()
        rows.append(
            {
                "level": name,
                "runner": level.runner_name,
                "gguf": runner.path.name,
                "num_params": runner.num_params,
                "context": start,
                "new_tokens": num_new,
                "repeats": repeats,
                "hf_forward_ms": None,
                "llama_decode_ms": decode_ms[0],
                "backend_forward_ms": backend_ms[0],
                "next_token_logits_ms": level_ms[0],
                "runner_overhead_ms": level_ms[0] - backend_ms[0],
                "llama_runner_overhead_ms": backend_ms[0] - decode_ms[0],
                "median_ms": {
                    "llama_decode": decode_ms[1],
                    "backend_forward": backend_ms[1],
                    "next_token_logits": level_ms[1],
                },  # fmt: skip
            }
        )
    return rows


def kernel_rows(models, name: str) -> list[dict]:
    """The lean runner's kernel choice per weight (nothing for other runners)."""
    runner = models.level(name).runner
    if not hasattr(runner, "kernel_report"):
        return []
    return [{"level": name, **row} for row in runner.kernel_report()]


def forward_split(models, name: str, prompt_ids: list[int], tokens: list[int], repeats: int) -> list[dict]:
    """Per token count: a lean forward's time split into output layer, projections, attention
    and the rest (small ops and Python); nothing for other runners."""
    runner = models.level(name).runner
    if not hasattr(runner, "kernel_report"):
        return []
    return [_split_at(models, name, runner, prompt_ids, n, repeats) for n in tokens]


def _split_at(models, name: str, runner, prompt_ids: list[int], num_new: int, repeats: int) -> dict:
    """The split for the last ``num_new`` tokens of ``prompt_ids`` after caching the rest."""
    level = models.level(name)
    sync = models.synchronize
    start = len(prompt_ids) - num_new
    new_ids = list(prompt_ids[start:])
    level.reset()
    level.prefill(prompt_ids[:start])
    forward_ms = _timed(lambda: runner.forward(new_ids, start, num_new), repeats, sync)
    no_head_ms = _timed(lambda: runner.forward(new_ids, start, 0), repeats, sync)
    num_ops = _count_ops(lambda: runner.forward(new_ids, start, num_new))
    projections, attention = _layer_parts(runner, start, num_new)
    with torch.inference_mode():
        projections_ms = _timed(projections, repeats, sync)
        attention_ms = _timed(attention, repeats, sync)
    level.reset()
    rest = no_head_ms[0] - projections_ms[0] - attention_ms[0]
    return {
        "level": name,
        "context": start,
        "new_tokens": num_new,
        "forward_ms": forward_ms[0],
        "output_layer_ms": forward_ms[0] - no_head_ms[0],
        "projections_ms": projections_ms[0],
        "attention_ms": attention_ms[0],
        "rest_ms": rest,
        "num_ops": num_ops,
        "rest_us_per_op": 1000 * rest / num_ops if num_ops else None,
        "median_ms": {
            "forward": forward_ms[1],
            "forward_without_logits": no_head_ms[1],
            "projections": projections_ms[1],
            "attention": attention_ms[1],
        },
    }


def _layer_parts(runner, start: int, num_new: int):
    """Two calls over every layer of the lean runner (it reaches into ``levels/lean_llama.py``): its
    four matmuls with the kernels its forward runs for ``num_new`` tokens, and its attention over
    the cached keys and values of ``start + num_new`` positions, on random activations."""
    import torch.nn.functional as F

    from ..levels.kernels import bucket_index

    generator = torch.Generator(device=runner.device).manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, generator=generator, device=runner.device).to(runner.dtype)

    mm_qkv, mm_o_add, mm_gate_up, mm_down_add = runner._layer_kernels[bucket_index(num_new)]
    x, h_q = rand(num_new, runner.embed.shape[1]), rand(num_new, runner.q_size)  # (T, E), (T, H D)
    h_mid = rand(num_new, runner.intermediate)  # (T, I)

    def projections():
        for _, w_qkv, w_o, _, w_gate_up, w_down in runner.layers:
            mm_qkv(x, w_qkv)
            mm_o_add(h_q, w_o, x)
            mm_gate_up(x, w_gate_up)
            mm_down_add(h_mid, w_down, x)

    end = start + num_new
    q = rand(1, runner.num_heads, num_new, runner.head_dim)  # (1, H, T, D)
    mask = None
    if num_new > 1:  # as the forward builds it: additive, 0 / -inf
        positions = torch.arange(end, device=runner.device)
        hidden = positions.unsqueeze(0) > positions[start:].unsqueeze(-1)  # (T, S)
        mask = torch.zeros(hidden.shape, device=runner.device, dtype=runner.dtype).masked_fill_(hidden, float("-inf"))
    gqa = runner.num_kv_heads != runner.num_heads

    def attention():
        for k_layer, v_layer in zip(runner.k_layers, runner.v_layers):
            F.scaled_dot_product_attention(q, k_layer[:, :, :end], v_layer[:, :, :end], attn_mask=mask, enable_gqa=gqa)

    return projections, attention


def _count_ops(fn) -> int:
    """Tensor ops (outermost calls into ATen) one call of ``fn`` makes, by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for event in prof.events() if event.cpu_parent is None)


class _Stopwatch:
    """Accumulates time spent inside wrapped callables (instance attributes shadow the methods)."""

    def __init__(self, synchronize) -> None:
        self.synchronize = synchronize
        self.totals: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.paused = False
        self._restore: list[tuple[object, str]] = []

    def wrap(self, obj, attr: str, key: str) -> None:
        inner = getattr(obj, attr)

        def timed(*args, **kwargs):
            if self.paused:
                return inner(*args, **kwargs)
            self.synchronize()
            started = time.perf_counter()
            result = inner(*args, **kwargs)
            self.synchronize()
            self.totals[key] = self.totals.get(key, 0.0) + time.perf_counter() - started
            self.calls[key] = self.calls.get(key, 0) + 1
            return result

        setattr(obj, attr, timed)
        self._restore.append((obj, attr))

    def pause_during(self, obj, attr: str) -> None:
        """Time spent inside ``obj.attr`` (the prefill) is not counted by the wrapped callees."""
        inner = getattr(obj, attr)

        def paused(*args, **kwargs):
            self.paused = True
            try:
                return inner(*args, **kwargs)
            finally:
                self.paused = False

        setattr(obj, attr, paused)
        self._restore.append((obj, attr))

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()

    def restore(self) -> None:
        for obj, attr in reversed(self._restore):
            vars(obj).pop(attr, None)
        self._restore.clear()


def in_generation(models, methods, prompt_ids: list[int], max_new_tokens: int) -> list[dict]:
    """Per method: decode time split into model forwards, runner overhead, MaG and cascade logic."""
    from .records import Request
    from .runner import CascadeMethod

    request = Request(prompt_ids, max_new_tokens, True, True, 0.0, None, None, 0)
    results = []
    for method in methods:
        runner = CascadeMethod(method, models)
        cascade = runner.cascade
        watch = _Stopwatch(models.synchronize)
        levels = [cascade.target, *cascade.drafters]
        try:
            for level in levels:
                watch.pause_during(level, "prefill")
                watch.wrap(level, "next_token_logits", f"{level.name}:level")
                watch.wrap(level.runner, "forward", f"{level.name}:forward")
            if cascade.mag is not None:
                watch.wrap(cascade.mag, "propose", "mag:propose")
            runner.generate(request)  # warm-up
            watch.reset()
            outcome = runner.generate(request)
        finally:
            watch.restore()
        decode_ms = (outcome.decode_seconds or 0.0) * 1000
        entry = {
            "method": method.name,
            "k_matrix": cascade.k_matrix.as_lists(),
            "num_new_tokens": len(outcome.token_ids),
            "decode_ms": decode_ms,
            "levels": [],
        }
        accounted = 0.0
        for level in levels:
            level_ms = watch.totals.get(f"{level.name}:level", 0.0) * 1000
            forward_ms = watch.totals.get(f"{level.name}:forward", 0.0) * 1000
            calls = watch.calls.get(f"{level.name}:level", 0)
            accounted += level_ms
            entry["levels"].append(
                {
                    "level": level.name,
                    "calls": calls,
                    "forward_ms": forward_ms,
                    "runner_overhead_ms": level_ms - forward_ms,
                    "forward_ms_per_call": forward_ms / calls if calls else None,
                    "overhead_ms_per_call": (level_ms - forward_ms) / calls if calls else None,
                }
            )
        mag_ms = watch.totals.get("mag:propose", 0.0) * 1000
        entry["mag_ms"] = mag_ms
        entry["mag_calls"] = watch.calls.get("mag:propose", 0)
        entry["cascade_logic_ms"] = decode_ms - accounted - mag_ms
        results.append(entry)
    return results


def render_kernels(choices: list[dict], splits: list[dict]) -> list[str]:
    """The lean runner's kernel choice per weight and the split of its forwards."""
    from ..levels.kernels import BUCKETS

    lines = []
    if choices:
        lines += [
            "",
            "### Lean runner: kernel per weight (`levels/kernels.py`)",
            "",
            "One layout per weight; the kernel each bucket of new tokens runs; expected ms: the layout "
            "rule's mean over decoding's mix of buckets (forced: no timing).",
            "",
            f"| level | weight | shape (out × in) | layout | {' | '.join(BUCKETS)} | expected ms |",
            "|---|---|---|---|" + "---|" * len(BUCKETS) + "---:|",
        ]
        for c in choices:
            kernels_by_bucket = " | ".join(c["kernels"][b] for b in BUCKETS)
            expected = "forced" if c["forced"] else f"{c['expected_ms']:.3f}"
            lines.append(
                f"| {c['level']} | {c['weight']} | {c['shape'][0]} × {c['shape'][1]} | {c['layout']} "
                f"| {kernels_by_bucket} | {expected} |"
            )
    if splits:
        lines += [
            "",
            "### Lean runner: where a forward goes (best of the repeats, ms)",
            "",
            "output layer: the forward minus the same forward without logits (final norm included); "
            "projections and attention: timed alone over every layer with the runner's kernels and "
            "cache; rest: the forward without logits minus those two — the small ops (norms, RoPE, "
            "cache writes, views) and Python: per-op overhead. ops: tensor ops per forward (torch.profiler).",
            "",
            "| level | new tokens | forward | output layer | projections | attention | rest | ops | rest per op (µs) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in splits:
            lines.append(
                f"| {r['level']} | {r['new_tokens']} | {r['forward_ms']:.3f} | {r['output_layer_ms']:.3f} "
                f"| {r['projections_ms']:.3f} | {r['attention_ms']:.3f} | {r['rest_ms']:.3f} | {r['num_ops']} "
                f"| {_fmt(r['rest_us_per_op'])} |"
            )
    return lines


def render(micro: list[dict], generation: list[dict], header: str) -> list[str]:
    lines = [
        header,
        "",
        "### Per forward (best of the repeats, ms; medians in profile.json)",
        "",
        "transformers forward: the model with a `DynamicCache` (what `generate` runs per step); backend "
        "forward: our runner's forward alone; `next_token_logits`: the whole level call. runner overhead "
        "= `next_token_logits` − backend forward: what our level adds around each model call.",
        "",
        "For llama.cpp rows, `llama_decode`: the library's call alone; the backend forward adds the "
        "runner's batch filling, cache removal and logits copy.",
        "",
        "| level | runner | context | new tokens | transformers forward | llama_decode | backend forward "
        "| next_token_logits | runner overhead |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in micro:
        lines.append(
            f"| {r['level']} | {r['runner']} | {r['context']} | {r['new_tokens']} | {_fmt(r['hf_forward_ms'])} "
            f"| {_fmt(r.get('llama_decode_ms'))} | {r['backend_forward_ms']:.3f} | {r['next_token_logits_ms']:.3f} "
            f"| {r['runner_overhead_ms']:.3f} |"
        )
    if generation:
        lines += [
            "",
            "### In generation (greedy, ms of decode time)",
            "",
            "| method | tokens | decode | level: calls, forwards, runner overhead (per call) | MaG | cascade logic |",
            "|---|---:|---:|---|---:|---:|",
        ]
        for g in generation:
            parts = "; ".join(
                f"{lv['level']}: {lv['calls']}, {lv['forward_ms']:.1f} ({_fmt(lv['forward_ms_per_call'])}), "
                f"{lv['runner_overhead_ms']:.1f} ({_fmt(lv['overhead_ms_per_call'])})"
                for lv in g["levels"]
                if lv["calls"]
            )
            lines.append(
                f"| {g['method']} | {g['num_new_tokens']} | {g['decode_ms']:.1f} | {parts} "
                f"| {g['mag_ms']:.1f} ({g['mag_calls']} calls) | {g['cascade_logic_ms']:.1f} |"
            )
    return lines


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def run_profile(config: ProfileConfig, log=print) -> dict:
    from ..prompts import DEFAULT_PROMPTS_FILE, load_prompts
    from .models import Models
    from .runner import device_name, environment
    from .suite import LLAMA_SUFFIX, build_suite, load_suite_file

    if config.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {config.repeats}")
    models = Models.for_config(config)
    prompts = load_prompts(config.prompts_file or DEFAULT_PROMPTS_FILE)
    if not 0 <= config.prompt_index < len(prompts):
        raise ConfigError(f"--prompt-index must be in 0..{len(prompts) - 1}")
    prompt_ids = list(models.tokenizer(prompts[config.prompt_index]["text"])["input_ids"])
    micro, choices, splits = [], [], []
    for name in [models.target_name, *models.drafter_names]:
        if "torch" in config.backends:
            micro.extend(per_forward(models, name, prompt_ids, list(config.tokens), config.repeats))
            choices.extend(kernel_rows(models, name))
            splits.extend(forward_split(models, name, prompt_ids, list(config.tokens), config.repeats))
        if "llama.cpp" in config.backends:
            micro.extend(llama_per_forward(models, name, prompt_ids, list(config.tokens), config.repeats))

    suite = build_suite(
        load_suite_file(config.suite_file),
        config.suite,
        models.drafter_names,
        extra_methods=config.extra_methods,
        backends=list(config.backends),
    )
    methods = [m for m in suite.methods if m.engine == "csd"]
    if config.only:
        names = {m.name: (m.name, m.name.removesuffix(LLAMA_SUFFIX)) for m in methods}  # as --only in csd bench
        methods = [m for m in methods if any(fnmatch.fnmatchcase(x, p) for p in config.only for x in names[m.name])]
    generation = in_generation(models, methods, prompt_ids, config.max_new_tokens)

    env = environment(models.device, config.dtype, config.kernel)
    header = (
        f"## Hot-path profile: {device_name(models.device)} ({env['device']}, {env['num_threads']} threads), "
        f"{config.dtype}, prompt {prompts[config.prompt_index]['id']} ({len(prompt_ids)} tokens); "
        f"torch {env['torch']}, transformers {env['transformers']}"
    )
    lines = render(micro, generation, header)
    lines[1:1] = render_kernels(choices, splits)
    for line in lines:
        log(line)
    result = {
        "env": env,
        "per_forward": micro,
        "kernels": choices,
        "forward_split": splits,
        "in_generation": generation,
    }
    if config.out is not None:
        config.out.mkdir(parents=True, exist_ok=True)
        (config.out / "profile.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (config.out / "profile.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        log(f"wrote {config.out / 'profile.md'} and profile.json")
    return result
