"""Covey: federated fine-tuning of LoRA adapters for causal language models."""

__version__ = "0.1.0"
