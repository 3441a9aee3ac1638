"""Decoding: the KV cache, autoregressive and speculative generation."""
