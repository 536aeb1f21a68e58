"""Per-forward cost of the llama.cpp runner next to the torch lean runner, and its plain greedy
decoding speed next to llama-cpp-python's own ``Llama.generate``.

1. Forward cost: every runner caches the same committed prompt, then runs T new tokens at the
   position after it and returns all T logit rows (the shape of a verification forward; each
   repetition overwrites the last, as a rejected draft would), for T in --sizes. Repetitions are
   interleaved over runners and sizes so machine drift hits all alike; warm-up excluded; median.
   Runners: LlamaCppRunner on pycode-22m f32, pycode-5m and pycode-1m f32 and q8_0 (converted
   with ``csd convert`` into --gguf-dir), and LlamaRunner (torch, float32) on the same models.
2. Greedy: pycode-22m f32, --max-new-tokens tokens after a committed prompt (EOS ignored):
   a plain loop over LlamaCppRunner (one forward and one argmax per token), ``llama_cpp.Llama``'s
   ``generate(temp=0)`` on the same GGUF with the same context settings (f32 KV cache, flash
   attention off, same threads), and the torch lean runner. Decode tokens/s counts the tokens after
   the first (the first includes the prompt), median of --trials; token identity is reported, and
   for the two llama.cpp methods the time per token spent outside ``llama_decode`` (the wrapper's
   overhead: batch filling, logits copy and argmax for ours; sampler and Python for ``Llama``).
3. Numerics, pycode-22m f32, for each flash-attention / KV-cache-type setting: the largest logit
   difference between one batched forward of 64 tokens after the prompt and the same 64 positions
   run one token at a time, and between the batched forward and transformers in float64.

    .venv/bin/python scripts/llamacpp_costs.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from csdrafting.convert import convert  # noqa: E402
from csdrafting.levels.lean_llama import LlamaRunner  # noqa: E402
from csdrafting.levels.llamacpp import LlamaCppRunner  # noqa: E402
from csdrafting.paths import DEFAULT_PROMPTS_FILE, MODELS_DIR  # noqa: E402
from csdrafting.prompts import load_prompts  # noqa: E402

MODELS = MODELS_DIR
GGUF_RUNS = [
    ("pycode-22m", "f32"),
    ("pycode-5m", "f32"),
    ("pycode-5m", "q8_0"),
    ("pycode-1m", "f32"),
    ("pycode-1m", "q8_0"),
]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    return next(
        (line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "unknown"
    )


def gguf_path(gguf_dir: Path, model: str, outtype: str) -> Path:
    """The converted file, converted now if it is not there yet."""
    path = gguf_dir / f"{model}-{outtype}.gguf"
    if not path.is_file():
        gguf_dir.mkdir(parents=True, exist_ok=True)
        convert(MODELS / model, path, outtype)
    return path


def torch_lean(model_name: str) -> LlamaRunner:
    """Our torch lean runner over the float32 weights."""
    from transformers import AutoModelForCausalLM

    return LlamaRunner(AutoModelForCausalLM.from_pretrained(MODELS / model_name, dtype=torch.float32).eval())


def forward_costs(runners: dict, prompt: list[int], sizes: list[int], reps: int, warmup: int) -> dict:
    """Median milliseconds per forward of T new tokens after ``prompt``, per (runner, T)."""
    draft = prompt[: max(sizes)]  # token values do not change the cost
    for runner in runners.values():
        runner.forward(prompt, 0, 0)
    samples = {(name, size): [] for name in runners for size in sizes}
    for rep in range(warmup + reps):
        for size in sizes:
            for name, runner in runners.items():
                begin = time.perf_counter()
                runner.forward(draft[:size], len(prompt), size)
                elapsed = time.perf_counter() - begin
                if rep >= warmup:
                    samples[name, size].append(elapsed)
    return {key: 1e3 * statistics.median(values) for key, values in samples.items()}


class DecodeTimer:
    """Seconds spent inside one-token ``llama_decode`` calls, by wrapping the binding that both
    LlamaCppRunner and ``llama_cpp.Llama`` call (the package re-exports the ``llama_cpp.llama_cpp`` one)."""

    def __init__(self) -> None:
        import llama_cpp
        import llama_cpp.llama_cpp as bindings

        self.modules, self.real, self.seconds = (llama_cpp, bindings), bindings.llama_decode, 0.0

    def _timed(self, context, batch):
        begin = time.perf_counter()
        status = self.real(context, batch)
        if batch.n_tokens == 1:
            self.seconds += time.perf_counter() - begin
        return status

    def __enter__(self):
        for module in self.modules:
            module.llama_decode = self._timed
        return self

    def __exit__(self, *exc) -> None:
        for module in self.modules:
            module.llama_decode = self.real


def greedy_loop(runner, prompt: list[int], num_tokens: int) -> tuple[list[int], float]:
    """Plain greedy decoding through a runner: tokens and seconds from first to last token."""
    token = int(runner.forward(prompt, 0, 1)[0].argmax())
    tokens, first = [token], time.perf_counter()
    for position in range(len(prompt), len(prompt) + num_tokens - 1):
        token = int(runner.forward([token], position, 1)[0].argmax())
        tokens.append(token)
    return tokens, time.perf_counter() - first


def greedy_llama_cpp_python(path: Path, prompt: list[int], num_tokens: int, threads: int) -> tuple[list[int], float]:
    """``llama_cpp.Llama.generate`` with greedy sampling, settings matching LlamaCppRunner's defaults."""
    import llama_cpp

    llm = llama_cpp.Llama(
        str(path),
        n_ctx=len(prompt) + num_tokens,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=False,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
    )
    tokens, first = [], None
    for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
        tokens.append(token)
        first = first or time.perf_counter()
        if len(tokens) == num_tokens:
            break
    elapsed = time.perf_counter() - first
    llm.close()
    return tokens, elapsed


def greedy_comparison(gguf_dir: Path, prompt: list[int], num_tokens: int, trials: int, threads: int) -> dict:
    path = gguf_path(gguf_dir, "pycode-22m", "f32")
    ours = LlamaCppRunner(path, n_threads=threads)
    lean = torch_lean("pycode-22m")
    methods = {
        "LlamaCppRunner loop": lambda: greedy_loop(ours, prompt, num_tokens),
        "llama_cpp.Llama.generate": lambda: greedy_llama_cpp_python(path, prompt, num_tokens, threads),
        "torch lean runner loop": lambda: greedy_loop(lean, prompt, num_tokens),
    }
    seconds = {name: [] for name in methods}
    outside = {name: [] for name in methods}
    outputs = {}
    for trial in range(trials + 1):  # trial 0 is a warm-up
        for name, method in methods.items():
            with DecodeTimer() as timer:
                tokens, elapsed = method()
            outputs.setdefault(name, tokens)
            if trial:
                seconds[name].append(elapsed)
                outside[name].append((elapsed - timer.seconds) / (num_tokens - 1))
    reference = outputs["llama_cpp.Llama.generate"]
    return {
        name: {
            "decode_tok_s": (num_tokens - 1) / statistics.median(values),
            "us_per_token_outside_llama_decode": 1e6 * statistics.median(outside[name]) if "lean" not in name else None,
            "identical_to_llama_generate": outputs[name] == reference,
        }
        for name, values in seconds.items()
    }


def numerics(gguf_dir: Path, prompt: list[int], threads: int, num_positions: int = 64) -> dict:
    """Max |logit difference| batched vs one-token and batched vs transformers float64, per setting."""
    from transformers import AutoModelForCausalLM

    path = gguf_path(gguf_dir, "pycode-22m", "f32")
    ids = prompt[: len(prompt) - num_positions]
    tail = prompt[len(ids) :]
    model = AutoModelForCausalLM.from_pretrained(MODELS / "pycode-22m", dtype=torch.float64).eval()
    with torch.no_grad():
        exact = model(torch.tensor([prompt])).logits[0, len(ids) :]  # (N, V)
    gaps = {}
    for flash_attn in (False, True):
        for kv_type in ("f32", "f16"):
            runner = LlamaCppRunner(path, n_threads=threads, kv_type=kv_type, flash_attn=flash_attn)
            runner.forward(ids, 0, 0)
            batched = runner.forward(tail, len(ids), len(tail))  # (N, V)
            single = torch.cat([runner.forward([t], len(ids) + i, 1) for i, t in enumerate(tail)])
            gaps[f"flash_attn={flash_attn} kv={kv_type}"] = {
                "batched_vs_single": (batched - single).abs().max().item(),
                "batched_vs_transformers_f64": (batched.double() - exact).abs().max().item(),
            }
            runner.close()
    return gaps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default="1,2,4,8,16")
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--prompt-index", type=int, default=0, help="which committed prompt (benchmarks/prompts.jsonl)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--gguf-dir", default="/tmp/csd-gguf", help="where converted GGUF files are kept")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    gguf_dir = Path(args.gguf_dir)

    from transformers import AutoTokenizer

    text = load_prompts(DEFAULT_PROMPTS_FILE)[args.prompt_index]["text"]
    prompt = AutoTokenizer.from_pretrained(MODELS / "pycode-22m")(text)["input_ids"]

    runners = {}
    for model, outtype in GGUF_RUNS:
        runners[f"{model} llama.cpp {outtype}"] = LlamaCppRunner(
            gguf_path(gguf_dir, model, outtype), n_threads=args.threads
        )
        if outtype == "f32":
            runners[f"{model} torch lean f32"] = torch_lean(model)
    costs = forward_costs(runners, prompt, sizes, args.reps, args.warmup)
    greedy = greedy_comparison(gguf_dir, prompt, args.max_new_tokens, args.trials, args.threads)
    gaps = numerics(gguf_dir, prompt, args.threads)

    import llama_cpp

    print(
        f"CPU: {cpu_model()}, {args.threads} threads; torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}"
    )
    print(f"prompt: {len(prompt)} tokens; median of {args.reps} forwards (ms) returning T logit rows\n")
    print("| runner | " + " | ".join(f"T={s}" for s in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for name in runners:
        print(f"| {name} | " + " | ".join(f"{costs[name, s]:.2f}" for s in sizes) + " |")
    print(f"\ngreedy, pycode-22m f32, {args.max_new_tokens} tokens, median of {args.trials} trials\n")
    print("| method | decode tok/s | us/token outside llama_decode | tokens identical to Llama.generate |")
    print("|---|---:|---:|---|")
    for name, row in greedy.items():
        outside = row["us_per_token_outside_llama_decode"]
        outside = "" if outside is None else f"{outside:.0f}"
        print(f"| {name} | {row['decode_tok_s']:.1f} | {outside} | {row['identical_to_llama_generate']} |")
    print("\nnumerics, pycode-22m f32: max |logit difference| over 64 positions\n")
    print("| setting | batched vs one token at a time | batched vs transformers float64 |")
    print("|---|---:|---:|")
    for name, row in gaps.items():
        print(f"| {name} | {row['batched_vs_single']:.2e} | {row['batched_vs_transformers_f64']:.2e} |")
    if args.json:
        payload = {
            "cpu": cpu_model(),
            "threads": args.threads,
            "prompt_tokens": len(prompt),
            "forward_ms": {f"{name} T={size}": ms for (name, size), ms in costs.items()},
            "greedy": greedy,
            "numerics": gaps,
        }
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
