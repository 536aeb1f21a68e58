"""csdrafting: lossless Cascade Speculative Drafting over Hugging Face causal LMs."""

from .cascade import Cascade
from .config import CascadeConfig
from .errors import ConfigError, CSDraftingError, GenerationInputError, ModelLoadError
from .kmatrix import KMatrix
from .loading import Levels
from .output import GenerationResult, StreamChunk
from .sampling import SamplingParams
from .stats import GenerationStats, LevelStats

__version__ = "0.1.0"

__all__ = [
    "Cascade",
    "CascadeConfig",
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
