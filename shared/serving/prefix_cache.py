"""SGLang's RadixAttention (Zheng et al. 2023, arXiv 2312.07104, §3): a radix tree whose edges
are token sequences and whose nodes hold the KV-cache blocks of those tokens, kept after a
request finishes so a later request with the same prefix skips recomputing it.

Here the tree works at block granularity (vLLM's blocks, `block_size` tokens each): an edge is
a whole number of *full* blocks, so a match is always a run of whole blocks the new request can
put in its block table unchanged. A partly filled block is never cached (its contents still
change).

- match(tokens): the longest cached prefix, in whole blocks; a match ending inside an edge
  *splits* that node, so the returned node covers exactly the matched tokens.
- insert(tokens, blocks): add a computed prefix; parts already cached keep their blocks
  (the caller's duplicates stay the caller's), and the blocks the tree newly takes are returned
  so the caller can hold a reference on them.
- lock / unlock (SGLang's `inc_lock_ref`): a request using a node locks it and its ancestors;
  a node with lock_ref > 0 is never evicted.
- evict(n): frees least-recently-used unlocked leaves (§3, "LRU eviction policy that
  recursively evicts leaf nodes") until n blocks are out; returns the blocks.

The tree moves no data and owns no memory: the engine holds one reference per cached block in
the block manager and drops it for the blocks `evict` returns.
"""

from __future__ import annotations

import heapq
import itertools


class Node:
    __slots__ = ("key", "blocks", "children", "parent", "lock_ref", "last_access")

    def __init__(self, key: tuple[int, ...], blocks: list[int], parent: Node | None):
        self.key = key                       # tokens on the edge into this node
        self.blocks = blocks                 # len(key) // block_size block ids
        self.children: dict[tuple[int, ...], Node] = {}   # keyed by their first block
        self.parent = parent
        self.lock_ref = 0
        self.last_access = 0


class RadixCache:
    def __init__(self, block_size: int):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.block_size = block_size
        self.root = Node((), [], None)
        self.root.lock_ref = 1               # the root is never evicted
        self._clock = itertools.count(1)     # logical time: LRU order is deterministic

    # ---- lookups ---------------------------------------------------------------------------
    def _first(self, tokens, i: int) -> tuple[int, ...]:
        return tuple(tokens[i:i + self.block_size])

    def _common_blocks(self, key, tokens, start: int) -> int:
        """How many whole blocks of `key` equal tokens[start:]."""
        bs, n = self.block_size, 0
        while n * bs < len(key) and start + (n + 1) * bs <= len(tokens) and \
                key[n * bs:(n + 1) * bs] == tuple(tokens[start + n * bs:start + (n + 1) * bs]):
            n += 1
        return n

    def _split(self, node: Node, n_blocks: int) -> Node:
        """Cut node's edge after n_blocks: a new parent takes the first part (same locks)."""
        cut = n_blocks * self.block_size
        top = Node(node.key[:cut], node.blocks[:n_blocks], node.parent)
        top.lock_ref, top.last_access = node.lock_ref, node.last_access
        node.parent.children[self._first(node.key, 0)] = top
        node.key, node.blocks, node.parent = node.key[cut:], node.blocks[n_blocks:], top
        top.children[self._first(node.key, 0)] = node
        return top

    def match(self, tokens, max_blocks: int | None = None) -> tuple[list[int], Node]:
        """(blocks of the longest cached whole-block prefix of tokens, its node)."""
        tokens = list(tokens)
        limit = len(tokens) // self.block_size
        limit = limit if max_blocks is None else min(limit, max_blocks)
        tokens = tokens[:limit * self.block_size]
        node, i, blocks, now = self.root, 0, [], next(self._clock)
        while i < len(tokens):
            child = node.children.get(self._first(tokens, i))
            if child is None:
                break
            n = self._common_blocks(child.key, tokens, i)
            if n * self.block_size < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            blocks += child.blocks
            node, i = child, i + len(child.key)
        return blocks, node

    # ---- updates ---------------------------------------------------------------------------
    def insert(self, tokens, blocks) -> tuple[Node, list[int]]:
        """Cache the first len(blocks) full blocks of tokens. -> (their node, the blocks the
        tree newly holds: the caller takes a reference on each)."""
        tokens, blocks = list(tokens), list(blocks)
        if len(tokens) < len(blocks) * self.block_size:
            raise ValueError(f"tokens ({len(tokens)}) do not fill {len(blocks)} blocks of "
                             f"{self.block_size}")
        tokens = tokens[:len(blocks) * self.block_size]
        node, i, taken, now = self.root, 0, [], next(self._clock)
        while i < len(tokens):
            child = node.children.get(self._first(tokens, i))
            if child is None:                  # the rest is new: one leaf for all of it
                b = i // self.block_size
                child = Node(tuple(tokens[i:]), blocks[b:], node)
                node.children[self._first(tokens, i)] = child
                taken += blocks[b:]
            else:
                n = self._common_blocks(child.key, tokens, i)
                if n * self.block_size < len(child.key):
                    child = self._split(child, n)
            child.last_access = now
            node, i = child, i + len(child.key)
        return node, taken

    def lock(self, node: Node) -> None:
        while node is not None:
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not None:
            if node.lock_ref <= 0:
                raise ValueError("unlock of a node that is not locked")
            node.lock_ref -= 1
            node = node.parent

    def evict(self, n_blocks: int) -> list[int]:
        """Free unlocked leaves, least recently used first, until n_blocks are freed or none
        is left; a parent left childless and unlocked becomes a candidate in turn."""
        heap = [(leaf.last_access, id(leaf), leaf) for leaf in self._leaves()
                if leaf.lock_ref == 0]
        heapq.heapify(heap)
        freed: list[int] = []
        while heap and len(freed) < n_blocks:
            _, _, leaf = heapq.heappop(heap)
            freed += leaf.blocks
            parent = leaf.parent
            del parent.children[self._first(leaf.key, 0)]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    # ---- inspection ------------------------------------------------------------------------
    def _nodes(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _leaves(self):
        return [n for n in self._nodes() if not n.children and n is not self.root]

    @property
    def num_blocks(self) -> int:
        return sum(len(n.blocks) for n in self._nodes())

    def unlocked_blocks(self) -> list[int]:
        """Blocks `evict` may take now: those of nodes with no lock."""
        return [b for n in self._nodes() if n.lock_ref == 0 for b in n.blocks]

    def evictable_blocks(self) -> int:
        return len(self.unlocked_blocks())

    def cached_blocks(self) -> list[int]:
        return [b for n in self._nodes() for b in n.blocks]

    def check(self) -> None:
        """Invariants: edges are whole blocks keyed by their first block; a node's lock count is
        at least the sum of its children's (locks climb to the root); no block twice."""
        bs = self.block_size
        for n in self._nodes():
            if n is not self.root:
                assert n.key and len(n.key) == bs * len(n.blocks), "edge is not whole blocks"
                assert n.parent.children[self._first(n.key, 0)] is n, "child keyed wrongly"
            assert n.lock_ref >= sum(c.lock_ref for c in n.children.values()), "lock order"
        blocks = self.cached_blocks()
        assert len(blocks) == len(set(blocks)), "a block cached twice"
