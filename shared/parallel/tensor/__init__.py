"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019): f/g in comm, the parallel layers in
layers, the TP Llama in model, the multi-rank runs in run, the JAX shard_map block in jax_tp."""

from shared.parallel.tensor.comm import TPComm, copy_to_tp, reduce_from_tp
from shared.parallel.tensor.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from shared.parallel.tensor.model import TPBlock, TPLlama

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "TPBlock", "TPComm", "TPLlama",
           "VocabParallelEmbedding", "copy_to_tp", "reduce_from_tp",
           "vocab_parallel_cross_entropy"]
