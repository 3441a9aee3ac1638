"""The online-softmax lab's measurement helpers: predictions from counted bytes, the compiled
occupancy in the bandwidth, what is read from the PTX, and the persistent grid's fit."""

import pytest
import torch

from kernels.softmax.tiling import Tiling
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
    """The launcher's own tiling, counted: what ACCESSES (the GPU table's prediction) says."""
    a = measure.accesses_per_element(3, 5000, None, torch.float16)   # tiles of 1024: 5 per row
    assert (a["safe"], a["online"], a["element_size"]) == (4.0, 3.0, 2)
    assert {k: a[k] for k in ("safe", "online")} == measure.ACCESSES[False]
    for cols in (300, 4096):                                         # one tile: read once
        a = measure.accesses_per_element(3, cols, None, torch.float16)
        assert {k: a[k] for k in ("safe", "online")} == measure.ACCESSES[True]


def test_predicted_minimal_gbps():
    """At the HBM roof a kernel's minimal-traffic GB/s is mem_bw × 2 / its accesses."""
    assert measure.predicted_minimal_gbps("H200", True) == pytest.approx(
        {"safe": 4800, "online": 4800})
    assert measure.predicted_minimal_gbps("H200", False) == pytest.approx(
        {"safe": 2400, "online": 3200})


def test_previous_tiling_is_what_the_first_gpu_run_timed():
    assert measure.previous_tiling(4096, 1024) == Tiling(8, 1024, 4, 1, 512)
    assert measure.previous_tiling(4096, 4096) == Tiling(2, 4096, 4, 1, 2048)


PTX = """
\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
\t@%p1 ld.global.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd2 + 0 ];
\t@!%p2 ld.global.b16 { %rs1 }, [ %rd3 + 0 ];
\t@%p3 st.global.v2.f32 [ %rd4 + 0 ], { %f1, %f2 };
\tld.shared.b32 %r9, [ %r10 ];
\tcp.async.cg.shared.global [ %r68 + 0 ], [ %rd25 + 0 ], 0x10, %r69;
\tcp.async.ca.shared.global [ %r67 + 0 ], [ %rd24 + 0 ], 4, %r69;
\tcp.async.commit_group;
"""


def test_ptx_memory_ops_counts_widths():
    """cp.async copies from global memory are loads, with their byte count."""
    assert oc.ptx_memory_ops(PTX) == {"ld": {16: 3, 2: 1, 4: 1}, "st": {8: 1}}
    with pytest.raises(ValueError, match="no type width"):
        oc._width(".global")


def _row(target, cols, kernel, regs, occ, block_m, block_n, cp_async=0, dtype="fp16",
         one_tile=False, warps=4, rows=256):
    name = "softmax" if kernel == "softmax_online_kernel" else "safe_softmax"
    return {"target": target, "case": f"{name} {rows}×{cols}", "dtype": dtype, "kernel": kernel,
            "registers": regs, "spill_bytes": 0, "shared_bytes": 32, "shared_limit": 166912,
            "num_warps": warps, "num_stages": 3, "occupancy": occ, "status": "ok",
            "constexprs": {"BLOCK_M": block_m, "BLOCK_N": block_n, "ONE_TILE": one_tile,
                           "ALIGN": 8, "NUM_STAGES": 2 if cp_async else 1},
            "census": {"mma.sync": 0, "wgmma": 0, "ldmatrix": 0, "cp.async": cp_async,
                       "cp.async.bulk": 0, "ex2.approx": 130}}


def test_occupancy_inputs_and_table_from_compile_rows():
    rows = [_row("sm_90", 50000, "softmax_online_kernel", 93, 0.3125, 2, 4096),
            _row("sm_90", 50000, "softmax_safe_kernel", 53, 0.5625, 2, 4096, cp_async=4),
            _row("sm_90", 50000, "softmax_safe_kernel", 30, 1.0, 1, 1024, rows=4),
            _row("sm_90", 1000, "softmax_online_kernel", 89, 0.3125, 8, 1024),
            {"target": "tpu", "case": "softmax_pallas", "status": "ok"}]
    got = oc.occupancy_inputs(rows, "sm_90", "256×50000")     # not the 4×50000 row
    assert got["softmax_online_kernel"] == {"occupancy": 0.3125, "registers": 93,
                                            "bytes_in_flight_per_warp": 2 * 4096 * 2 / 4}
    # prefetched loads (cp.async) keep NUM_STAGES tiles in flight
    assert got["softmax_safe_kernel"]["bytes_in_flight_per_warp"] == 2 * 2 * 4096 * 2 / 4
    with pytest.raises(ValueError, match="both kernels"):
        oc.occupancy_inputs(rows, "sm_80", "256×50000")
    text = oc.table(rows)
    assert text.count("\n") == 5 and "2×4096" in text and "tpu" not in text


def test_persistent_fit_reads_the_compiled_occupancy():
    """One-tile launches only: 8 warps at 0.5 occupancy is 4 programs per SM, what the grid
    launches (64 registers per thread); at 0.375 only 3 fit."""
    rows = [_row("sm_90", 1000, "softmax_online_kernel", 48, 0.5, 4, 1024, one_tile=True,
                 warps=8),
            _row("sm_80", 1000, "softmax_safe_kernel", 80, 0.375, 4, 1024, one_tile=True,
                 warps=8),
            _row("sm_90", 50000, "softmax_online_kernel", 128, 0.25, 8, 1024)]
    fit = oc.persistent_fit(rows)
    assert [(f["resident"], f["launched"], f["ratio"]) for f in fit] == [(4, 4, 1.0),
                                                                       (3, 4, 0.75)]


def test_memory_ops_compiles_for_both_targets():
    """Compiled for real (a KC_INTERPRET=0 process): a row of 1000 fp16 values is loaded with
    16-byte copies thanks to ALIGN (cp.async prefetches, on the one-tile path), the multi-tile
    kernels load a tile per sweep, and every one-tile launch fits the persistent grid."""
    cases = ((256, 1000, "fp16"), (2048, 5000, "fp16"), (4096, 128, "fp16"), (64, 4096, "fp32"))
    ops = oc.memory_ops(cases)
    assert {(o["target"], o["kernel"], o["cols"]) for o in ops} == {
        (t, k, c) for t in ("sm_80", "sm_90") for k in oc.KERNELS for c in (1000, 5000, 128, 4096)}
    for o in ops:
        assert set(o["ld"]) == {16} and set(o["st"]) == {16}, o
    loads = {(o["target"], o["kernel"], o["cols"]): o["ld"][16] for o in ops}
    for t in ("sm_80", "sm_90"):
        one_tile = loads[t, "softmax_online_kernel", 1000]
        assert loads[t, "softmax_safe_kernel", 1000] == one_tile
        assert loads[t, "softmax_safe_kernel", 5000] * 2 == loads[t, "softmax_online_kernel",
                                                                  5000] * 3
    fit = oc.persistent_fit(ops)
    assert len(fit) == 2 * 2 * 3 and min(f["ratio"] for f in fit) >= 1, fit
