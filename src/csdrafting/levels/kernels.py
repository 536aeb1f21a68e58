"""Matrix-multiply kernels for the lean runner, chosen per machine by timing them.

Why: at decoding's skinny shapes (1 to ~16 token rows against a weight matrix) the BLAS path
behind ``F.linear`` is far from the hardware on some CPUs and fine on others. On the AMD EPYC
machines of this project a pycode-22m forward took 7.1 ms with ``F.linear`` everywhere, 5.2 ms
with matmuls against transposed contiguous copies and 2.9 ms with oneDNN on pre-packed weights
(one token, float32, 2 threads); on an Intel Xeon the transposed layout was 2% faster. So
nothing is assumed: the candidates are timed on the machine and the fastest kept.

**Kernels** (one matmul ``x (T, in) -> (T, out)`` each, and the same with a residual added):

* ``linear``: ``F.linear`` on the weight as transformers stores it, ``(out, in)``;
* ``onednn``: oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``) on that same layout;
* ``transposed``: ``torch.mm`` against a transposed contiguous copy, ``(in, out)``;
* ``packed``: oneDNN on the weight reordered into its blocked format (an opaque tensor).

``onednn`` and ``packed`` exist for CPU float32 / bfloat16 / float16 only (oneDNN has no float64).
Which layouts a weight may take is the runner's call (``plan``'s ``layouts``): a packed weight
cannot be a view with transformers' layout, so the module loses its copy; a transposed one can
(``.t()``), but the module can then no longer be saved with ``save_pretrained``.

**A choice** is made per weight shape. Each kernel is timed at one token count per
**bucket** of new tokens (``BUCKETS``: 1, 2-4, 5-16, 17+). Each weight is stored once, so one
layout (plain, transposed, packed) must serve every bucket; within that layout each bucket uses
its fastest kernel (e.g. a plain weight may run ``linear`` for one token and ``onednn`` for
four). **The layout rule**: the layout with the least expected time per forward over the mix of
forwards decoding runs (``BUCKET_MIX``: half the forwards are one token — plain decoding and
every drafter step — most of the rest verify 2 to 16 draft tokens, a few are prompts), each
bucket at its fastest kernel in that layout. Another layout than transformers' own must beat it
by ``MIN_GAIN`` (noise must not move the weights around).

**Cache**: the measured times are kept as JSON in ``$XDG_CACHE_HOME/csdrafting/kernels.json``
(or ``~/.cache/csdrafting``), keyed by CPU model, torch version, thread count, device and dtype;
a model with a shape the cache lacks has all its shapes timed and added; an unreadable file is
ignored (and rewritten). A kernel name instead of ``auto`` (``CascadeConfig.kernel``, whose CLI
default is ``$CSDRAFTING_KERNEL``) forces one kernel for every weight and bucket, without timing.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..files import atomic_write_text, cache_dir

AUTO = "auto"
BUCKETS = ("1", "2-4", "5-16", "17+")  # new-token counts; see bucket_index
BUCKET_TOKENS = (1, 4, 12, 32)  # the token count each bucket is timed at
BUCKET_MIX = (0.5, 0.3, 0.18, 0.02)  # assumed share of forwards per bucket (the layout rule)
MIN_GAIN = 0.03  # another layout than transformers' must be this much faster in expectation
LAYOUTS = ("plain", "transposed", "packed")
CACHE_SCHEMA = 1


def bucket_index(num_tokens: int) -> int:
    """The bucket of a forward over ``num_tokens`` rows: 0 for 1, 1 for 2-4, 2 for 5-16, 3 above."""
    if num_tokens <= 1:
        return 0
    if num_tokens <= 4:
        return 1
    return 2 if num_tokens <= 16 else 3


# -- the kernels ---------------------------------------------------------------------------------


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def _onednn_add(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, None, "add")


@dataclass(frozen=True)
class Kernel:
    """``matmul(x, stored)`` is ``x @ W.T`` (T, out); ``matmul_add(x, stored, r)`` is ``r + x @ W.T``
    in one op. ``stored`` is the weight in ``layout`` (``to_layout``)."""

    name: str
    layout: str
    matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    matmul_add: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


KERNELS = {
    k.name: k
    for k in (
        Kernel("linear", "plain", F.linear, lambda x, w, r: torch.addmm(r, x, w.t())),
        Kernel("onednn", "plain", _onednn, _onednn_add),
        Kernel("transposed", "transposed", torch.mm, lambda x, w, r: torch.addmm(r, x, w)),
        Kernel("packed", "packed", _onednn, _onednn_add),
    )
}
ONEDNN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def onednn_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in ONEDNN_DTYPES
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def available_kernels(device: torch.device, dtype: torch.dtype) -> list[str]:
    return ["linear", "transposed"] + (["onednn", "packed"] if onednn_available(device, dtype) else [])


def to_layout(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """``weight`` (out, in) in ``layout``: itself, a transposed contiguous copy (in, out), or
    oneDNN's packed blocks (an opaque tensor whose shape still reads (out, in))."""
    if layout == "plain":
        return weight
    if layout == "transposed":
        return weight.t().contiguous()
    if layout == "packed":
        return torch.ops.mkldnn._reorder_linear_weight(weight, None)
    raise ValueError(f"unknown layout {layout!r}")


# -- choosing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightChoice:
    """How one weight shape is stored and multiplied: one layout, one kernel per bucket.
    ``times_ms``: bucket -> kernel -> ms as measured, None for a kernel found unusable (empty
    when forced)."""

    layout: str
    kernels: tuple[str, ...]  # one per bucket, all of this layout
    times_ms: dict
    forced: bool = False

    def kernel(self, bucket: int) -> Kernel:
        return KERNELS[self.kernels[bucket]]

    def expected_ms(self) -> float | None:
        if not self.times_ms:
            return None
        return sum(m * self.times_ms[b][k] for m, b, k in zip(BUCKET_MIX, BUCKETS, self.kernels))


def choose(times_ms: dict, allowed: Iterable[str]) -> WeightChoice:
    """The layout rule (module docstring) over measured ``times_ms`` (bucket -> kernel -> ms),
    among the ``allowed`` kernels."""
    allowed = [k for k in allowed if all(_is_time(times_ms[b].get(k)) for b in BUCKETS)]
    per_layout = {}
    for layout in LAYOUTS:
        names = [k for k in allowed if KERNELS[k].layout == layout]
        if not names:
            continue
        best = tuple(min(names, key=lambda k, b=b: times_ms[b][k]) for b in BUCKETS)
        expected = sum(m * times_ms[b][k] for m, b, k in zip(BUCKET_MIX, BUCKETS, best))
        per_layout[layout] = (expected, best)
    if not per_layout:
        raise ConfigError("no matmul kernel could be timed for this weight")
    layout = min(per_layout, key=lambda name: per_layout[name][0])
    if "plain" in per_layout and per_layout[layout][0] > (1 - MIN_GAIN) * per_layout["plain"][0]:
        layout = "plain"
    return WeightChoice(layout, per_layout[layout][1], times_ms)


PLAIN_FALLBACK = {"packed": "onednn", "transposed": "linear"}  # the same library on the plain layout


def forced_choice(name: str, layouts: Iterable[str] = LAYOUTS) -> WeightChoice:
    """Every bucket on kernel ``name``; where its layout is not allowed, on the same library's
    kernel for the plain layout (``PLAIN_FALLBACK``)."""
    if KERNELS[name].layout not in layouts:
        name = PLAIN_FALLBACK[name]
    return WeightChoice(KERNELS[name].layout, (name,) * len(BUCKETS), {}, forced=True)


def check_kernel(kernel: str) -> str:
    """``kernel`` if it is ``auto`` or a kernel's name, else ``ConfigError``."""
    if kernel != AUTO and kernel not in KERNELS:
        raise ConfigError(f"kernel must be {AUTO!r} or one of {', '.join(KERNELS)}, got {kernel!r}")
    return kernel


def plan(
    shapes: dict[str, tuple[int, int]],
    device: torch.device,
    dtype: torch.dtype,
    kernel: str = AUTO,
    layouts: dict[str, Iterable[str]] | None = None,
    cache: KernelCache | None = None,
) -> dict[str, WeightChoice]:
    """A choice for every weight (name -> (out, in) shape). ``layouts``: the layouts each weight
    may take (default: any; ``plain`` is always allowed). A forced kernel (a name) is used
    without timing; ``auto`` reads the cache and times what it lacks."""
    requested = check_kernel(kernel)
    allowed_layouts = {name: {"plain", *(LAYOUTS if layouts is None else layouts[name])} for name in shapes}
    if requested != AUTO:
        if requested not in available_kernels(device, dtype):
            raise ConfigError(f"kernel {requested!r} is not available for {dtype} on {device.type}")
        return {name: forced_choice(requested, allowed_layouts[name]) for name in shapes}
    candidates = available_kernels(device, dtype)
    cache = cache if cache is not None else KernelCache()
    key = machine_key(device, dtype)
    known = cache.lookup(key)
    if not all(_complete(known.get(shape_key(s)), candidates) for s in shapes.values()):
        # all the model's shapes together, even those known: each is timed after the others
        calibration = calibrate(sorted(set(shapes.values())), device, dtype, candidates)
        known.update(calibration.times_ms)
        if calibration.reliable:  # else timed again on the next load
            cache.store(key, calibration.times_ms)
    choices = {}
    for name, shape in shapes.items():
        allowed = [k for k in candidates if KERNELS[k].layout in allowed_layouts[name]]
        choices[name] = choose(known[shape_key(shape)], allowed)
    return choices


def _is_time(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _complete(times_ms: dict | None, candidates: list[str]) -> bool:
    """Every candidate timed (or found unusable: None) at every bucket."""
    return (
        isinstance(times_ms, dict)
        and all(isinstance(times_ms.get(b), dict) for b in BUCKETS)
        and all(
            k in times_ms[b] and (times_ms[b][k] is None or _is_time(times_ms[b][k]))
            for b in BUCKETS
            for k in candidates
        )
    )


def shape_key(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


# -- timing --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """``times_ms``: shape key -> bucket -> kernel -> ms (None: the kernel is unusable there).
    ``reliable``: every time came from calls during which the machine ran this process's threads
    together; an unreliable calibration is used but not cached."""

    times_ms: dict
    reliable: bool


def calibrate(
    shapes: Iterable[tuple[int, int]],
    device: torch.device,
    dtype: torch.dtype,
    candidates: list[str],
    max_rounds: int = 15,
    min_rounds: int = 3,
    budget_s: float = 1.0,
) -> Calibration:
    """Time every candidate on every (out, in) shape at every bucket's token count.

    Random weights of each shape in each candidate's layout. Every round times every (bucket,
    shape, kernel) once, in an order where consecutive calls never read the same weight and that
    rotates from round to round, so each weight has been pushed out of the caches by the others
    about as much as in a forward, and other work on the machine hits every kernel alike. The
    time kept is the minimum over the rounds, of the calls the stall probe passed (``_StallProbe``):
    a busy machine only ever adds time. Rounds stop after ``max_rounds``; or once ``budget_s`` is
    spent, ``min_rounds`` are done and every entry has a clean call; or at 2 x ``budget_s``.
    A kernel that fails, or disagrees with exact arithmetic beyond rounding, is not timed (None).
    """
    shapes = list(shapes)
    inputs, stored = _calibration_operands(shapes, device, dtype, candidates)
    # consecutive calls never read the same weight (linear and onednn share the plain one: the
    # second would find it in cache), and a round rotates whole blocks of shapes
    order = [(bucket, s, name) for bucket in BUCKETS for name in candidates for s in shapes if (s, name) in stored]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    probe = _StallProbe(device)
    clean: dict[tuple, list[float]] = {entry: [] for entry in order}
    stalled: dict[tuple, list[float]] = {entry: [] for entry in order}
    with torch.inference_mode():
        for bucket, s, name in order:  # one untimed call each: first-call setup (oneDNN primitives)
            KERNELS[name].matmul(inputs[s, bucket], stored[s, name])
        started_all = time.perf_counter()
        deadline = started_all + 2 * budget_s
        for round_index in range(max_rounds):
            enough = round_index >= min_rounds and all(clean.values())
            if (enough and time.perf_counter() - started_all > budget_s) or time.perf_counter() > deadline:
                break
            shift = (round_index * len(shapes)) % len(order) if order else 0
            for entry in order[shift:] + order[:shift]:
                if round_index > 0 and time.perf_counter() > deadline:
                    break  # the first round completes: every entry gets a time
                bucket, s, name = entry
                ok = probe.clear()
                sync()
                started = time.perf_counter()
                KERNELS[name].matmul(inputs[s, bucket], stored[s, name])
                sync()
                (clean if ok else stalled)[entry].append(time.perf_counter() - started)
    # None records a kernel found unusable on this shape, so it is not timed again on every load
    times_ms = {shape_key(s): {b: dict.fromkeys(candidates) for b in BUCKETS} for s in shapes}
    for entry in order:
        bucket, s, name = entry
        times_ms[shape_key(s)][bucket][name] = min(clean[entry] or stalled[entry]) * 1000
    return Calibration(times_ms, reliable=all(clean.values()))


def _calibration_operands(shapes, device, dtype, candidates) -> tuple[dict, dict]:
    """Random inputs per (shape, bucket) and weights per (shape, kernel) in that kernel's layout,
    for the kernels that compute the product right."""
    generator = torch.Generator().manual_seed(0)
    weights = {s: torch.randn(s, generator=generator).to(device=device, dtype=dtype) for s in shapes}
    inputs = {
        (s, bucket): torch.randn((num_tokens, s[1]), generator=generator).to(device=device, dtype=dtype)
        for s in shapes
        for bucket, num_tokens in zip(BUCKETS, BUCKET_TOKENS)
    }
    stored = {}
    for s in shapes:
        check = _Check(inputs[s, BUCKETS[1]], weights[s])
        for name in candidates:
            try:
                weight = to_layout(weights[s], KERNELS[name].layout)
            except RuntimeError:
                continue
            if check.agrees(KERNELS[name], weight):
                stored[s, name] = weight
    return inputs, stored


class _StallProbe:
    """Whether this process's CPU threads run together right now.

    On a machine with more runnable threads than cores, a parallel op waits for a descheduled
    thread of its team for a scheduler tick (several ms, against microseconds of work); on the
    project's shared 2-core machines this came and went within seconds and, while it lasted, hit
    every call (even the minimum over rounds). The probe is a parallel add of 2^16 floats (a few
    microseconds); above ``THRESHOLD_S`` the next timed call is marked stalled. Single-threaded
    and on CUDA there is nothing to wait for."""

    THRESHOLD_S = 0.5e-3

    def __init__(self, device: torch.device) -> None:
        self.active = device.type == "cpu" and torch.get_num_threads() > 1
        self.operand = torch.ones(1 << 16)
        self.out = torch.empty_like(self.operand)

    def clear(self) -> bool:
        if not self.active:
            return True
        started = time.perf_counter()
        torch.add(self.operand, self.operand, out=self.out)
        return time.perf_counter() - started < self.THRESHOLD_S


class _Check:
    """Whether a kernel computes ``x @ weight.T`` (and with a residual added) to within the
    dtype's rounding, against the exact product (float64)."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor) -> None:
        self.x = x
        self.reference = x.double() @ weight.double().t()  # (T, out)
        scale = (x.double().abs() @ weight.double().abs().t()).max().item() + 1.0
        self.tolerance = 16 * torch.finfo(x.dtype).eps * weight.shape[1] ** 0.5 * scale

    def agrees(self, kernel: Kernel, stored: torch.Tensor) -> bool:
        try:
            with torch.inference_mode():
                out = kernel.matmul(self.x, stored)
                out_add = kernel.matmul_add(self.x, stored, torch.ones_like(out))
        except RuntimeError:
            return False
        return bool(
            out.shape == self.reference.shape
            and (out.double() - self.reference).abs().max().item() <= self.tolerance
            and (out_add.double() - 1.0 - self.reference).abs().max().item() <= self.tolerance
        )


# -- the cache -----------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what the platform module says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def machine_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a timing depends on beyond the shape: processor, torch, threads, device, dtype."""
    if device.type == "cuda":
        processor = torch.cuda.get_device_name(device)
    else:
        processor = cpu_model()
    dtype_name = str(dtype).removeprefix("torch.")
    return f"{processor} | torch {torch.__version__} | {torch.get_num_threads()} threads | {device.type} | {dtype_name}"


class KernelCache:
    """Measured kernel times on disk, one JSON file: ``{"schema": 1, "machines": {key: {shape:
    {bucket: {kernel: ms}}}}}``. A missing, unreadable or malformed file reads as empty; writes
    go through a temporary file and a rename, so a reader never sees half a file."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else cache_dir() / "kernels.json"

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("schema") != CACHE_SCHEMA:
            return {}
        machines = data.get("machines")
        return machines if isinstance(machines, dict) else {}

    def lookup(self, key: str) -> dict:
        entry = self._read().get(key)
        return dict(entry) if isinstance(entry, dict) else {}

    def store(self, key: str, times: dict) -> None:
        """Add ``times`` (shape -> bucket -> kernel -> ms) under ``key``; a cache that cannot be
        written is not an error (the next load times again)."""
        machines = self._read()
        entry = machines.get(key) if isinstance(machines.get(key), dict) else {}
        entry.update(times)
        machines[key] = entry
        text = json.dumps({"schema": CACHE_SCHEMA, "machines": machines}, indent=1, sort_keys=True) + "\n"
        with contextlib.suppress(OSError):
            atomic_write_text(self.path, text)
