"""The block manager under random operation sequences: after every step the counts match the
tables, no block leaks, a refused operation changes nothing, and every sequence reads back its
own tokens through its block table from a simulated cache that applies the returned copies."""

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.inference.block_manager import BlockManager

BLOCK = 4


class Engine:
    """The manager plus a physical cache of token ids, as the engine would keep K/V."""

    def __init__(self, num_blocks):
        self.bm = BlockManager(num_blocks, BLOCK)
        self.cache = [[None] * BLOCK for _ in range(num_blocks)]

    def write(self, seq, start):
        for pos in range(start, self.bm.length(seq)):
            slot = self.bm.slot(seq, pos)
            self.cache[slot // BLOCK][slot % BLOCK] = self.bm.seqs[seq].tokens[pos]

    def apply(self, outcome):
        for src, dst in outcome.copies:
            self.cache[dst] = list(self.cache[src])

    def read(self, seq):
        return [self.cache[(s := self.bm.slot(seq, p)) // BLOCK][s % BLOCK]
                for p in range(self.bm.length(seq))]


ops = st.lists(st.tuples(st.sampled_from(["alloc", "append", "fork", "free"]),
                         st.integers(0, 5), st.integers(0, 12), st.integers(0, 2)),
               min_size=1, max_size=60)


@settings(max_examples=40)
@given(ops=ops, num_blocks=st.integers(1, 12))
def test_random_operations_keep_the_invariants(ops, num_blocks):
    e = Engine(num_blocks)
    next_id = 0
    for op, pick, n, tok in ops:
        live = sorted(e.bm.seqs)
        before = copy.deepcopy((e.bm.free_list, e.bm.ref_counts, e.bm.prefix,
                                {k: (s.table, s.tokens) for k, s in e.bm.seqs.items()}))
        if op == "alloc":
            # prompts from a tiny vocabulary share prefixes, so the prefix cache is exercised
            out = e.bm.allocate(next_id, [tok] * min(n, 8) + list(range(n - min(n, 8))))
            if out.ok:
                e.write(next_id, out.cached_tokens)
                next_id += 1
        elif not live:
            continue
        elif op == "append":
            seq = live[pick % len(live)]
            out = e.bm.append_token(seq, tok)
            if out.ok:
                e.apply(out)
                e.write(seq, e.bm.length(seq) - 1)
        elif op == "fork":
            out = e.bm.fork(live[pick % len(live)], next_id)
            next_id += 1
        else:
            e.bm.free(live[pick % len(live)])
            out = None
        if out is not None and not out.ok:   # refused: nothing changed, and it says why
            assert out.needed > out.free
            after = (e.bm.free_list, e.bm.ref_counts, e.bm.prefix,
                     {k: (s.table, s.tokens) for k, s in e.bm.seqs.items()})
            assert after == before
        e.bm.check()
        for seq in e.bm.seqs:
            assert e.read(seq) == e.bm.seqs[seq].tokens, f"sequence {seq} reads wrong tokens"
    for seq in list(e.bm.seqs):
        e.bm.free(seq)
    assert e.bm.num_free == num_blocks and not e.bm.prefix   # nothing leaked
    e.bm.check()


def test_prefix_sharing_and_copy_on_write():
    bm = BlockManager(8, 4)
    a = bm.allocate("a", range(10))                    # blocks: full, full, 2 tokens
    b = bm.allocate("b", [*range(8), 99])              # same two full blocks, then its own
    assert a.ok and b.ok and b.cached_tokens == 8 and len(b.new_blocks) == 1
    assert bm.block_table("a")[:2] == bm.block_table("b")[:2]
    bm.fork("a", "a2")
    out = bm.append_token("a2", 5)                     # last block shared, not full: copy
    assert out.copies == ((bm.block_table("a")[2], bm.block_table("a2")[2]),)
    assert bm.block_table("a")[2] != bm.block_table("a2")[2]
    bm.check()


def test_out_of_blocks_is_an_outcome_not_an_error():
    bm = BlockManager(2, 4)
    assert bm.allocate("a", range(8)).ok
    out = bm.allocate("b", range(100, 105))
    assert not out.ok and out.needed == 2 and out.free == 0 and "b" not in bm.seqs
    out = bm.append_token("a", 1)
    assert not out.ok and bm.length("a") == 8
    bm.check()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_sizes(bad):
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(bad, 4)
