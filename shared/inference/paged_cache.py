"""A paged KV cache for the tiny Llama: the contiguous KVCache's interface over vLLM-style blocks.

K and V live in a pool of blocks, (num_blocks · block_size, n_kv_heads, head_dim) per layer; a
BlockManager (block_manager.py) hands a sequence one more block whenever its positions pass the
last one, and each token's slot is block_table[p // block_size] · block_size + p % block_size
(the slot_mapping). Memory is reserved block by block as sequences grow, not max_len per
sequence up front: that is the paper's point (§4.2), and the lab measures it.

`update` keeps KVCache's contract, so shared/models/llama.py runs on this cache unchanged: it
writes k, v through the slot mapping and returns each sequence's keys 0..S−1 gathered through
its block table (slots past a sequence's end hold stale or zero values, which the model's causal
mask hides). `decode_attention` is the other way in: the Triton paged_attention kernel reading
the blocks directly, for one new token per sequence.

Positions are read to the host to grow the tables (a sync per layer call on a GPU): a serving
engine's scheduler knows them on the host already; here it keeps the cache a drop-in.
"""

from __future__ import annotations

import torch

from shared.inference.block_manager import BlockManager
from shared.models.llama import LlamaConfig


class PagedKVCache:
    def __init__(self, config: LlamaConfig, batch_size: int, *, num_blocks: int,
                 block_size: int = 16, n_layers: int | None = None,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.manager = BlockManager(num_blocks, block_size)
        self.block_size = block_size
        n_layers = config.n_layers if n_layers is None else n_layers
        shape = (n_layers, num_blocks * block_size, config.n_kv_heads, config.head_dim)
        # zeros, not empty: gathered slots past a sequence's end must be finite for the mask
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        for b in range(batch_size):
            self.manager.allocate(b, [])

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def _grow(self, b: int, n_tokens: int) -> None:
        while self.manager.length(b) < n_tokens:
            out = self.manager.append_token(b, -1)   # no prefix caching here: ids unknown
            if not out.ok:
                raise RuntimeError(f"paged cache out of blocks: sequence {b} needs {out.needed},"
                                   f" {out.free} free")

    def slot_mapping(self, positions: torch.Tensor) -> torch.Tensor:
        """[B, T] positions -> [B, T] int64 slots, growing the block tables as needed."""
        pos = positions.cpu()
        for b in range(self.batch_size):
            self._grow(b, int(pos[b].max()) + 1)
        return torch.tensor([[self.manager.slot(b, int(p)) for p in row]
                             for b, row in enumerate(pos)], device=self.k.device)

    def block_tables(self) -> torch.Tensor:
        """int32 [B, max_blocks], padded with block 0 (never read: past every seq_len)."""
        tables = [self.manager.block_table(b) for b in range(self.batch_size)]
        width = max(1, max(len(t) for t in tables))
        return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                            device=self.k.device)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, Hkv, T, hd] at `positions` [B, T]; return every sequence's keys and
        values at positions 0..S−1 gathered through its block table ([B, Hkv, S, hd])."""
        if k.shape[0] != self.batch_size:
            raise ValueError(f"k has batch {k.shape[0]}, cache has {self.batch_size}")
        slots = self.slot_mapping(positions)                         # [B, T]
        self.k[layer_idx][slots] = k.transpose(1, 2).to(self.k.dtype)   # [B, T, Hkv, hd]
        self.v[layer_idx][slots] = v.transpose(1, 2).to(self.v.dtype)
        tables = self.block_tables().long()                          # [B, nb]
        offsets = torch.arange(self.block_size, device=tables.device)
        gather = (tables[:, :, None] * self.block_size + offsets).flatten(1)   # [B, S]
        return (self.k[layer_idx][gather].transpose(1, 2),
                self.v[layer_idx][gather].transpose(1, 2))

    def decode_attention(self, layer_idx: int, q: torch.Tensor, seq_lens: torch.Tensor):
        """q [B, Hq, hd], one token per sequence, over each sequence's first seq_lens keys:
        the Triton paged_attention kernel on this layer's blocks."""
        from kernels.paged import paged_attention

        shape = (-1, self.block_size, *self.k.shape[2:])
        return paged_attention(q, self.k[layer_idx].view(shape), self.v[layer_idx].view(shape),
                               self.block_tables(), seq_lens.to(torch.int32))

    def advance(self, n) -> None:
        """Keep n more tokens per sequence (the model does not advance the cache itself)."""
        self.lengths = self.lengths + n

    def reserved_slots(self) -> int:
        """Slots held by sequences (blocks × block_size): what the paged cache reserves."""
        return sum(len(self.manager.block_table(b)) for b in range(self.batch_size)) * \
            self.block_size
