"""csdrafting: lossless Cascade Speculative Drafting over Hugging Face causal LMs."""

from .cascade import Cascade, GenerationResult, StreamChunk
from .errors import ConfigError, CSDraftingError, GenerationInputError, ModelLoadError
from .kmatrix import KMatrix
from .sampling import SamplingParams
from .stats import GenerationStats

__version__ = "0.1.0"

__all__ = [
    "Cascade",
    "GenerationResult",
    "GenerationStats",
    "StreamChunk",
    "KMatrix",
    "SamplingParams",
    "CSDraftingError",
    "ConfigError",
    "GenerationInputError",
    "ModelLoadError",
    "__version__",
]
