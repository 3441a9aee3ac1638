"""The radix prefix cache (SGLang §3) at block granularity, and the BlockPool it holds blocks
through: insert, match, split, LRU eviction, locking; adopt/retain/release against the base
BlockManager's invariants."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.inference.block_manager import BlockManager, chain_hashes
from shared.serving.kv_pool import BlockPool
from shared.serving.prefix_cache import RadixCache

BS = 2


def seq(*blocks):
    """Tokens made of whole blocks: seq(1, 2) = [1, 1, 2, 2]."""
    return [t for b in blocks for t in [b] * BS]


def test_insert_then_match_returns_the_blocks_and_ignores_partial_tails():
    c = RadixCache(BS)
    node, taken = c.insert(seq(1, 2, 3), [10, 11, 12])
    assert taken == [10, 11, 12] and node.blocks == [10, 11, 12]
    assert c.match(seq(1, 2, 3) + [9])[0] == [10, 11, 12]     # a partial block never matches
    assert c.match(seq(1, 2, 7))[0] == [10, 11]
    assert c.match(seq(5))[0] == []
    assert c.match(seq(1, 2, 3), max_blocks=1)[0] == [10]
    c.check()


def test_match_inside_an_edge_splits_the_node():
    c = RadixCache(BS)
    c.insert(seq(1, 2, 3), [10, 11, 12])
    blocks, node = c.match(seq(1, 2, 9))
    assert blocks == [10, 11] and node.key == tuple(seq(1, 2))
    (child,) = node.children.values()
    assert child.key == tuple(seq(3)) and child.blocks == [12] and child.parent is node
    c.check()


def test_insert_diverging_splits_and_takes_only_the_new_blocks():
    c = RadixCache(BS)
    c.insert(seq(1, 2, 3), [10, 11, 12])
    node, taken = c.insert(seq(1, 2, 4, 5), [20, 21, 22, 23])   # 20, 21 duplicate 10, 11
    assert taken == [22, 23] and node.blocks == [22, 23]
    assert node.parent.key == tuple(seq(1, 2)) and node.parent.blocks == [10, 11]
    assert sorted(c.cached_blocks()) == [10, 11, 12, 22, 23]
    assert c.match(seq(1, 2, 4, 5))[0] == [10, 11, 22, 23]
    assert c.insert(seq(1, 2, 3), [30, 31, 32])[1] == []          # all cached already
    c.check()


def test_evict_is_lru_over_leaves_then_their_parents():
    c = RadixCache(BS)
    c.insert(seq(1, 2), [10, 11])
    c.insert(seq(1, 3), [10, 12])
    c.insert(seq(4), [13])
    c.match(seq(1, 2))                       # 1-2 is now the most recently used
    assert c.evict(1) == [12]                # leaf 1-3, the oldest; 1 still has child 2
    assert c.evict(1) == [13]
    assert sorted(c.evict(5)) == [10, 11]    # leaf 2, then its parent 1 became a leaf
    assert c.num_blocks == 0 and c.evict(1) == []
    c.check()


def test_a_locked_node_and_its_ancestors_are_never_evicted():
    c = RadixCache(BS)
    locked, _ = c.insert(seq(1, 2), [10, 11])
    c.insert(seq(1, 3), [10, 12])            # splits 1-2: the lock must survive the split
    c.lock(locked)
    c.check()
    assert c.evict(10) == [12]
    assert sorted(c.cached_blocks()) == [10, 11] and c.evictable_blocks() == 0
    c.unlock(locked)
    assert sorted(c.evict(10)) == [10, 11]
    with pytest.raises(ValueError, match="not locked"):
        c.unlock(locked)


def test_bad_block_size_and_short_tokens():
    with pytest.raises(ValueError, match="block_size"):
        RadixCache(0)
    with pytest.raises(ValueError, match="do not fill"):
        RadixCache(BS).insert([1, 1, 2], [10, 11])


@settings(max_examples=25)
@given(st.lists(st.tuples(st.sampled_from("iml e"), st.lists(st.integers(0, 2), max_size=5),
                          st.integers(1, 4)), max_size=25))
def test_random_operations_keep_every_match_true(ops):
    """Against a model: each whole-block prefix maps to the block first inserted for it. A
    match returns only such blocks; eviction never frees a locked path or a block twice."""
    c, model, locks, freed, next_block = RadixCache(BS), {}, [], set(), 0
    for op, blocks, n in ops:
        tokens = seq(*blocks)
        if op == "i":
            new = list(range(next_block, next_block + len(blocks)))
            next_block += len(blocks)
            c.insert(tokens, new)
            for k, b in enumerate(new):
                model.setdefault(tuple(tokens[:(k + 1) * BS]), b)
        elif op in "ml":
            got, node = c.match(tokens)
            for k, b in enumerate(got):
                assert model[tuple(tokens[:(k + 1) * BS])] == b
            if op == "l" and node is not c.root:
                c.lock(node)
                locks.append((node, got))
        elif op == "e":
            out = c.evict(n)
            protected = {b for _, got in locks for b in got}
            assert not set(out) & protected and not set(out) & freed
            freed |= set(out)
            model = {k: b for k, b in model.items() if b not in out}
        elif locks:
            c.unlock(locks.pop()[0])
        c.check()


def test_block_pool_adopt_retain_release():
    m = BlockPool(6, 4)
    m.allocate("a", list(range(9)))          # 3 blocks, 2 full
    a = m.block_table("a")
    for b in a[:2]:
        m.retain(b)                           # the tree keeps a's full blocks
    assert m.num_cache_only == 0              # a still uses them
    m.free("a")
    assert m.num_free == 4 and m.ref_counts[a[0]] == 1 and m.num_cache_only == 2
    m.adopt("b", a[:2], list(range(8)))       # a later request starts on them
    assert m.num_cache_only == 0
    assert m.append_token("b", 8).ok and m.length("b") == 9
    assert m.seqs["b"].hashes == chain_hashes(list(range(8)), 4)
    m.check()
    m.free("b")
    assert m.num_cache_only == 2
    for b in a[:2]:
        m.release(b)
    assert m.num_free == 6 and m.num_cache_only == 0
    m.check()
    with pytest.raises(ValueError, match="free"):
        m.retain(0)
    with pytest.raises(ValueError, match="not held"):
        m.release(0)
    with pytest.raises(ValueError, match="live blocks"):
        m.adopt("c", [0], [1, 2, 3, 4])


def test_adopted_chain_hashes_match_the_base_managers():
    """adopt must register later blocks as BlockManager.allocate would: same hash chain."""
    tokens = list(range(13))
    base = BlockManager(8, 4)
    base.allocate("s", tokens)
    assert chain_hashes(tokens, 4) == base.seqs["s"].hashes
    pool = BlockPool(8, 4)
    pool.allocate("s", tokens[:8])
    pool.adopt("t", pool.block_table("s"), tokens[:8])
    for t in tokens[8:]:
        pool.append_token("t", t)
    assert pool.seqs["t"].hashes == base.seqs["s"].hashes
    pool.check()


pool_ops = st.lists(st.tuples(st.sampled_from(["alloc", "append", "fork", "free", "retain",
                                               "release", "adopt"]),
                              st.integers(0, 20), st.integers(0, 9)), min_size=1, max_size=80)


@settings(max_examples=60)
@given(ops=pool_ops, num_blocks=st.integers(1, 10))
def test_cache_only_count_equals_a_scan_after_any_operations(ops, num_blocks):
    """The scheduler reads BlockPool.num_cache_only each step instead of scanning every block:
    after any mix of sequence and cache operations it equals the scan (blocks the cache holds
    that no sequence uses)."""
    m, next_id = BlockPool(num_blocks, BS), 0
    for op, pick, n in ops:
        live = sorted(m.seqs)
        blocks = [b for b in range(num_blocks) if m.ref_counts[b]]
        held = [b for b in range(num_blocks) if m.held[b]]
        if op == "alloc":
            if m.allocate(next_id, [pick % 3] * n).ok:   # 3 token values: shared prefixes
                next_id += 1
        elif op == "retain" and blocks:
            m.retain(blocks[pick % len(blocks)])
        elif op == "release" and held:
            m.release(held[pick % len(held)])
        elif op == "adopt" and live:
            s = m.seqs[live[pick % len(live)]]
            k = min(len(s.tokens) // BS, n)
            if k:
                m.adopt(next_id, s.table[:k], s.tokens[:k * BS])
                next_id += 1
        elif live and op == "append":
            m.append_token(live[pick % len(live)], n)
        elif live and op == "fork":
            m.fork(live[pick % len(live)], next_id)
            next_id += 1
        elif live and op == "free":
            m.free(live[pick % len(live)])
        scan = sum(1 for b in range(num_blocks)
                   if m.held[b] and m.ref_counts[b] == m.held[b])
        assert m.num_cache_only == scan, (op, m.held, m.ref_counts)
        m.check()
