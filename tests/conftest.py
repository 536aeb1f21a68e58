"""Test-wide settings.

The tests run tiny tensors: with more than one intra-op thread on a shared 2-core machine every
small op pays for thread synchronisation (softmax on a (5, 7) tensor went from ~10 us to ~1 ms),
so the suite runs single-threaded. Results do not depend on it (float64, fixed seeds).

The lean runner's matmul kernel is forced (``CSDRAFTING_KERNEL``, default ``linear`` here) so that
no test times kernels or writes the user's cache: the CLI takes it as the default of
``CascadeConfig.kernel``, and the tests pass it on (``tiny.KERNEL``) where they build levels
themselves. test_kernels.py runs every kernel itself; another value here
(``CSDRAFTING_KERNEL=auto pytest``) reaches the levels that own their module (loaded from folders),
while modules a test hands in keep transformers' layout (``LlamaRunner``).

``k_matrix="auto"`` measures the machine and plans (``autoplan.py``): timings would make tests
over tiny models nondeterministic, so the suite runs with planning off (``"auto"`` is then the
fixed start of ``CascadeConfig.resolve``, adapted online) and the tests of the planner turn it
on themselves. Nothing is written to the user's cache: it points at a fresh folder.

Fixtures shared by several modules live in ``server_fixtures.py`` (the ``csd serve`` tests) and
``gguf_fixtures.py`` (GGUF files of the committed models), registered here.
"""

import os
import sys
import tempfile
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ.setdefault("CSDRAFTING_KERNEL", "linear")
os.environ["CSDRAFTING_AUTO_PLAN"] = "off"
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="csdrafting-test-cache-")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from tiny import ...`

pytest_plugins = ["server_fixtures", "gguf_fixtures"]
