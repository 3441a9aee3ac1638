"""The serving engine's KV memory: vLLM's block manager plus the blocks' keys and values, and one
model forward over a ragged batch (decodes of one token beside prefill chunks of many).

`BlockPool` is shared/inference/block_manager.BlockManager (the same free list and reference
counts) with the three things a prefix cache needs that it lacks:
- `adopt(seq, blocks, tokens)`: start a sequence on blocks that already hold those tokens'
  K, V (a radix-tree hit; the base only shares blocks through its own hash chain);
- `retain(block)` / `release(block)`: a holder that is not a sequence (the radix tree keeps
  a finished request's full blocks; the base frees a block when its last sequence goes);
- `num_cache_only`: the blocks the prefix cache alone holds (no request uses them), kept as a
  running count where reference counts change, so the scheduler does not scan every block.

`forward` runs the tiny Llama once for the whole batch, Orca's "selective batching" (§4.2):
the step's tokens are flattened, one batch row each, so the linear layers run on exactly the
tokens scheduled (no padding to the longest chunk), while attention stays per request: each
token's keys are gathered through its request's block table (`RaggedPagedBatch.update`, the
contract of shared/models/llama.py's caches), so it sees its own cached prefix and nothing of
the others.
"""

from __future__ import annotations

import itertools

import torch

from shared.inference.block_manager import BlockManager, _Seq, chain_hashes
from shared.models.llama import Llama


class BlockPool(BlockManager):
    def __init__(self, num_blocks: int, block_size: int):
        self.held = [0] * num_blocks          # references held by the prefix cache
        self.num_cache_only = 0               # blocks with held == ref_counts > 0
        super().__init__(num_blocks, block_size)

    def adopt(self, seq, blocks, tokens) -> None:
        tokens = [int(t) for t in tokens]
        if seq in self.seqs:
            raise ValueError(f"sequence {seq!r} is already allocated")
        if len(blocks) != self.blocks_for(len(tokens)) or len(tokens) % self.block_size:
            raise ValueError(f"{len(blocks)} blocks cannot hold exactly {len(tokens)} tokens")
        if any(self.ref_counts[b] == 0 for b in blocks):
            raise ValueError("adopt takes live blocks only (a free block holds no K, V)")
        for b in blocks:
            self._add_ref(b, 1)
        self.seqs[seq] = _Seq(list(blocks), tokens, chain_hashes(tokens, self.block_size))

    def retain(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            raise ValueError(f"block {block} is free: there is nothing in it to keep")
        self._add_ref(block, 1, held=1)

    def release(self, block: int) -> None:
        if self.held[block] == 0:
            raise ValueError(f"block {block} is not held by the cache")
        self._add_ref(block, 0, held=-1)
        self._drop(block)

    def room(self, seq) -> int:
        """Tokens `seq` can still append: the rest of its last block plus every free block."""
        s = self.seqs[seq]
        return len(s.table) * self.block_size - len(s.tokens) + self.num_free * self.block_size

    def _add_ref(self, block: int, delta: int, held: int = 0) -> None:
        """Reference counts (and the cache's share of them, `held`) change only here: the
        block's cache-only state before and after updates num_cache_only."""
        was = self._cache_only(block)
        self.held[block] += held
        super()._add_ref(block, delta)
        self.num_cache_only += self._cache_only(block) - was

    def _cache_only(self, block: int) -> bool:
        return 0 < self.held[block] == self.ref_counts[block]

    def _other_holders(self) -> list[int]:
        """The prefix cache's references: `check` counts them beside the sequences'."""
        return list(self.held)

    def check(self) -> None:
        super().check()
        scan = sum(self._cache_only(b) for b in range(self.num_blocks))
        assert self.num_cache_only == scan, "num_cache_only ≠ a scan of the blocks"


class RaggedPagedBatch:
    """The `cache` argument of Block.forward for one step: slots [B, T] (−1 = padding) where
    each token's K, V go, tables [B, W] each row's blocks (padded with block 0, masked)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                 tables: torch.Tensor, block_size: int):
        self.k, self.v, self.slots, self.tables = k, v, slots, tables
        offsets = torch.arange(block_size, device=k.device)
        self.gather = (tables[:, :, None] * block_size + offsets).flatten(1)   # [B, W·bs]
        self.valid = slots >= 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Store k, v [B, Hkv, T, hd] at the valid slots; return keys, values [B, Hkv, S, hd]
        at positions 0..S−1 of each row (Attention masks key j > the query's position)."""
        keep = self.slots[self.valid]
        self.k[layer_idx][keep] = k.transpose(1, 2)[self.valid].to(self.k.dtype)
        self.v[layer_idx][keep] = v.transpose(1, 2)[self.valid].to(self.v.dtype)
        return (self.k[layer_idx][self.gather].transpose(1, 2),
                self.v[layer_idx][self.gather].transpose(1, 2))


class KVPool:
    """Keys and values of every block, [n_layers, num_blocks · block_size, Hkv, hd] each,
    laid out as PagedKVCache's, with the BlockPool that hands them out."""

    def __init__(self, model: Llama, manager: BlockPool):
        cfg, w = model.config, model.lm_head.weight
        self.manager, self.block_size = manager, manager.block_size
        shape = (cfg.n_layers, manager.num_blocks * self.block_size, cfg.n_kv_heads,
                 cfg.head_dim)
        # zeros: gathered slots beyond a row's length are masked, but must not be NaN
        self.k = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.v = torch.zeros(shape, dtype=w.dtype, device=w.device)

    @torch.no_grad()
    def forward(self, model: Llama, rows: list[tuple[object, list[int], int]]) -> torch.Tensor:
        """rows: (seq, token ids, position of the first) whose slots the manager already holds.
        -> logits [len(rows), V] at each row's last token.

        Every token of the step is its own batch row of length 1 (its position, its slot, its
        request's block table), so nothing is padded: the linear layers see exactly the step's
        tokens, and each token's attention reads its own request's keys up to its position
        (all of the step's K, V are stored before any is read, and the causal mask hides the
        later ones of the same chunk)."""
        device, m = self.k.device, self.manager
        flat = [(seq, tok, start + i) for seq, toks, start in rows
                for i, tok in enumerate(toks)]
        tokens = torch.tensor([[tok] for _, tok, _ in flat])
        positions = torch.tensor([[pos] for _, _, pos in flat])
        slots = torch.tensor([[m.slot(seq, pos)] for seq, _, pos in flat])
        table = {seq: m.block_table(seq) for seq, _, _ in rows}
        width = max(len(t) for t in table.values())
        tables = torch.tensor([table[seq] + [0] * (width - len(table[seq])) for seq, _, _ in flat])
        batch = RaggedPagedBatch(self.k, self.v, slots.to(device), tables.to(device),
                                 self.block_size)
        positions = positions.to(device)
        h = model.embed(tokens.to(device))
        for block in model.layers:
            h = block(h, cache=batch, positions=positions)
        last = torch.tensor(list(itertools.accumulate(len(toks) for _, toks, _ in rows)),
                            device=device) - 1
        return model.lm_head(model.norm(h[last, 0]))                   # [B, V]: last tokens
