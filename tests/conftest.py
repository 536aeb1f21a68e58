"""Test-wide settings.

The tests run tiny tensors: with more than one intra-op thread on a shared 2-core machine every
small op pays for thread synchronisation (softmax on a (5, 7) tensor went from ~10 us to ~1 ms),
so the suite runs single-threaded. Results do not depend on it (float64, fixed seeds).

The lean runner's matmul kernel is forced (``CSD_KERNEL``, default ``linear`` here) so that no
test times kernels or writes the user's cache. test_kernels.py runs every kernel itself; another
value here (``CSD_KERNEL=auto pytest``) reaches the levels that own their module (loaded from
folders), while modules a test hands in keep transformers' layout (``LlamaRunner``).
"""

import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ.setdefault("CSD_KERNEL", "linear")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from tiny import ...`
