"""Runtimes behind one small interface: onnxruntime-genai (NPU path) and torch/transformers (GPU path)."""

from backends.base import (
    Backend,
    BackendCapabilities,
    BackendError,
    BackendHealth,
    ContextOverflowError,
    GenerationRequest,
    SamplingParams,
    TokenChunk,
)

__all__ = [
    "Backend",
    "BackendCapabilities",
    "BackendError",
    "BackendHealth",
    "ContextOverflowError",
    "GenerationRequest",
    "SamplingParams",
    "TokenChunk",
]
