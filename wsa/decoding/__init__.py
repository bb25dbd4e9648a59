"""Decoding points of weight space into models and images: per-sample adapters on a base model."""

from wsa.decoding.batched_lora import BatchedLoRA, DenseStack, LowRankStack

__all__ = ["BatchedLoRA", "DenseStack", "LowRankStack"]
