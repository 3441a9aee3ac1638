"""A tensor-parallel Llama cut from the single-process one (shared/models/llama.py).

Per block (Megatron §3, Fig. 3): attention heads split across ranks, q/k/v column-parallel
and o_proj row-parallel; the SwiGLU MLP with gate/up column-parallel and down row-parallel.
So a block's forward issues two all-reduces (the two g's) and its backward two (the two f's).
Around the blocks: a vocab-parallel embedding (one forward all-reduce), a column-parallel
lm_head (its f: one backward all-reduce) and the vocab-parallel cross-entropy (three
all-reduces of one number per token). The norms are replicated: their inputs are full on
every rank, so are their gradients.

Grouped-query attention with p > n_kv_heads: a key/value head serves n_heads/n_kv_heads query
heads, more than one rank holds, so its k/v rows are replicated on the ranks that need them
(as vLLM does). Each replica's gradient then holds only its own queries' share: after the
backward `sync_replicated_grads` sums them over the replicas (not part of Megatron's layer).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shared.models.llama import Llama, RMSNorm, SwiGLU, apply_rope, positions_for, rope_tables
from shared.parallel.tensor.comm import TPComm, copy_to_tp
from shared.parallel.tensor.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    Shard,
    VocabParallelEmbedding,
    block_index,
    vocab_parallel_cross_entropy,
)


def _rows(heads: range, head_dim: int) -> torch.Tensor:
    return torch.arange(heads.start * head_dim, heads.stop * head_dim)


def head_split(n_heads: int, n_kv_heads: int, comm: TPComm) -> tuple[range, range]:
    """(query heads, key/value heads) this rank computes. Query heads: a contiguous 1/p;
    key/value heads: those its queries read (query h reads kv head h // group)."""
    p = comm.world
    if n_heads % p:
        raise ValueError(f"n_heads={n_heads} must be divisible by the tensor-parallel size {p}")
    if n_kv_heads % p and p % n_kv_heads:
        raise ValueError(f"n_kv_heads={n_kv_heads} and the tensor-parallel size {p} must "
                         f"divide one another")
    q = range(comm.rank * n_heads // p, (comm.rank + 1) * n_heads // p)
    group = n_heads // n_kv_heads
    return q, range(q.start // group, (q.stop - 1) // group + 1)


class TPAttention(nn.Module):
    def __init__(self, attn, comm: TPComm, name: str):
        super().__init__()
        q_heads, kv_heads = head_split(attn.n_heads, attn.n_kv_heads, comm)
        hd = attn.head_dim
        self.comm = comm
        self.head_dim, self.n_heads, self.n_kv_heads = hd, len(q_heads), len(kv_heads)
        self.q_proj = ColumnParallelLinear(attn.q_proj, comm, f"{name}.q_proj",
                                           _rows(q_heads, hd))
        self.k_proj = ColumnParallelLinear(attn.k_proj, comm, f"{name}.k_proj",
                                           _rows(kv_heads, hd))
        self.v_proj = ColumnParallelLinear(attn.v_proj, comm, f"{name}.v_proj",
                                           _rows(kv_heads, hd))
        self.o_proj = RowParallelLinear(attn.o_proj, comm, f"{name}.o_proj", _rows(q_heads, hd))

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        x = copy_to_tp(x, self.comm)  # one f for q, k and v: one backward all-reduce
        q = self.q_proj.local(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj.local(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj.local(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # heads local until here


class TPSwiGLU(nn.Module):
    def __init__(self, ffn, comm: TPComm, name: str):
        super().__init__()
        if not isinstance(ffn, SwiGLU):
            raise TypeError(f"{name}: the block's ffn must be a SwiGLU, got {type(ffn)}")
        cols = block_index(ffn.gate_proj.out_features, comm, f"{name}.ffn_dim")
        self.comm = comm
        self.gate_proj = ColumnParallelLinear(ffn.gate_proj, comm, f"{name}.gate_proj", cols)
        self.up_proj = ColumnParallelLinear(ffn.up_proj, comm, f"{name}.up_proj", cols)
        self.down_proj = RowParallelLinear(ffn.down_proj, comm, f"{name}.down_proj", cols)

    def forward(self, x):
        x = copy_to_tp(x, self.comm)  # one f for gate and up: one backward all-reduce
        return self.down_proj(F.silu(self.gate_proj.local(x)) * self.up_proj.local(x))


def _copy(module: nn.Module, name: str) -> nn.Module:
    """A replicated module (a norm): a copy whose parameters remember their full name."""
    out = RMSNorm(module.weight.shape[0], module.eps)
    out.weight = nn.Parameter(module.weight.detach().clone())
    out.weight.shard = Shard(f"{name}.weight")
    return out


class TPBlock(nn.Module):
    """Block.forward of llama.py with TP attention and MLP: x + attn(norm(x)), h + ffn(norm(h))."""

    def __init__(self, block, comm: TPComm, name: str):
        super().__init__()
        self.config = block.config
        self.attn_norm = _copy(block.attn_norm, f"{name}.attn_norm")
        self.attn = TPAttention(block.attn, comm, f"{name}.attn")
        self.ffn_norm = _copy(block.ffn_norm, f"{name}.ffn_norm")
        self.ffn = TPSwiGLU(block.ffn, comm, f"{name}.ffn")
        cos, sin = rope_tables(block.config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos = self.rope_cos[positions].unsqueeze(1).to(x.dtype)  # [B, 1, T, hd]
        sin = self.rope_sin[positions].unsqueeze(1).to(x.dtype)
        h = x + self.attn(self.attn_norm(x), cos, sin)
        return h + self.ffn(self.ffn_norm(h))


class TPLlama(nn.Module):
    """This rank's share of `model` (a single-process Llama, identical on every rank)."""

    def __init__(self, model: Llama, comm: TPComm):
        super().__init__()
        if not isinstance(model, Llama):
            raise TypeError(f"model must be a shared.models.llama.Llama, got {type(model)}")
        self.config, self.comm = model.config, comm
        self.embed = VocabParallelEmbedding(model.embed, comm, "embed")
        self.layers = nn.ModuleList(TPBlock(b, comm, f"layers.{i}")
                                    for i, b in enumerate(model.layers))
        self.norm = _copy(model.norm, "norm")
        self.lm_head = ColumnParallelLinear(model.lm_head, comm, "lm_head")
        self.vocab_start = int(self.lm_head.weight.shard.index[0])
        self.replicas = _kv_replica_group(model.config.n_kv_heads, comm)
        self.replica_size = max(1, comm.world // model.config.n_kv_heads)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's logits [B, T, V/p] (vocabulary from `vocab_start`)."""
        if tokens.ndim != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be int64 [B, T], got {tokens.dtype} "
                             f"{tuple(tokens.shape)}")
        positions = positions_for(*tokens.shape, 0, self.config, tokens.device)
        h = self.embed(tokens)
        for block in self.layers:
            h = block(h, positions)
        return self.lm_head(self.norm(h))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(mean cross-entropy over all tokens, this rank's logits)."""
        logits = self(tokens)
        return vocab_parallel_cross_entropy(logits, targets, self.vocab_start,
                                            self.comm).mean(), logits

    def sync_replicated_grads(self) -> None:
        """Sum the k/v gradients over the ranks that replicate a kv head (p > n_kv_heads)."""
        if self.replicas is None:
            return
        for block in self.layers:
            for lin in (block.attn.k_proj, block.attn.v_proj):
                if lin.weight.grad is not None:
                    self.comm.all_reduce(lin.weight.grad, group=self.replicas,
                                         size=self.replica_size)


def _kv_replica_group(n_kv_heads: int, comm: TPComm):
    """The process group of the ranks holding this rank's kv head (None: no replication).
    Every rank creates every group, in the same order, as dist.new_group requires."""
    if comm.world <= n_kv_heads:
        return None
    if comm.group is not None:
        raise ValueError("kv-head replication needs the tensor-parallel group to be the "
                         "default process group")
    size = comm.world // n_kv_heads
    mine = None
    for j in range(n_kv_heads):
        group = dist.new_group(list(range(j * size, (j + 1) * size)))
        if comm.rank // size == j:
            mine = group
    return mine
