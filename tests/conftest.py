"""Test-wide settings.

The tests run tiny tensors: with more than one intra-op thread on a shared 2-core machine every
small op pays for thread synchronisation (softmax on a (5, 7) tensor went from ~10 us to ~1 ms),
so the suite runs single-threaded. Results do not depend on it (float64, fixed seeds).
"""

import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from tiny import ...`
