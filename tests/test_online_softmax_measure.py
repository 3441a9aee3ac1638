"""The online-softmax lab's measurement helpers: predictions from counted bytes, the compiled
occupancy in the bandwidth, and what is read from the PTX."""

import pytest
import torch

from shared import roofline
from shared.benchmarks import online_softmax as measure
from shared.benchmarks import online_softmax_compiled as oc


def _counted(safe, online, cols=32768, size=2):
    return {"cols": cols, "block": None, "element_size": size, "safe": safe, "online": online}


def test_prediction_reads_the_counted_bytes():
    """The speed-up is the ratio of the counted bytes, not a constant: change the counts and
    the prediction follows; memory bound, the time is bytes over bandwidth."""
    p = measure.predicted_speedup("H100 SXM", 4096, 32768, _counted(4.0, 3.0))
    assert p["bound"] == "memory" and p["speedup"] == pytest.approx(4 / 3)
    assert p["online_s"] == pytest.approx(3 * 2 * 4096 * 32768 / 3.35e12)
    other = measure.predicted_speedup("H100 SXM", 4096, 32768, _counted(5.0, 2.5))
    assert other["speedup"] == pytest.approx(2.0)
    fp32 = measure.predicted_speedup("A100 80GB", 8, 32768, _counted(4.0, 3.0, size=4))
    assert fp32["safe_bytes"] == 4 * 4 * 8 * 32768


def test_prediction_refuses_counts_of_another_row_length():
    with pytest.raises(ValueError, match="cols=1024"):
        measure.predicted_speedup("H100 SXM", 4096, 1024, _counted(4.0, 3.0))


def test_compiled_occupancy_caps_bandwidth_only_when_low():
    inflight = 4096.0
    need = oc.occupancy_needed("H100 SXM", inflight)
    assert roofline.occupancy_bandwidth("H100 SXM", need, inflight) == pytest.approx(3.35e12)
    assert roofline.occupancy_bandwidth("H100 SXM", need / 2, inflight) < 3.35e12 * 0.51
    compiled = {k: {"occupancy": occ, "bytes_in_flight_per_warp": inflight}
                for k, occ in (("softmax_online_kernel", need / 4),
                               ("softmax_safe_kernel", 0.5))}
    base = measure.predicted_speedup("H100 SXM", 4096, 32768, _counted(4.0, 3.0))
    capped = measure.predicted_speedup("H100 SXM", 4096, 32768, _counted(4.0, 3.0), compiled)
    assert capped["safe_s"] == pytest.approx(base["safe_s"])          # enough warps: no change
    assert capped["online_s"] == pytest.approx(4 * base["online_s"])  # a quarter of them


@pytest.mark.interpreter
def test_counted_accesses_at_the_launchers_tile():
    a = measure.accesses_per_element(3, 5000, None, torch.float16)   # tile 4096: two per row
    assert (a["safe"], a["online"], a["element_size"]) == (4.0, 3.0, 2)
    a = measure.accesses_per_element(3, 300, None, torch.float16)    # one tile: both read once
    assert (a["safe"], a["online"]) == (2.0, 2.0)


PTX = """
\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
\t@%p1 ld.global.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd2 + 0 ];
\t@!%p2 ld.global.b16 { %rs1 }, [ %rd3 + 0 ];
\t@%p3 st.global.v2.f32 [ %rd4 + 0 ], { %f1, %f2 };
\tld.shared.b32 %r9, [ %r10 ];
"""


def test_ptx_memory_ops_counts_widths():
    assert oc.ptx_memory_ops(PTX) == {"ld": {16: 2, 2: 1}, "st": {8: 1}}
    with pytest.raises(ValueError, match="no type width"):
        oc._width(".global")


def _row(target, cols, kernel, regs, occ, block_m, block_n, cp_async=0, dtype="fp16"):
    name = "softmax" if kernel == "softmax_online_kernel" else "safe_softmax"
    return {"target": target, "case": f"{name} 256×{cols}", "dtype": dtype, "kernel": kernel,
            "registers": regs, "spill_bytes": 0, "shared_bytes": 32, "shared_limit": 166912,
            "num_warps": 4, "num_stages": 3, "occupancy": occ, "status": "ok",
            "constexprs": {"BLOCK_M": block_m, "BLOCK_N": block_n, "ONE_TILE": False, "ALIGN": 8},
            "census": {"mma.sync": 0, "wgmma": 0, "ldmatrix": 0, "cp.async": cp_async,
                       "cp.async.bulk": 0, "ex2.approx": 130}}


def test_occupancy_inputs_and_table_from_compile_rows():
    rows = [_row("sm_90", 50000, "softmax_online_kernel", 93, 0.3125, 2, 4096),
            _row("sm_90", 50000, "softmax_safe_kernel", 53, 0.5625, 2, 4096, cp_async=4),
            _row("sm_90", 1000, "softmax_online_kernel", 89, 0.3125, 8, 1024),
            {"target": "tpu", "case": "softmax_pallas", "status": "ok"}]
    got = oc.occupancy_inputs(rows, "sm_90", 50000)
    assert got["softmax_online_kernel"] == {"occupancy": 0.3125, "registers": 93,
                                            "bytes_in_flight_per_warp": 2 * 4096 * 2 / 4}
    # pipelined loads (cp.async) keep num_stages tiles in flight
    assert got["softmax_safe_kernel"]["bytes_in_flight_per_warp"] == 3 * 2 * 4096 * 2 / 4
    with pytest.raises(ValueError, match="both kernels"):
        oc.occupancy_inputs(rows, "sm_80", 50000)
    text = oc.table(rows)
    assert text.count("\n") == 4 and "2×4096" in text and "tpu" not in text


def test_memory_ops_compiles_for_both_targets():
    """Compiled for real (a KC_INTERPRET=0 process): a row of 1000 fp16 values is loaded with
    16-byte vectors thanks to ALIGN, and the multi-tile kernels load a tile per sweep."""
    ops = oc.memory_ops(cols=(1000, 5000))
    assert {(o["target"], o["kernel"], o["cols"]) for o in ops} == {
        (t, k, c) for t in ("sm_80", "sm_90") for k in oc.KERNELS for c in (1000, 5000)}
    for o in ops:
        assert set(o["ld"]) == {16} and set(o["st"]) == {16}, o
    loads = {(o["target"], o["kernel"], o["cols"]): o["ld"][16] for o in ops}
    for t in ("sm_80", "sm_90"):
        one_tile = loads[t, "softmax_online_kernel", 1000]
        assert loads[t, "softmax_safe_kernel", 1000] == one_tile
        assert loads[t, "softmax_safe_kernel", 5000] * 2 == loads[t, "softmax_online_kernel",
                                                                  5000] * 3
