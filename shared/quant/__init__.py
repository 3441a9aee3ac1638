"""Quantizing models: GPTQ (shared/quant/gptq.py) and the tiny Llama's layers in each format
with perplexity and size (shared/quant/model.py). The formats and kernels are kernels/quant."""
