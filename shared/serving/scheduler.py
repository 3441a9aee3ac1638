"""One batch per iteration under a token budget: Orca's iteration-level scheduling (Yu et al.,
OSDI 2022, §3.1–3.2) with Sarathi-Serve's stall-free batches (Agrawal et al., OSDI 2024, §4).

Each step (policy "sarathi"):
1. every running decode gets its one token first — Sarathi §4.2: "ongoing decodes are never
   paused by a new prefill"; a decode that finds no free block evicts unlocked prefix-cache
   leaves, then preempts the youngest running request (vLLM §4.5: recompute, not swap);
2. the leftover budget goes to prefill chunks (Sarathi §4.1, chunked prefill): first requests
   already prefilling, then new arrivals in FIFO order, each starting from its longest cached
   prefix (SGLang §3). A prefill never preempts anyone: it takes what fits, or waits.

Two baselines share the code: "prefill_first" (vLLM v0's default and Orca's: prefills run
alone while any can run, so decodes stall, which `decode_stalls` counts) and "static"
(a new batch is admitted only when the previous one has fully finished: the batch waits for
its longest member).

`Step` records exact counts per step — batch composition, preemptions, evictions, cache hits,
KV use — for the lab's plots; `decode_stalls` is the Sarathi counter: running decodes that
were left out of a step that ran prefill tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from shared.serving.kv_pool import BlockPool
from shared.serving.prefix_cache import RadixCache
from shared.serving.request import Request, Status

POLICIES = ("sarathi", "prefill_first", "static")


@dataclass(frozen=True)
class SchedulerConfig:
    num_blocks: int = 64
    block_size: int = 16
    token_budget: int = 64          # tokens per step (Sarathi's chunk size τ, §4.3)
    max_num_seqs: int = 16          # requests running at once
    prefix_caching: bool = True
    policy: str = "sarathi"

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "token_budget", "max_num_seqs"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.max_num_seqs > self.token_budget:   # else decodes alone could overrun a step
            raise ValueError(f"max_num_seqs ({self.max_num_seqs}) must be <= token_budget "
                             f"({self.token_budget}): every running decode needs a token")


@dataclass
class Step:
    """One iteration: what ran (request, tokens, "decode" | "prefill") and the counts."""

    index: int
    items: list[tuple[Request, int, str]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)   # each item's first position
    preempted: list[object] = field(default_factory=list)
    evicted_blocks: int = 0
    cached_tokens: int = 0          # prompt tokens admissions found in the prefix cache
    decode_stalls: int = 0
    used_blocks: int = 0            # blocks not free after scheduling
    cache_only_blocks: int = 0      # of those, held by the prefix cache alone
    num_blocks: int = 1
    running: int = 0
    waiting: int = 0

    @property
    def decode_tokens(self) -> int:
        return sum(n for _, n, kind in self.items if kind == "decode")

    @property
    def prefill_tokens(self) -> int:
        return sum(n for _, n, kind in self.items if kind == "prefill")

    @property
    def kv_tokens(self) -> int:
        """Keys and values the step's attention reads: each row's context after its tokens."""
        return sum(s + n for s, (_, n, _) in zip(self.starts, self.items, strict=True))

    @property
    def attention_pairs(self) -> int:
        """(query, key) pairs under the causal mask: n·start + n(n+1)/2 per row."""
        return sum(n * s + n * (n + 1) // 2
                   for s, (_, n, _) in zip(self.starts, self.items, strict=True))

    @property
    def kv_utilisation(self) -> float:
        """Fraction of blocks holding K, V some running request uses."""
        return (self.used_blocks - self.cache_only_blocks) / self.num_blocks


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.manager = BlockPool(config.num_blocks, config.block_size)
        self.cache = RadixCache(config.block_size) if config.prefix_caching else None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._nodes: dict[int, object] = {}      # id(request) -> its locked radix node
        self._in_tree: dict[int, int] = {}       # id(request) -> its blocks in the tree
        self.steps = 0

    # ---- the step ---------------------------------------------------------------------------
    def schedule(self) -> Step:
        step = Step(self.steps, num_blocks=self.config.num_blocks)
        self.steps += 1
        budget = self.config.token_budget
        decodes = [r for r in self.running if r.is_decode]
        if self.config.policy == "prefill_first":
            budget = self._prefills(step, budget)
            if not step.items:
                budget = self._decodes(step, budget)
        else:
            budget = self._decodes(step, budget)
            self._prefills(step, budget)
        while not step.items and self.running:   # all stuck on blocks: free some by recompute
            self._preempt(self.running[-1], step)
            self._prefills(step, self.config.token_budget)
        ran = {id(r) for r, _, _ in step.items}
        if step.prefill_tokens:
            step.decode_stalls = sum(1 for r in decodes
                                     if r.status is Status.RUNNING and id(r) not in ran)
        m = self.manager
        step.used_blocks = m.num_blocks - m.num_free
        step.cache_only_blocks = m.num_cache_only
        step.running, step.waiting = len(self.running), len(self.waiting)
        return step

    def _decodes(self, step: Step, budget: int) -> int:
        for r in list(self.running):
            if r.status is not Status.RUNNING or not r.is_decode:
                continue                     # preempted by an older decode this step
            while not self._make_room(r, 1, step):
                self._preempt(self.running[-1], step)
                if r.status is not Status.RUNNING:
                    break
            if r.status is Status.RUNNING:
                step.starts.append(r.num_computed)
                self._reserve(r, 1)
                step.items.append((r, 1, "decode"))
                budget -= 1
        return budget

    def _prefills(self, step: Step, budget: int) -> int:
        scheduled = {id(r) for r, _, _ in step.items}
        for r in self.running:               # chunks of prefills already under way first
            if budget and id(r) not in scheduled and not r.is_decode:
                budget = self._chunk(r, budget, step)
        # static: a new batch only once the last has finished, and then a whole batch
        # (max_num_seqs) joins at once, the members the budget cannot reach this step
        # without a chunk (they prefill in the next steps, before any decode of theirs)
        static = self.config.policy == "static"
        gate_open = not (static and self.running)
        while gate_open and (budget or static) and self.waiting and \
                len(self.running) < self.config.max_num_seqs:
            r = self.waiting[0]
            self._admit(r)
            left = self._chunk(r, budget, step) if budget else budget
            if budget and left == budget:    # not one token fitted: wait for blocks (FIFO)
                self._release(r)
                break
            budget = left
            step.cached_tokens += r.num_cached
            self.running.append(self.waiting.popleft())
        return budget

    def _chunk(self, r: Request, budget: int, step: Step) -> int:
        n = min(r.remaining, budget)
        if not self._make_room(r, n, step):
            n = min(n, self.manager.room(id(r)))
        if n > 0:
            step.starts.append(r.num_computed)
            self._reserve(r, n)
            step.items.append((r, n, "prefill"))
        return budget - n

    # ---- blocks -----------------------------------------------------------------------------
    def _make_room(self, r: Request, n: int, step: Step) -> bool:
        """Enough free blocks for n more tokens of r, evicting cache leaves if need be."""
        m = self.manager
        short = m.blocks_for(m.length(id(r)) + n) - len(m.block_table(id(r))) - m.num_free
        if short > 0 and self.cache is not None:
            for b in self.cache.evict(short):
                m.release(b)
                step.evicted_blocks += 1
        return m.blocks_for(m.length(id(r)) + n) - len(m.block_table(id(r))) <= m.num_free

    def _reserve(self, r: Request, n: int) -> None:
        """Slots for r's next n tokens (their ids let the manager hash full blocks)."""
        tokens = r.tokens
        for t in tokens[r.num_computed:r.num_computed + n]:
            if not self.manager.append_token(id(r), t).ok:
                raise RuntimeError("out of blocks after room was checked: a scheduler bug")

    def _admit(self, r: Request) -> None:
        """Give r a block table: its longest cached prefix (at least one token left to run,
        whose logits give the next token), locked while r uses it."""
        tokens, bs = r.tokens, self.config.block_size
        blocks, node = [], None
        if self.cache is not None:
            blocks, node = self.cache.match(tokens, max_blocks=(len(tokens) - 1) // bs)
            self.cache.lock(node)
            self._nodes[id(r)] = node
        self.manager.adopt(id(r), blocks, tokens[:len(blocks) * bs])
        self._in_tree[id(r)] = len(blocks)
        r.num_computed = r.num_cached = len(blocks) * bs
        r.status = Status.RUNNING

    def _release(self, r: Request) -> None:
        """Drop r's hold on its blocks (cached ones stay in the tree, now evictable)."""
        self.manager.free(id(r))
        node = self._nodes.pop(id(r), None)
        if node is not None:
            self.cache.unlock(node)
        self._in_tree.pop(id(r), None)
        r.num_computed = 0
        if r.status is Status.RUNNING:
            r.status = Status.WAITING

    def _preempt(self, r: Request, step: Step) -> None:
        self.running.remove(r)
        self._release(r)
        r.preemptions += 1
        self.waiting.appendleft(r)           # first in line again (vLLM's FCFS recompute)
        step.preempted.append(r.request_id)

    # ---- after the model ran ----------------------------------------------------------------
    def computed(self, r: Request, n: int) -> None:
        """n more of r's tokens have K, V in the cache: cache its newly full blocks."""
        r.num_computed += n
        if self.cache is None:
            return
        full = r.num_computed // self.config.block_size
        if full > self._in_tree[id(r)]:
            table = self.manager.block_table(id(r))[:full]
            node, taken = self.cache.insert(r.tokens[:full * self.config.block_size], table)
            for b in taken:
                self.manager.retain(b)
            self.cache.lock(node)
            self.cache.unlock(self._nodes[id(r)])
            self._nodes[id(r)], self._in_tree[id(r)] = node, full

    def finish(self, r: Request) -> None:
        """r is done (finished or aborted): out of the batch, its blocks released."""
        if r in self.running:
            self.running.remove(r)
            self._release(r)
        elif r in self.waiting:
            self.waiting.remove(r)
        r.status = Status.FINISHED

    def check(self) -> None:
        self.manager.check()
        if self.cache is not None:
            self.cache.check()
            held = sorted(b for b in range(self.manager.num_blocks) if self.manager.held[b])
            assert held == sorted(self.cache.cached_blocks()), "cache holds ≠ tree blocks"
            # the lock's point: evicting an unlocked node frees its blocks, so none is in use
            m = self.manager
            assert all(m.ref_counts[b] == m.held[b] for b in self.cache.unlocked_blocks()), \
                "a request uses a block of an unlocked cache node"
