"""Paged decode attention (Triton, split-K, GQA packing) against the float64 reference that
gathers K/V token by token: a hand-computed case, then random block tables from a large pool,
ragged lengths (0, 1, 3, block_size ± 1, 513), GQA ratios 1/4/8 and MQA, head_dim 64/128/80,
block sizes 1, 5, 16 and 128 with random odd lengths, and every cache slot the sequences do not
own poisoned with NaN (outputs are poisoned too: kernels.device.POISON)."""

import math

import pytest
import torch

from kernels.paged import paged_attention, paged_attention_reference
from kernels.paged.paged_attention_triton import default_splits, tiles
from kernels.paged.reference import random_paged_inputs
from shared.check import assert_close, fresh_seed, kernel_device, kernel_dtypes, tolerance

DEVICE = kernel_device()
BLOCK = 16
LENGTHS = (0, 1, 3, BLOCK - 1, BLOCK + 1, 513)


def paged_inputs(lengths, heads, kv_heads, head_dim, dtype, seed=0):
    return random_paged_inputs(lengths, heads, kv_heads, head_dim, dtype, block_size=BLOCK,
                               seed=seed, device=DEVICE)


def reference64(q, k, v, tables, lens, **kw):
    return paged_attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                     tables.cpu(), lens.cpu(), **kw)


def test_hand_computed_tiny_case():
    """One sequence of 3 tokens in blocks of 2, stored out of order (table [2, 0]); with
    sm_scale=1 the scores are (0, ln 2, ln 3), so the weights are (1, 2, 3)/6 and the output's
    first coordinate is (1·1 + 2·2 + 3·3)/6 = 7/3. Everything else in the cache is NaN."""
    d = 16
    k = torch.full((3, 2, 1, d), float("nan"))
    v = k.clone()
    for t, (blk, slot) in enumerate([(2, 0), (2, 1), (0, 0)]):
        k[blk, slot, 0] = 0.0
        k[blk, slot, 0, 0] = math.log(t + 1)
        v[blk, slot, 0] = 0.0
        v[blk, slot, 0, 0] = t + 1
    q = torch.zeros(1, 1, d)
    q[0, 0, 0] = 1.0
    tables, lens = torch.tensor([[2, 0]], dtype=torch.int32), torch.tensor([3], dtype=torch.int32)
    want = torch.zeros(1, 1, d)
    want[0, 0, 0] = 7 / 3
    for splits in (1, 2):
        out = paged_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), tables.to(DEVICE),
                              lens.to(DEVICE), sm_scale=1.0, num_splits=splits)
        # exact fp32 here; on a GPU q·k is a TF32 product (10-bit mantissa: ln 2 to ~5e-4)
        bar = tolerance(torch.float32, matmul=True, device=DEVICE)
        torch.testing.assert_close(out.cpu(), want, rtol=bar, atol=bar)
    torch.testing.assert_close(paged_attention_reference(q, k, v, tables, lens, sm_scale=1.0),
                               want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", kernel_dtypes(DEVICE))
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "splits"), [
    (4, 4, 64, 3),      # MHA
    (8, 2, 128, None),  # GQA 4, the split count chosen from the table
    (16, 2, 80, 5),     # GQA 8, head_dim padded to 128
    (8, 1, 64, 1),      # MQA, unsplit
])
def test_against_float64_reference(dtype, heads, kv_heads, head_dim, splits):
    inputs = paged_inputs(LENGTHS, heads, kv_heads, head_dim, dtype, seed=fresh_seed())
    out = paged_attention(*inputs, num_splits=splits)
    assert out.shape == inputs[0].shape and out.dtype == dtype
    ref = reference64(*inputs)
    assert torch.all(out[0] == 0), "a sequence of length 0 must give zeros"
    assert_close(out, ref, dtype=dtype, matmul=True, what=f"paged_attention {dtype}")


def test_splits_agree_and_more_splits_than_tokens():
    inputs = paged_inputs((5, 40), 4, 2, 64, torch.float32, seed=fresh_seed())
    ref = reference64(*inputs)
    for splits in (1, 2, 7, 64):   # 64 splits of a 5-token sequence: most are empty
        assert_close(paged_attention(*inputs, num_splits=splits), ref, dtype=torch.float32,
                     matmul=True, what=f"{splits} splits")


@pytest.mark.parametrize("block_size", [1, 5, 128])
def test_block_sizes_and_random_lengths(block_size):
    """Block sizes that are not 16: one token per block, an odd size (tiles straddle blocks,
    `t // 5` is no shift), and blocks longer than a tile (several tiles per block). Random odd
    lengths, so splits end mid-tile and mid-block, and the prefetched tile past a split's end is
    masked; every split count from one (no merge) to more than the tiles."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    lengths = [2 * int(n) + 1 for n in torch.randint(0, 160, (3,), generator=g)]
    inputs = random_paged_inputs(lengths, 8, 2, 64, torch.float16, block_size=block_size,
                                 pool=3 * -(-max(lengths) // block_size) + 5, seed=seed,
                                 device=DEVICE)
    ref = reference64(*inputs)
    for splits in (1, 3, None):
        assert_close(paged_attention(*inputs, num_splits=splits), ref, dtype=torch.float16,
                     matmul=True, what=f"block {block_size}, lengths {lengths}, splits {splits}")


def test_split_heuristic_fills_the_machine_but_not_with_tiny_splits():
    h100 = 132
    assert default_splits(1, 8, 32_768, h100) == 33   # batch 1, long context: 2 programs per SM
    assert default_splits(4, 8, 32_768, h100) == 9    # 288 programs
    assert default_splits(1, 8, 1024, h100) == 4      # no split under 256 tokens
    assert default_splits(1, 8, 256, h100) == 1
    assert default_splits(64, 8, 32_768, h100) == 1   # 512 programs already


def test_tiles_keep_one_k_tile_near_16_kb():
    assert tiles(4, 128, 2) == (16, 64, 128)    # Llama-3-8B in fp16: 64 keys × 128 × 2 B
    assert tiles(4, 128, 4) == (16, 32, 128)    # fp32 halves the keys
    assert tiles(1, 80, 2) == (16, 64, 128)     # head_dim padded; one head still fills M = 16
    assert tiles(32, 256, 2) == (32, 32, 256)
    assert tiles(8, 16, 4) == (16, 64, 16)      # at most 64 keys


def _bad(**change):
    q, k, v, tables, lens = paged_inputs((3, 20), 4, 2, 64, torch.float32)
    args = dict(q=q, k_cache=k, v_cache=v, block_tables=tables, seq_lens=lens) | change
    return args


@pytest.mark.parametrize(("change", "error", "name"), [
    (lambda a: {"q": a["q"][0]}, ValueError, "q"),
    (lambda a: {"q": a["q"].half()}, TypeError, "k_cache"),
    (lambda a: {"v_cache": a["v_cache"][:, :, :1]}, ValueError, "v_cache"),
    (lambda a: {"block_tables": a["block_tables"].long()}, TypeError, "block_tables"),
    (lambda a: {"seq_lens": a["seq_lens"].long()}, TypeError, "seq_lens"),
    (lambda a: {"block_tables": a["block_tables"] + 10_000}, ValueError, "block_tables"),
    (lambda a: {"seq_lens": a["seq_lens"] + 1000}, ValueError, "seq_lens"),
    (lambda a: {"seq_lens": a["seq_lens"] - 10}, ValueError, "seq_lens"),
    (lambda a: {"q": a["q"][:, :3]}, ValueError, "heads"),
    (lambda a: {"q": a["q"].int()}, TypeError, "q"),
    (lambda a: {"q": a["q"].tolist()}, TypeError, "q"),
])
def test_bad_input_names_the_argument(change, error, name):
    args = _bad()
    args |= change(args)
    with pytest.raises(error, match=name):
        paged_attention(**args)


@pytest.mark.parametrize(("kw", "name"), [({"num_splits": 0}, "num_splits"),
                                          ({"sm_scale": -1.0}, "sm_scale")])
def test_bad_options(kw, name):
    with pytest.raises(ValueError, match=name):
        paged_attention(**_bad(), **kw)
