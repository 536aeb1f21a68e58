"""``csd serve``: an OpenAI-compatible HTTP server over one Cascade.

- ``schema.py``    the request bodies as pydantic models (FastAPI validates them; ``/docs`` shows them)
- ``protocol.py``  the OpenAI wire format: error bodies, the checks that need the model, response bodies
- ``guard.py``     what a request must pass first: Host, content type, body size, body time, strict JSON
- ``scheduler.py`` a bounded FIFO of requests per model, served one at a time by a worker thread,
                   with cancellation at the next cascade step and a per-request deadline
- ``metrics.py``   counters, exposed through ``prometheus_client``
- ``app.py``       ``create_app(cascade, model_name, ...)``: the FastAPI application
- ``transport.py`` ``uvicorn_config(app, ...)``: uvicorn with OpenAI-shaped answers to unparseable HTTP
- ``cli.py``       the ``csd serve`` subcommand (imports fastapi and uvicorn only when it runs)

Nothing here is imported by ``csdrafting`` itself, so the library works without fastapi installed.
"""
