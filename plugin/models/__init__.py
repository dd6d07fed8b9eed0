"""Model references: resolve "default", a folder, a .gguf file or a cached hub id into a local HF checkpoint."""
