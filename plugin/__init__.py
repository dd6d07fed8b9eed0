"""accelserve: accelerator-aware serving for Hugging Face LLMs."""

__version__ = "0.1.0"
