"""The flash-attention lab's models: standard attention's exact IO model against the counter,
the perfect-cache bound, the asymptote, the helpers that read `kclub compile` rows, and the GPU
side: the counted-work prediction and the interleaved row."""

import pytest
import torch

from kernels.attention import BlockSizes
from shared import roofline
from shared.benchmarks import flash_attention as fa
from shared.benchmarks import flash_attention_compiled as fc
from shared.benchmarks import flash_attention_gpu as fg


@pytest.mark.interpreter
@pytest.mark.parametrize("n,d,blocks", [(100, 40, BlockSizes(32, 16)),
                                        (70, 128, BlockSizes(16, 32)),
                                        (130, 64, BlockSizes(64, 64))])
def test_standard_traffic_is_exactly_the_io_model(n, d, blocks):
    """Ragged n and head dims (masked lanes, K steps past d) against every counted byte/FLOP."""
    assert fa.count("standard", n, d, blocks=blocks, seed=n) == fa.standard_io_model(n, d, blocks)


def test_standard_model_by_hand():
    # n = 128, d = 64, 64x64 tiles: every bmm re-reads its operands twice (2 tiles per side)
    n, d, e = 128, 64, 2
    s = 2 * n * d + 2 * d * n + n * n          # S = QKᵀ: Q per column tile, K per row tile
    pv = 1 * n * n + 2 * n * d + n * d          # O = PV: one column tile (d = 64), V twice
    want = fa.Counted(e * (s + 2 * n * n + pv), e * (3 * pv + s + 3 * n * n),
                      2 * n * n * d * 2, 2 * n * n * d * 4)
    assert fa.standard_io_model(n, d, BlockSizes(64, 64)) == want


@pytest.mark.parametrize("impl", ["standard", "flash"])
@pytest.mark.parametrize("n,d", [(1024, 64), (1000, 128), (77, 40)])
def test_perfect_cache_is_below_no_cache_with_the_same_flops(impl, n, d):
    blocks = BlockSizes(64, 32)
    exact, cached = fa.io_model(impl, n, d, blocks), fa.cached_io_model(impl, n, d, blocks)
    assert cached.fwd_bytes < exact.fwd_bytes and cached.bwd_bytes < exact.bwd_bytes
    assert (cached.fwd_flops, cached.bwd_flops) == (exact.fwd_flops, exact.bwd_flops)


def test_perfect_cache_when_one_tile_covers_everything():
    """A single tile re-reads nothing: the no-cache model equals the perfect-cache one
    (flash forward; standard's bmm when one tile spans every output)."""
    n, d, one = 64, 64, BlockSizes(64, 64)
    flash = fa.cached_io_model("flash", n, d, one)
    assert fa.flash_io_model(n, d, one).fwd_bytes == flash.fwd_bytes
    assert fa.standard_io_model(n, d, one).bytes == fa.cached_io_model("standard", n, d, one).bytes


def test_asymptote_matches_the_hand_count_and_is_approached_from_below():
    # per N² bytes at d=64, 64x64 tiles, fp16: standard 19 elements (fwd 7, bwd 12) x 2 bytes;
    # flash: fwd K, V per query tile 4, dK/dV Q, dO per key tile 4 + L, D 1/8, dQ K, V 4
    assert fa.asymptotic_ratio(64, BlockSizes()) == pytest.approx(38 / 12.125, rel=1e-12)
    ratios = [fa.io_model("standard", n, 64, BlockSizes()).bytes
              / fa.io_model("flash", n, 64, BlockSizes()).bytes for n in (256, 1024, 1 << 16)]
    assert ratios[0] < ratios[1] < ratios[2] < 38 / 12.125
    assert ratios[2] > 0.99 * 38 / 12.125


def test_bad_impl_is_refused_by_name():
    with pytest.raises(ValueError, match="impl"):
        fa.cached_io_model("sdpa", 64, 64, BlockSizes())
    with pytest.raises(ValueError, match="impl"):
        fa.io_model("sdpa", 64, 64, BlockSizes())


def _row(kernel="flash_fwd_kernel", target="sm_80", occupancy=0.125, warps=8, stages=3,
         cp_async=12, block=(128, 64, 64)):
    """A compile row as kclub compile writes it (constexprs by parameter name)."""
    consts = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_D"), block, strict=True), CAUSAL=False)
    return {"kernel": kernel, "target": target, "dtype": "fp16", "case": "GPT-2 medium",
            "occupancy": occupancy, "num_warps": warps, "num_stages": stages,
            "constexprs": consts, "census": {"cp.async": cp_async}}


def test_blocks_and_table():
    row = _row(kernel="flash_bwd_dkdv_kernel", block=(64, 32, 128), warps=4)
    assert fc.blocks(row) == BlockSizes(64, 32, 4, 3)
    row |= {"registers": 200, "spill_bytes": 0, "shared_bytes": 45 * 1024,
            "shared_limit": 163 * 1024,
            "census": {"mma.sync": 64, "wgmma": 0, "cp.async": 24, "ex2.approx": 16}}
    line = fc.table([row]).splitlines()[1].split()
    assert line[:5] == ["bwd", "dK/dV", "128", "sm_80", "64x32"] and "45/163" in line


def test_forward_bandwidth_is_littles_law():
    a100 = roofline.HARDWARE["A100 80GB"]
    # 3 stages x (K + V tiles of 64 x 64 fp16) / 8 warps = 6 KiB per warp; 864 warps resident
    row = _row()
    want = 0.125 * 64 * a100.sms * (3 * 2 * 64 * 64 * 2 / 8) / a100.mem_latency_s
    assert fc.forward_bytes_in_flight(row) == 6 * 1024
    assert fc.forward_bandwidth(row, "A100 80GB", cap=False) == pytest.approx(want)
    assert want > a100.mem_bw and fc.forward_bandwidth(row, "A100 80GB") == a100.mem_bw
    # no cp.async: one tile pair in flight; and a tiny occupancy makes the bound bind
    slow = _row(occupancy=1 / 64, cp_async=0)
    want = (1 / 64) * 64 * a100.sms * (2 * 64 * 64 * 2 / 8) / a100.mem_latency_s
    assert fc.forward_bandwidth(slow, "A100 80GB") == pytest.approx(want) and want < a100.mem_bw
    with pytest.raises(ValueError, match="row"):
        fc.forward_bandwidth(_row(kernel="flash_bwd_dq_kernel"), "A100 80GB")


def test_with_bandwidth_only_lowers_the_roof():
    assert fc.with_bandwidth("H100 SXM", 1e15).mem_bw == roofline.HARDWARE["H100 SXM"].mem_bw
    assert fc.with_bandwidth("H100 SXM", 1e12).mem_bw == 1e12


def test_warps_per_scheduler():
    assert fc.warps_per_scheduler(_row(occupancy=0.125), "A100 80GB") == 2
    assert fc.warps_per_scheduler(_row(occupancy=0.25), "H100 SXM") == 4


def test_exp_bound():
    # A100 d=64: 256 FLOPs at 312 T against one exp at 16 x 108 x 1.41 GHz: half the time
    e = fc.exp_bound("A100 80GB", 64)
    assert e["exp / mma time"] == pytest.approx(0.5, rel=1e-3)
    assert e["serial"] == pytest.approx(2 / 3, rel=1e-3) and e["overlapped"] == 1.0
    assert fc.exp_bound("H100 SXM", 128)["serial"] == pytest.approx(2 / 3, rel=1e-3)


def test_select_and_one():
    rows = [_row(), _row(target="sm_90"), {"kernel": "bmm_kernel", "target": "sm_80"}]
    assert fc.select(rows, target="sm_80") == [rows[0]]
    assert fc.one(rows, target="sm_90", case="GPT-2", kernel="flash_fwd_kernel") is rows[1]
    with pytest.raises(ValueError, match="expected one"):
        fc.one(rows, kernel="flash_fwd_kernel")


def test_tile_pairs_by_hand():
    # n = 256, 64x64 tiles: 4 query blocks x 4 key blocks; causal keeps the 10 on or below the
    # diagonal, from either side
    for owner in ("query", "key"):
        assert fg.tile_pairs(256, 64, 64, False, owner) == 16
        assert fg.tile_pairs(256, 64, 64, True, owner) == 10
    # 128-row query blocks over 32-key blocks, causal: block 0 sees 4 key blocks, block 1 sees 8
    assert fg.tile_pairs(256, 128, 32, True, "query") == 12
    # a 128-key block owns 32-row query steps from its diagonal: 8 + 4 steps
    assert fg.tile_pairs(256, 32, 128, True, "key") == 12
    # ragged: 100 queries in 64-row blocks (2), 100 keys in 32-key blocks (4): 2 + 4 causal
    assert fg.tile_pairs(100, 64, 32, True, "query") == 6
    with pytest.raises(ValueError, match="owner"):
        fg.tile_pairs(64, 64, 64, False, "row")


@pytest.mark.interpreter
@pytest.mark.parametrize("n,d,blocks", [(100, 40, BlockSizes(32, 16)),
                                        (130, 64, BlockSizes(64, 64))])
def test_tile_pairs_match_the_counted_dot_flops(n, d, blocks):
    """Causal and not, the pairs tile_pairs counts are the tl.dot FLOPs the counter sees."""
    for causal in (False, True):
        c = fa.count("flash", n, d, causal=causal, blocks=blocks, seed=n)
        tile = 2 * blocks.block_m * blocks.block_n * 64
        fwd = fg.tile_pairs(n, blocks.block_m, blocks.block_n, causal, "query")
        dkdv = fg.tile_pairs(n, blocks.block_m, blocks.block_n, causal, "key")
        assert c.fwd_flops == fg.DOTS["forward"] * tile * fwd
        assert c.bwd_flops == tile * (fg.DOTS["dkdv"] * dkdv + fg.DOTS["dq"] * fwd)


def test_prediction_by_hand_and_its_bounds():
    """H100 SXM, d = 128, 128x128 tiles, N = 4096, not causal: per score the forward does 4·128
    MMA FLOPs and one exp; the backward 14·128 and two (compute bound: the bytes are ~N·d)."""
    one = {p: BlockSizes(128, 128) for p in fg.PASSES}
    part = roofline.HARDWARE["H100 SXM"]
    t_mma, t_exp = 512 / part.peak("fp16"), 1 / (16 * 132 * 1.83e9)
    p = fg.predicted_tflops("H100 SXM", 4096, 128, False, one)
    assert p["fwd serial"] == pytest.approx(512 / (t_mma + t_exp) / 1e12, rel=1e-9)
    assert p["fwd overlapped"] == pytest.approx(part.peak("fp16") / 1e12, rel=1e-9)
    assert p["bwd serial"] == pytest.approx(1280 / (3.5 * t_mma + 2 * t_exp) / 1e12, rel=1e-9)
    # causal at long N: the diagonal's masked half fades, and the prediction never passes peak
    for causal in (False, True):
        big = fg.predicted_tflops("H200", 16384, 64, causal, one)
        assert big["fwd serial"] < big["fwd overlapped"] <= part.peak("fp16") / 1e12
    assert fg.predicted_tflops("H200", 256, 64, True, one)["fwd serial"] < big["fwd serial"]


def test_gpu_row_runs_interleaved_with_an_interval():
    """The GPU table's row, on this CPU at a toy size: both implementations timed, speed ratios
    with a bootstrap interval that contains them, our tiles named."""
    row = fg._gpu_row(32, 16, True, torch.float32, repeat=3, tokens=32, hidden=32, device="cpu")
    for pass_ in ("fwd", "bwd"):
        for impl in ("ours", "sdpa"):
            assert row[f"{impl} {pass_} TFLOP/s"] > 0
        low, high = (float(x) for x in row[f"{pass_} interval"].strip("[]").split(","))
        assert low <= row[f"ours/sdpa {pass_} speed"] <= high
    assert row["tiles"].startswith("forward 64x64")
