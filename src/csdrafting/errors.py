"""Typed errors. Every user mistake the library can detect raises one of these, with a message
that says what was wrong and what is allowed; the CLI prints the message and exits non-zero."""


class CSDraftingError(Exception):
    """Base class of every error raised on purpose by csdrafting."""


class ConfigError(CSDraftingError, ValueError):
    """A cascade configuration is invalid (K-matrix, lenience, level list, device, dtype)."""


class ModelLoadError(CSDraftingError):
    """A model or tokenizer could not be loaded, or the levels do not share a tokenizer."""


class GenerationInputError(CSDraftingError, ValueError):
    """A generation request is invalid (empty or too long prompt, bad sampling parameters)."""
