"""The one error type for model references, kept apart so the resolver and the GGUF importer share it."""

from __future__ import annotations


class ModelSourceError(ValueError):
    """A model reference that cannot be turned into a local checkpoint; the message names it and the fix."""
