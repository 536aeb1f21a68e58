"""``csd serve``: registered by ``csdrafting.cli`` (which imports this module on every run, so
fastapi and uvicorn are imported only inside ``cmd_serve``)."""

from __future__ import annotations

import argparse
import socket
import sys

from ..cli import add_cascade_arguments, cascade_from_args
from ..errors import ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def add_parser(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve the cascade over an OpenAI-compatible HTTP API",
        description="Serve the cascade over an OpenAI-compatible HTTP API: POST /v1/completions and "
        "/v1/chat/completions (streaming with stream: true), GET /v1/models, /health and /metrics.",
    )
    add_cascade_arguments(serve)
    group = serve.add_argument_group("server")
    group.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST}, this machine only)"
    )
    group.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT}; 0 picks a free one)"
    )
    group.add_argument("--model-name", help="the model id clients send (default: the target folder's name)")
    group.add_argument(
        "--max-queue",
        type=int,
        default=16,
        help="requests that may wait while one generates; more get 503 (default: 16)",
    )
    group.add_argument(
        "--timeout", type=float, default=300.0, help="seconds a request may take, queue wait included (default: 300)"
    )
    group.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds a client may take to send its request body (then 408), and its request line and "
        "headers (then the connection is closed) (default: 30)",
    )
    group.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another Host name to answer besides localhost, 127.0.0.1 and [::1] (repeatable; '*': any); "
        "the default refuses other names on a loopback address, against DNS rebinding",
    )
    group.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="(default: info)"
    )
    serve.set_defaults(func=cmd_serve)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: a free one); uvicorn listens on it."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve --host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    if args.max_queue < 0:
        raise ConfigError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not args.timeout > 0:
        raise ConfigError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if not args.body_timeout > 0:
        raise ConfigError(f"--body-timeout must be > 0 seconds, got {args.body_timeout}")
    if args.model_name is not None and not args.model_name.strip():
        raise ConfigError("--model-name must not be empty")
    try:
        import uvicorn

        from .app import create_app
        from .guard import allowed_hosts, is_loopback
        from .transport import uvicorn_config
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"csd serve needs fastapi, uvicorn and prometheus_client ({exc.name} is not installed): "
            "pip install 'csdrafting[serve]'"
        ) from None

    sock = bind_socket(args.host, args.port)  # before loading models: a taken port fails fast
    try:
        cascade = cascade_from_args(args)
        model_name = args.model_name or cascade.describe()["target"]
        app = create_app(
            cascade,
            model_name,
            max_queue=args.max_queue,
            request_timeout=args.timeout,
            body_timeout=args.body_timeout,
            allowed_hosts=allowed_hosts(args.host, args.allowed_host),
        )
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"csd serve: model {model_name!r} at http://{shown}:{port}/v1", file=sys.stderr, flush=True)
        if not is_loopback(args.host):
            print(
                f"warning: listening on {args.host}, reachable from other machines; csd serve has no authentication",
                file=sys.stderr,
                flush=True,
            )

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                super().handle_exit(sig, frame)
                for queue in app.state.queues.values():  # end running streams now, not after the grace period
                    queue.close(wait=0)

        config = uvicorn_config(app, log_level=args.log_level, head_timeout=args.body_timeout)
        Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0
