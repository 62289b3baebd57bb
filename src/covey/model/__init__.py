"""Base models: resolving `model.base` and loading it (HF folders, hub ids, GGUF files)."""
