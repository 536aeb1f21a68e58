"""Where the package's own data lives: the embedded pycode family, the committed prompt set and
the benchmark suite ship inside the package (package data), so a regular install finds them
from any working directory. The repository's top-level ``models/`` and ``benchmarks/*.json*``
are links to these."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
MODELS_DIR = PACKAGE_DIR / "models"  # the embedded pycode family and its default configuration
DATA_DIR = PACKAGE_DIR / "data"
DEFAULT_PROMPTS_FILE = DATA_DIR / "prompts.jsonl"
DEFAULT_SUITE_FILE = DATA_DIR / "suite.json"
