"""Load test for ``csd serve``: N concurrent clients x M requests each, with the ``openai`` client.

Reports errors, latency percentiles, tokens/s and (``--check``, on by default for greedy runs)
whether every response equals the library's own ``Cascade.generate`` output for its prompt.
Not a timed test: numbers move with the machine's load.

    python scripts/load_test.py                      # starts `csd serve` on a free local port
    python scripts/load_test.py --clients 8 --requests 10 --max-tokens 32
    python scripts/load_test.py --base-url http://127.0.0.1:8000/v1 --serve-args "--k-matrix 2,1,4;1,3;3"

Without ``--base-url`` the script starts ``csd serve --port 0`` with ``--serve-args`` (cascade flags
and server flags), waits for ``/health`` and stops it at the end. ``--check`` loads the cascade the
same flags describe, after the load run, so it does not compete with the server for the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

PROMPTS = [
    "def parse_args(",
    "class Config:\n    def __init__(self",
    "import os\n\n\ndef read_lines(path):",
    "def fibonacci(n):\n",
    "for i, row in enumerate(",
    "    @property\n    def name(self):",
    "import numpy as np\n\n\ndef normalize(x",
    "if __name__ == '__main__':\n",
    "def test_",
    "    except Exception as exc:\n",
]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def start_server(serve_args: list[str], timeout: float) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-c", "from csdrafting.cli import entry; entry()", "serve", "--port", "0"]
    command += ["--log-level", "warning", *serve_args]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    found: list[str] = []
    ready = threading.Event()

    def read_stderr() -> None:  # find the URL line, then keep draining so the pipe never fills
        for line in process.stderr:
            if not ready.is_set():
                match = re.search(r"at (http://\S+/v1)", line)
                if match:
                    found.append(match.group(1))
                    ready.set()
                    continue
            sys.stderr.write(line)
        ready.set()

    threading.Thread(target=read_stderr, daemon=True).start()
    if not ready.wait(timeout) or not found:
        process.kill()
        raise SystemExit("csd serve did not start")
    base_url = found[0]
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=5) as http:
        while True:
            try:
                if http.get(base_url.removesuffix("/v1") + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise SystemExit("csd serve did not become healthy")
            time.sleep(0.2)
    return process, base_url


def run_client(base_url: str, model: str, index: int, args) -> list[dict]:
    client = openai.OpenAI(
        base_url=base_url,
        api_key="not-needed",
        max_retries=0,
        timeout=args.timeout,
        http_client=openai.DefaultHttpxClient(trust_env=False),
    )
    records = []
    with client:
        for j in range(args.requests):
            prompt = PROMPTS[(index * args.requests + j) % len(PROMPTS)]
            started = time.perf_counter()
            record = {"client": index, "request": j, "prompt": prompt}
            try:
                if args.stream:
                    chunks = list(
                        client.completions.create(
                            model=model,
                            prompt=prompt,
                            max_tokens=args.max_tokens,
                            temperature=args.temperature,
                            stream=True,
                        )
                    )
                    record["text"] = "".join(c.choices[0].text for c in chunks if c.choices)
                    last = chunks[-1]
                else:
                    last = client.completions.create(
                        model=model, prompt=prompt, max_tokens=args.max_tokens, temperature=args.temperature
                    )
                    record["text"] = last.choices[0].text
                record["completion_tokens"] = last.usage.completion_tokens
                stats = (last.model_extra or {}).get("speculative_stats") or {}
                record["tokens_per_second"] = stats.get("tokens_per_second")
                record["tokens_per_target_step"] = stats.get("tokens_per_target_step")
            except openai.OpenAIError as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"
            record["latency"] = time.perf_counter() - started
            records.append(record)
    return records


def library_outputs(prompts: set[str], serve_args: list[str], max_tokens: int) -> dict[str, str]:
    from csdrafting.cli import build_parser, cascade_from_args

    cascade = cascade_from_args(build_parser().parse_args(["serve", *serve_args]))
    return {p: cascade.generate(p, max_new_tokens=max_tokens, temperature=0.0).text for p in sorted(prompts)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="a running server, e.g. http://127.0.0.1:8000/v1 (default: start one)")
    parser.add_argument("--serve-args", default="", help="flags for csd serve (and for --check's cascade)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--requests", type=int, default=10, help="requests per client (default: 10)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request (default: 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--stream", action="store_true", help="stream the responses")
    parser.add_argument("--timeout", type=float, default=300.0, help="client timeout per request, seconds")
    parser.add_argument("--no-check", action="store_true", help="skip comparing with the library's output")
    parser.add_argument("--json", action="store_true", help="also print the summary as one JSON line")
    args = parser.parse_args(argv)
    serve_args = shlex.split(args.serve_args)
    check = not args.no_check and args.temperature == 0

    process = None
    base_url = args.base_url
    if base_url is None:
        process, base_url = start_server(serve_args, timeout=300)
    try:
        with openai.OpenAI(
            base_url=base_url, api_key="not-needed", http_client=openai.DefaultHttpxClient(trust_env=False)
        ) as client:
            model = client.models.list().data[0].id
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            batches = list(pool.map(lambda i: run_client(base_url, model, i, args), range(args.clients)))
        wall = time.perf_counter() - started
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()

    records = [r for batch in batches for r in batch]
    ok = [r for r in records if "error" not in r]
    errors = [r for r in records if "error" in r]
    latencies = [r["latency"] for r in ok]
    tokens = sum(r["completion_tokens"] for r in ok)
    summary = {
        "model": model,
        "clients": args.clients,
        "requests_per_client": args.requests,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": args.stream,
        "requests": len(records),
        "ok": len(ok),
        "errors": len(errors),
        "wall_seconds": wall,
        "completion_tokens": tokens,
        "tokens_per_second": tokens / wall if wall > 0 else 0.0,
        "requests_per_second": len(ok) / wall if wall > 0 else 0.0,
    }
    if latencies:
        summary.update({f"latency_p{q}": percentile(latencies, q) for q in (50, 90, 99)})
        summary["latency_max"] = max(latencies)
    server_rates = [r["tokens_per_second"] for r in ok if r.get("tokens_per_second")]
    if server_rates:
        summary["server_decode_tokens_per_second_mean"] = sum(server_rates) / len(server_rates)
    steps = [r["tokens_per_target_step"] for r in ok if r.get("tokens_per_target_step")]
    if steps:
        summary["tokens_per_target_step_mean"] = sum(steps) / len(steps)
    if check and ok:
        expected = library_outputs({r["prompt"] for r in ok}, serve_args, args.max_tokens)
        summary["identical_to_library"] = sum(r["text"] == expected[r["prompt"]] for r in ok)

    print(f"{summary['requests']} requests ({args.clients} clients x {args.requests}), max_tokens {args.max_tokens}, "
          f"temperature {args.temperature:g}{', streamed' if args.stream else ''}, model {model}")  # fmt: skip
    print(f"ok {summary['ok']}, errors {summary['errors']}, wall {wall:.2f} s")
    if latencies:
        print("latency s: " + ", ".join(f"p{q} {summary[f'latency_p{q}']:.3f}" for q in (50, 90, 99))
              + f", max {summary['latency_max']:.3f}")  # fmt: skip
    print(
        f"throughput: {summary['tokens_per_second']:.1f} completion tokens/s, {summary['requests_per_second']:.2f} requests/s"
    )
    if "server_decode_tokens_per_second_mean" in summary:
        print(f"per request (server side): {summary['server_decode_tokens_per_second_mean']:.1f} decode tokens/s, "
              f"{summary.get('tokens_per_target_step_mean', 0):.2f} tokens per target step")  # fmt: skip
    if "identical_to_library" in summary:
        print(f"identical to the library's greedy output: {summary['identical_to_library']} of {len(ok)}")
    for r in errors[:10]:
        print(f"error (client {r['client']}, request {r['request']}): {r['error']}")
    if args.json:
        print(json.dumps(summary))
    failed = errors or ("identical_to_library" in summary and summary["identical_to_library"] != len(ok))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
