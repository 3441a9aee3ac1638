"""shared/benchmarks/quantization: the IO model against counted bytes, the crossover model."""

import pytest

from kernels.device import SM_COUNT
from kernels.quant.matmul_triton import plan
from shared import roofline
from shared.benchmarks import quantization as qb


@pytest.mark.interpreter
@pytest.mark.parametrize("fmt,group", [("int8", None), ("llm.int8", None), ("int4", 32),
                                       ("int4", 128), ("nf4", 64)])
@pytest.mark.parametrize("m", [1, 3, 130])     # gemv, decode and prefill configurations
def test_counted_bytes_equal_the_io_model(fmt, group, m):
    c = qb.counted(fmt, m, 256, 150, group, seed=m)
    assert c.bytes_total == qb.io_model(fmt, m, 256, 150, group)
    splits = plan(m, 150, 256, fmt, group, SM_COUNT[0]).splits
    assert c.launches == (1 if splits == 1 else 2)
    if m == 1:
        assert splits > 1        # the gemv splits K even here: the reduction is counted too
    if m > 16:
        assert splits == 1       # prefill never splits


def test_weight_bytes_match_the_stored_format():
    import torch

    from kernels.quant import quantize
    for fmt, group in (("int8", None), ("int4", 64), ("nf4", 64)):
        qw = quantize(torch.randn(300, 1024), fmt, group_size=group)
        assert qb.weight_bytes(fmt, 1024, 300, group) == qw.nbytes()


def test_crossover_model():
    k, n = 4096, 11008
    int4, fp16 = qb.crossover("int4", k, n, 128, "H100 SXM")
    ridge = roofline.hardware("H100 SXM").ridge("fp16")
    assert fp16 > ridge                       # x and y bytes push fp16's turn past the ridge
    assert int4 == pytest.approx(fp16 * qb.weight_bytes("int4", k, n, 128) / (2 * k * n),
                                 rel=0.05)   # ~3.8x fewer bytes: compute bound ~3.8x sooner
    s = qb.speedup_curve("int4", [1, int(fp16) + 50], k, n, 128, "H100 SXM")
    assert s[0] > 3.5 and s[1] == pytest.approx(1.0)


def test_decode_floor_is_the_larger_of_dram_and_issue_time():
    k, n = 4096, 11008
    for fmt, group in (("int8", None), ("int4", 128), ("nf4", 64)):
        for m in (1, 16):
            f = qb.decode_floor(fmt, m, k, n, group, "H200")
            assert f["config"] == ("gemv" if m == 1 else "decode") and f["splits"] > 1
            assert f["predicted us"] == max(f["DRAM us"], f["issue us"])
            # the DRAM part: the format's minimum bytes plus the partials, at 4.8 TB/s
            moved = qb.min_traffic(fmt, m, k, n, group) + 8 * f["splits"] * m * n
            assert f["DRAM us"] == pytest.approx(moved / 4.8e12 * 1e6)
    # int4 at M = 1 is issue bound on an H200: unpacking costs more than reading the bytes
    f = qb.decode_floor("int4", 1, k, n, 128, "H200")
    assert f["issue us"] > f["DRAM us"]
