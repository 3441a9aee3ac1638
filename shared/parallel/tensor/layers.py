"""Megatron's parallel layers (§3): column- and row-parallel linear, vocab-parallel embedding
and cross-entropy. Each is cut from a single-process module (`shard`), so a TP model starts
from trained weights; each parameter remembers which rows or columns of which full parameter
it holds (`Shard`), so its gradient can be checked against the single-process one.

Shapes: x [..., in]; a linear weight is [out, in] (torch's layout), so a column-parallel layer
holds rows of it (out/p outputs) and a row-parallel layer holds columns (in/p inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shared.parallel.tensor.comm import TPComm, copy_to_tp, reduce_from_tp


@dataclass(frozen=True)
class Shard:
    """A local parameter = full parameter `name`.index_select(dim, index); dim None = a copy."""
    name: str
    dim: int | None = None
    index: torch.Tensor | None = None

    def of(self, full: torch.Tensor) -> torch.Tensor:
        return full if self.dim is None else full.index_select(self.dim, self.index)


def block_index(size: int, comm: TPComm, what: str) -> torch.Tensor:
    """This rank's contiguous 1/p of range(size)."""
    if size % comm.world:
        raise ValueError(f"{what}={size} must be divisible by the tensor-parallel size "
                         f"{comm.world}")
    n = size // comm.world
    return torch.arange(comm.rank * n, (comm.rank + 1) * n)


def _cut_linear(linear: nn.Linear, comm: TPComm, name: str, index: torch.Tensor | None,
                dim: int) -> nn.Parameter:
    """This rank's slice of a bias-free nn.Linear's weight: output rows (dim 0, column-parallel)
    or input columns (dim 1, row-parallel), `index` or this rank's block of them."""
    if not isinstance(linear, nn.Linear) or linear.bias is not None:
        raise TypeError("linear must be an nn.Linear without bias")
    if index is None:
        size, what = ((linear.out_features, "out_features") if dim == 0
                      else (linear.in_features, "in_features"))
        index = block_index(size, comm, f"{name}.{what}")
    return _param(linear.weight, Shard(f"{name}.weight", dim, index))


def _param(full: torch.Tensor, shard: Shard) -> nn.Parameter:
    p = nn.Parameter(shard.of(full.detach()).clone())  # own storage: per-rank bytes are real
    p.shard = shard
    return p


class ColumnParallelLinear(nn.Module):
    """Y_i = f(X) A_i^T: rows `index` of the weight; output [..., len(index)], not gathered
    (the next layer is row-parallel, or the vocab-parallel loss reads the shard)."""

    def __init__(self, linear: nn.Linear, comm: TPComm, name: str,
                 index: torch.Tensor | None = None):
        super().__init__()
        self.comm = comm
        self.weight = _cut_linear(linear, comm, name, index, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local(copy_to_tp(x, self.comm))

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """The product alone, for an input that already passed f: column layers sharing an
        input share one f, so one backward all-reduce (Megatron fuses QKV for the same)."""
        return F.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """Y = g(sum_i X_i A_i^T): columns `index` of the weight; x is this rank's input slice
    [..., len(index)] (a column-parallel layer's output); the output is full and replicated."""

    def __init__(self, linear: nn.Linear, comm: TPComm, name: str,
                 index: torch.Tensor | None = None):
        super().__init__()
        self.comm = comm
        self.weight = _cut_linear(linear, comm, name, index, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"x must end in this rank's {self.weight.shape[1]} inputs, got "
                             f"{tuple(x.shape)}")
        return reduce_from_tp(F.linear(x, self.weight), self.comm)


class VocabParallelEmbedding(nn.Module):
    """Rows [v0, v1) of the table on each rank. A token outside the range reads row 0 and is
    zeroed; the all-reduce (g) sums the one rank that owns it with zeros: exact."""

    def __init__(self, embed: nn.Embedding, comm: TPComm, name: str):
        super().__init__()
        index = block_index(embed.num_embeddings, comm, f"{name}.num_embeddings")
        self.comm, self.start, self.vocab = comm, int(index[0]), embed.num_embeddings
        self.weight = _param(embed.weight, Shard(f"{name}.weight", 0, index))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dtype != torch.long:
            raise TypeError(f"tokens must be int64, got {tokens.dtype}")
        local = tokens - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_tp(out.masked_fill(outside[..., None], 0.0), self.comm)


class _VocabParallelCE(torch.autograd.Function):
    """Cross-entropy over logits split by vocabulary, never gathering them (Megatron §3: the
    logits' all-gather would move b·s·v numbers; this moves 3·b·s). Three all-reduces of one
    number per token: the max (stability), the target's logit (only its owner has it), the
    sum of exponentials. Backward is local: softmax minus one-hot, on this rank's slice."""

    @staticmethod
    def forward(ctx, logits, targets, start, comm):
        ctx.dtype = logits.dtype  # computed in fp32; the gradient goes back in the logits' dtype
        logits = logits.float()
        m = comm.all_reduce(logits.max(dim=-1).values, op=torch.distributed.ReduceOp.MAX)
        shifted = logits - m[..., None]
        local = targets - start
        mine = (local >= 0) & (local < logits.shape[-1])
        idx = local.clamp(0, logits.shape[-1] - 1)[..., None]
        target_logit = shifted.gather(-1, idx)[..., 0].masked_fill(~mine, 0.0)
        comm.all_reduce(target_logit)
        exp = shifted.exp()
        sum_exp = comm.all_reduce(exp.sum(dim=-1))
        ctx.save_for_backward(exp / sum_exp[..., None], idx, mine)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, idx, mine = ctx.saved_tensors
        one_hot = torch.zeros_like(softmax).scatter_(-1, idx, mine[..., None].to(softmax.dtype))
        return ((softmax - one_hot) * grad[..., None]).to(ctx.dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, start: int,
                                 comm: TPComm) -> torch.Tensor:
    """Per-token loss [...] from this rank's logits [..., V/p] (vocabulary from `start`)."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
                         f"must agree except the last dim")
    if targets.dtype != torch.long:
        raise TypeError(f"targets must be int64, got {targets.dtype}")
    return _VocabParallelCE.apply(logits, targets, start, comm)
