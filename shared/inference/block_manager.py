"""vLLM's block manager (Kwon et al. 2023, §4.2–4.4): the KV cache as fixed-size blocks, mapped
per sequence by a block table, with reference counts for sharing.

- allocate(seq, tokens): blocks for a prompt. Full blocks are looked up by a *hash chain*,
  h_i = hash(h_{i−1}, tokens of block i), so two prompts share a block only when everything before
  it matches too (vLLM's automatic prefix caching, which the serving lab reuses).
- append_token(seq, token): one more token; a new block when the last is full, and
  copy-on-write (§4.4) when the last block is shared (after a fork) and not full.
- fork(parent, child): parallel sampling / beam search; the child shares every block.
- free(seq): counts drop; a block whose count reaches 0 returns to the free list.

Running out of blocks is an Outcome with ok=False that says how many blocks were needed: the
scheduler can preempt or wait. Every operation checks what it needs *before* changing anything,
so a refused one leaves the state as it was. The block manager moves no data: an Outcome lists
the copies (src, dst) the engine must make in the cache (copy-on-write).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Outcome:
    ok: bool
    new_blocks: tuple[int, ...] = ()
    copies: tuple[tuple[int, int], ...] = ()   # (src, dst) blocks the engine must copy
    cached_tokens: int = 0                     # prompt tokens found in the prefix cache
    needed: int = 0                            # blocks the operation needed
    free: int = 0                              # blocks that were free


@dataclass
class _Seq:
    table: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)   # chain hash of each full block


def chain_hash(previous: int | None, block_tokens) -> int:
    """A full block's key: its tokens and, through `previous`, every block before it."""
    return hash((previous, tuple(block_tokens)))


def chain_hashes(tokens, block_size: int) -> list[int]:
    """h_i = chain_hash(h_{i−1}, block i) for each full block of `tokens`."""
    hashes, h = [], None
    for i in range(len(tokens) // block_size):
        h = chain_hash(h, tokens[i * block_size:(i + 1) * block_size])
        hashes.append(h)
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        for name, n in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_list: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.seqs: dict[object, _Seq] = {}
        self.prefix: dict[int, int] = {}       # chain hash -> block holding those tokens
        self._hash_of: dict[int, int] = {}     # block -> its chain hash (if registered)

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_list)

    def block_table(self, seq) -> list[int]:
        return list(self._seq(seq).table)

    def length(self, seq) -> int:
        return len(self._seq(seq).tokens)

    def slot(self, seq, position: int) -> int:
        """Cache slot of token `position`: block · block_size + offset (the slot_mapping)."""
        s = self._seq(seq)
        if not 0 <= position < len(s.tokens):
            raise ValueError(f"position {position} is outside sequence {seq!r} "
                             f"(length {len(s.tokens)})")
        return s.table[position // self.block_size] * self.block_size + position % self.block_size

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    # ---- operations ----------------------------------------------------------------------
    def allocate(self, seq, tokens) -> Outcome:
        """Blocks for a new sequence's prompt, reusing cached full blocks of the same prefix."""
        if seq in self.seqs:
            raise ValueError(f"sequence {seq!r} is already allocated")
        tokens = [int(t) for t in tokens]
        hashes, cached = chain_hashes(tokens, self.block_size), []
        for h in hashes:                                # a prefix: stop at the first miss
            if h not in self.prefix:
                break
            cached.append(self.prefix[h])
        needed = self.blocks_for(len(tokens)) - len(cached)
        if needed > self.num_free:
            return Outcome(False, needed=needed, free=self.num_free)
        for b in cached:
            self._add_ref(b, 1)
        new = [self._take() for _ in range(needed)]
        s = _Seq(cached + new, tokens, hashes)
        for i in range(len(cached), len(hashes)):       # register the new full blocks
            self._register(s.table[i], hashes[i])
        self.seqs[seq] = s
        return Outcome(True, tuple(new), cached_tokens=len(cached) * self.block_size,
                       needed=needed, free=self.num_free)

    def append_token(self, seq, token: int) -> Outcome:
        """Room for one more token: a new block when the last is full; copy-on-write when the
        last block is shared with another sequence and not full."""
        s = self._seq(seq)
        offset = len(s.tokens) % self.block_size
        full = offset == 0
        shared = not full and self.ref_counts[s.table[-1]] > 1
        needed = int(full or shared)
        if needed > self.num_free:
            return Outcome(False, needed=needed, free=self.num_free)
        new, copies = (), ()
        if full:
            s.table.append(self._take())
            new = (s.table[-1],)
        elif shared:                                    # §4.4: copy, then write the copy
            src = s.table[-1]
            self._add_ref(src, -1)                      # still held by the other sequence
            s.table[-1] = self._take()
            new, copies = (s.table[-1],), ((src, s.table[-1]),)
        s.tokens.append(int(token))
        if len(s.tokens) % self.block_size == 0:        # the last block just became full
            h = chain_hash(s.hashes[-1] if s.hashes else None, s.tokens[-self.block_size:])
            s.hashes.append(h)
            self._register(s.table[-1], h)
        return Outcome(True, new, copies, needed=needed, free=self.num_free)

    def fork(self, parent, child) -> Outcome:
        """The child shares all of the parent's blocks (no block is needed now)."""
        if child in self.seqs:
            raise ValueError(f"sequence {child!r} is already allocated")
        p = self._seq(parent)
        for b in p.table:
            self._add_ref(b, 1)
        self.seqs[child] = _Seq(list(p.table), list(p.tokens), list(p.hashes))
        return Outcome(True, free=self.num_free)

    def free(self, seq) -> None:
        for b in self.seqs.pop(self._key(seq)).table:
            self._drop(b)

    # ---- internals ------------------------------------------------------------------------
    def _add_ref(self, block: int, delta: int) -> None:
        """Every change of a reference count goes through here, so a subclass can keep counts
        that depend on them up to date (BlockPool's cache-only blocks)."""
        self.ref_counts[block] += delta

    def _take(self) -> int:
        b = self.free_list.popleft()
        self._add_ref(b, 1)                             # a free block's count is 0
        return b

    def _drop(self, block: int) -> None:
        """One holder fewer; the last one gone, the block leaves the prefix cache and is free."""
        self._add_ref(block, -1)
        if self.ref_counts[block] == 0:
            h = self._hash_of.pop(block, None)
            if h is not None and self.prefix.get(h) == block:
                del self.prefix[h]
            self.free_list.append(block)

    def _other_holders(self) -> list[int]:
        """References per block held by something other than a sequence (none here)."""
        return [0] * self.num_blocks

    def _register(self, block: int, h: int) -> None:
        if h not in self.prefix:   # the first block with these contents stays the cached one
            self.prefix[h] = block
            self._hash_of[block] = h

    def _key(self, seq):
        if seq not in self.seqs:
            raise KeyError(f"no sequence {seq!r}")
        return seq

    def _seq(self, seq) -> _Seq:
        return self.seqs[self._key(seq)]

    def check(self) -> None:
        """Invariants: each block's count is the number of tables holding it; the free list is
        exactly the blocks with count 0, once each; cached blocks are live."""
        counts = self._other_holders()
        for s in self.seqs.values():
            assert len(s.table) == self.blocks_for(len(s.tokens)), "table length ≠ tokens"
            for b in s.table:
                counts[b] += 1
        assert counts == self.ref_counts, "reference counts ≠ table (+ other) references"
        assert sorted(self.free_list) == [b for b in range(self.num_blocks) if counts[b] == 0]
        assert all(self.ref_counts[b] > 0 for b in self.prefix.values()), "cached free block"
