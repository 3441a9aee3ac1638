"""The paged-attention lab's measurement helpers: generated workloads, utilisation through the
real BlockManager, the split-K IO model against bytes counted in Triton's interpreter, and the
latency prediction's shape."""

import numpy as np
import pytest

from shared.benchmarks import paged_attention as pa


def test_request_lengths_have_the_papers_means_and_the_cap():
    for name, (mean_in, mean_out) in pa.WORKLOADS.items():
        prompt, output = pa.request_lengths(name, 20_000, seed=1)
        assert (prompt >= 1).all() and (output >= 1).all()
        assert (prompt + output <= pa.MAX_LEN).all()
        # the cap trims the far tail only: means within 5% of the paper's
        assert prompt.mean() == pytest.approx(mean_in, rel=0.05)
        assert output.mean() == pytest.approx(mean_out, rel=0.05)
    a, b = pa.request_lengths("Alpaca-like", 50, seed=3), pa.request_lengths("Alpaca-like", 50,
                                                                             seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("bad", [{"workload": "LMSYS", "n": 5}, {"workload": "Alpaca-like",
                                                                  "n": 0}])
def test_request_lengths_reject_bad_arguments(bad):
    with pytest.raises(ValueError, match="workload" if "LMSYS" in bad.values() else "n"):
        pa.request_lengths(bad["workload"], bad["n"])


def test_utilisation_hand_case():
    # prompt 3, 2 new tokens, blocks of 4: lengths 4 then 5 in 4 then 8 slots
    rows = {u.scheme: u for u in pa.utilisation(np.array([3]), np.array([2]), block_sizes=(4,))}
    paged = rows["paged, block 4"]
    assert (paged.used, paged.reserved, paged.max_waste) == (9, 12, 3)
    assert rows["contiguous, max length"].reserved == 2 * pa.MAX_LEN
    assert rows["contiguous, power of 2"].reserved == 2 * 8
    oracle = rows["contiguous, oracle"]
    assert (oracle.reserved, oracle.max_waste) == (10, 1)


def test_paged_waste_is_below_one_block():
    prompt, output = pa.request_lengths("ShareGPT-like", 40, seed=2)
    rows = pa.utilisation(prompt, output, block_sizes=(8, 32))
    for u in rows:
        assert u.used == rows[0].used and 0 < u.share <= 1
    for u, bs in zip(rows[3:], (8, 32), strict=True):
        assert u.max_waste < bs
    assert rows[3].share > rows[4].share > rows[0].share


@pytest.mark.parametrize("ctx,heads,kv,d,splits", [(77, 8, 2, 80, 3), (300, 4, 1, 64, 1),
                                                   (129, 6, 6, 32, 5)])
def test_io_model_equals_the_counted_bytes(ctx, heads, kv, d, splits):
    c = pa.counted(ctx, heads, kv, d, splits)
    m = pa.io_model(ctx, heads, kv, d, splits)
    for key in ("split_programs", "merge_programs", "split_loaded", "split_stored",
                "merge_loaded", "merge_stored", "bytes"):
        assert c[key] == m[key], key


def test_unpacked_gqa_loads_the_group_times_more_kv():
    packed = pa.counted(200, 8, 2, 64, 2)
    unpacked = pa.counted(200, 8, 2, 64, 2, repeat_kv=True)
    assert unpacked["kv_heads"] == 8
    kv = lambda c: pa.io_model(200, 8, c["kv_heads"], 64, 2)["kv_bytes"]  # noqa: E731
    assert unpacked["split_loaded"] == pa.io_model(200, 8, 8, 64, 2)["split_loaded"]
    assert kv(unpacked) == 4 * kv(packed)


def test_split_prediction_saturates():
    one, many = (pa.predict_latency(32768, 32, 8, 128, s) for s in (1, 16))
    assert one["sms_busy"] == 8 and many["sms_busy"] == 128
    assert one["time_s"] > 2 * many["time_s"]             # 8 programs cannot fill HBM
    hbm = pa.roofline.hardware("H100 SXM").mem_bw   # HBM-bound, less the merge's own pass
    assert many["bound"] == "HBM" and 0.95 * hbm < many["bandwidth"] <= hbm
    # past saturation more splits only add partials and cost a little
    assert pa.predict_latency(32768, 32, 8, 128, 64)["time_s"] > many["time_s"]


def test_decode_roofline_is_memory_bound_for_gqa():
    p = pa.decode_roofline("H100 SXM", 8, 4096, 32, 8, 128, 32)
    assert p.bound == "memory" and p.intensity == pytest.approx(4, rel=0.03)
    assert pa.kv_cache_bytes(32, 8, 128, 1) == 131072   # Llama-3-8B: 128 KiB per token
