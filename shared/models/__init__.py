"""Tiny Llama-style models shared by the labs: the architecture (llama), the bridge to
transformers (hf), and the trained target/draft checkpoints (zoo)."""

from shared.models.llama import Block, Llama, LlamaConfig, RMSNorm, SwiGLU

__all__ = ["Block", "Llama", "LlamaConfig", "RMSNorm", "SwiGLU"]
