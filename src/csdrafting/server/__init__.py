"""``csd serve``: an OpenAI-compatible HTTP server over one Cascade.

- ``protocol.py``  the OpenAI wire format: request validation, error and response bodies (no web framework)
- ``scheduler.py`` a bounded FIFO of requests per model, served one at a time by a worker thread,
                   with cancellation at the next cascade step and a per-request deadline
- ``metrics.py``   counters and the Prometheus text exposition
- ``app.py``       ``create_app(cascade, model_name, ...)``: the FastAPI application (imports fastapi)
- ``cli.py``       the ``csd serve`` subcommand (imports fastapi and uvicorn only when it runs)

Nothing here is imported by ``csdrafting`` itself, so the library works without fastapi installed.
"""
