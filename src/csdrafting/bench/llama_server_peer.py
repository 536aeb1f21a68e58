"""llama.cpp's own ``llama-server`` as a peer in ``csd bench``: the speculative decoding a llama.cpp user runs.

One server per method (plain, ``--spec-type ngram-mod``, ``ngram-simple``, ``-md DRAFTER --spec-type
draft-simple``, ...), on the same target GGUF, on 127.0.0.1 at a free port, with the bench's threads, one slot and
the target's context; the rest is llama-server's defaults, what its users get. A server starts on the method's
first generation (the warm-up), outside any timer, and lives until the run ends (the bench interleaves methods
prompt by prompt, so a method's prompts end with the run): ``close`` stops it, waiting a bounded time, then kills.

Each generation is one ``POST /completion`` timed end to end (prefill and HTTP included): the prompt as token ids
(the same ids every method gets), ``n_predict``, ``ignore_eos`` as the request says, the prompt cache off (no
reuse of the previous request's prefix), greedy as temperature 0. Tokens come back from the response
(``return_tokens``); ``timings`` gives the prefill time and the drafted / accepted counts. Memory: the server's
own peak RSS (``/proc/PID/status`` VmHWM, reset before each request where Linux allows it).

The binary: ``scripts/build_llama_server.sh`` builds it from the llama.cpp source vendored in the pinned
llama-cpp-python, into ``~/.cache/csdrafting/llama-server/VERSION/`` (``CSDRAFTING_LLAMA_SERVER`` names another).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from ..errors import ConfigError
from ..files import cache_dir
from .records import Outcome

START_TIMEOUT_SECONDS = 300.0  # loading a 1.5B GGUF from a cold disk; the server answers /health when ready
REQUEST_TIMEOUT_SECONDS = 600.0
STOP_TIMEOUT_SECONDS = 10.0
LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the pinned llama-cpp-python whose vendored llama.cpp the script builds


def default_server_path() -> Path:
    """Where ``scripts/build_llama_server.sh`` puts the binary (or ``$CSDRAFTING_LLAMA_SERVER``)."""
    explicit = os.environ.get("CSDRAFTING_LLAMA_SERVER")
    if explicit:
        return Path(explicit)
    return cache_dir() / "llama-server" / LLAMA_CPP_PYTHON_VERSION / "llama-server"


def server_available(path: Path | None = None) -> bool:
    path = path or default_server_path()
    return path.is_file() and os.access(path, os.X_OK)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_peak_rss(pid: int) -> tuple[int | None, int | None]:
    """(peak RSS, current RSS) in bytes of process ``pid``: VmHWM and VmRSS; None where unreadable."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None, None

    def field(name: str) -> int | None:
        match = re.search(rf"^{name}:\s+(\d+) kB", status, re.MULTILINE)
        return int(match.group(1)) * 1024 if match else None

    return field("VmHWM"), field("VmRSS")


def reset_peak_rss(pid: int) -> bool:
    """Reset the peak RSS of ``pid`` to its current RSS (Linux, the same user); False where it cannot."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class LlamaServer:
    """One running ``llama-server`` process: started, polled until healthy, asked, stopped."""

    def __init__(self, binary: Path, arguments: list[str], log_path: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [str(binary), *arguments, "--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path = log_path
        with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the server
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_healthy()
        except BaseException:
            self.close()
            raise

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigError(f"llama-server exited with code {self.process.returncode}: {self._log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            time.sleep(0.1)
        raise ConfigError(f"llama-server did not become healthy in {START_TIMEOUT_SECONDS:.0f} s: {self._log_tail()}")

    def _log_tail(self, num_chars: int = 800) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-num_chars:].strip()
        return "(no log)"

    def complete(self, body: dict) -> dict:
        request = urllib.request.Request(
            self.url + "/completion", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_SECONDS) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise ConfigError(f"llama-server answered {exc.code}: {exc.read()[:500]!r}") from None

    def close(self) -> None:
        """Stop the server: SIGTERM, a bounded wait, then SIGKILL."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)


class LlamaServerPeer:
    """A peer: ``llama-server`` on the target GGUF with one ``--spec-type`` (or none), timed through HTTP."""

    def __init__(self, method, models, binary: Path | None = None) -> None:
        self.binary = binary or default_server_path()
        if not server_available(self.binary):
            raise ConfigError(f"llama-server not found at {self.binary}: build it with scripts/build_llama_server.sh")
        self.method = method
        self.models = models
        self.spec_type = method.spec.get("spec_type")
        self.draft_model = method.spec.get("draft_model")
        self.level_names = [models.target_name] + ([self.draft_model] if self.draft_model else [])
        self.threads = torch.get_num_threads()
        self.server: LlamaServer | None = None
        self._log_dir = tempfile.TemporaryDirectory(prefix="csd-llama-server-")
        self.config = {
            "engine": "llama-server",
            "target": models.target_name,
            "gguf": str(models.gguf(models.target_name)),
            "spec_type": self.spec_type,
            "draft_model": self.draft_model,
            "n_threads": self.threads,
            "server": str(self.binary),
            "arguments": self.arguments(),
        }

    def arguments(self) -> list[str]:
        models = self.models
        threads = str(self.threads)
        arguments = ["-m", str(models.gguf(models.target_name)), "-t", threads, "-tb", threads]
        arguments += ["-c", str(models.max_context), "-np", "1", "--no-webui"]
        if self.draft_model:
            arguments += ["-md", str(models.gguf(self.draft_model)), "-td", threads, "-tbd", threads]
        if self.spec_type:
            arguments += ["--spec-type", self.spec_type]
        return arguments

    def _server(self) -> LlamaServer:
        if self.server is None or self.server.process.poll() is not None:
            log_path = Path(self._log_dir.name) / f"{self.method.name}.log"
            self.server = LlamaServer(self.binary, self.arguments(), log_path)
        return self.server

    def generate(self, request) -> Outcome:
        server = self._server()  # started on first use (the warm-up), outside the timer that matters
        body = {
            "prompt": list(request.prompt_ids),
            "n_predict": request.max_new_tokens,
            "ignore_eos": request.fixed_length,
            "cache_prompt": False,  # every method prefills its whole prompt
            "return_tokens": True,
            "stream": False,
        }
        if request.greedy:
            body["temperature"] = 0.0
        else:
            body.update(temperature=request.temperature, top_k=request.top_k or 0, top_p=request.top_p or 1.0)
            body.update(min_p=0.0, seed=request.seed)
        pid = server.process.pid
        can_reset = reset_peak_rss(pid)
        started = time.perf_counter()
        response = server.complete(body)
        wall = time.perf_counter() - started
        peak, current = proc_peak_rss(pid)
        return self._outcome(request, response, wall, peak, current, can_reset)

    def _outcome(self, request, response: dict, wall: float, peak, current, can_reset: bool) -> Outcome:
        timings = response.get("timings") or {}
        tokens = [int(t) for t in response.get("tokens") or []]
        num_predicted = int(response.get("tokens_predicted", timings.get("predicted_n", len(tokens))))
        if len(tokens) != num_predicted:  # older servers return no ids: keep the count honest anyway
            tokens = tokens[:num_predicted]
        finish = "eos" if response.get("stop_type") == "eos" else "length"
        prefill = timings["prompt_ms"] / 1000 if "prompt_ms" in timings else None
        levels = [
            {"name": name, "kind": "target" if i == 0 else "drafter", "num_forwards": None, "num_params": None}
            for i, name in enumerate(self.level_names)
        ]
        levels[0]["num_params"] = self.models.num_params.get(self.models.target_name)
        outcome = Outcome.of_peer(tokens, finish, prefill, wall, levels, self.config)
        drafted, accepted = timings.get("draft_n"), timings.get("draft_n_accepted")
        if drafted:
            outcome.acceptance_rate = accepted / drafted
        outcome.engine_stats = {"server_timings": timings, "stop_type": response.get("stop_type")}
        outcome.memory = {
            "kind": "rss",
            "scope": "row" if can_reset else "process",
            "process": "llama-server",
            "peak_bytes": peak,
            "current_bytes": current,
        }
        return outcome

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        self._log_dir.cleanup()
