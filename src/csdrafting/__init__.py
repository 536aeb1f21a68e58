"""csdrafting: lossless Cascade Speculative Drafting over Hugging Face causal LMs."""

from . import planning
from .cascade import Cascade, EngineParams
from .config import CascadeConfig
from .errors import ConfigError, CSDraftingError, GenerationInputError, ModelLoadError
from .kmatrix import KMatrix
from .loading import Levels
from .output import GenerationResult, StreamChunk
from .sampling import SamplingParams
from .stats import GenerationStats, LevelStats

__version__ = "0.1.0"


def _auto_planner(levels, config):
    """``"auto"`` configurations are planned by ``autoplan.py``, which runs the tuner: imported
    only when a configuration needs it, so that the engine loads without it."""
    from .autoplan import planner_for

    return planner_for(levels, config)


planning.set_default_planner(_auto_planner)

__all__ = [
    "Cascade",
    "CascadeConfig",
    "EngineParams",
    "Levels",
    "GenerationResult",
    "GenerationStats",
    "LevelStats",
    "StreamChunk",
    "KMatrix",
    "SamplingParams",
    "CSDraftingError",
    "ConfigError",
    "GenerationInputError",
    "ModelLoadError",
    "__version__",
]
