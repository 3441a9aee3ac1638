"""iocount against kernels whose traffic is known by hand."""

import pytest
import torch
import triton
import triton.language as tl

from shared import iocount


@triton.jit
def masked_copy(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)


@triton.jit
def tile_matmul(a, b, c, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    x = tl.load(a + m[:, None] * K + k[None, :])
    y = tl.load(b + k[:, None] * N + n[None, :])
    tl.store(c + m[:, None] * N + n[None, :], tl.dot(x, y))


@triton.jit
def atomic_hist(idx, hist, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    i = tl.load(idx + offs, mask=offs < n)
    tl.atomic_add(hist + i, 1, mask=offs < n)


@pytest.mark.parametrize("n,dtype", [(1000, torch.float32), (37, torch.float16),
                                     (4096, torch.int8)])
def test_masked_copy_counts_only_active_lanes(n, dtype):
    src = torch.arange(n).to(dtype)
    dst = torch.empty_like(src)
    block = 256
    with iocount.count() as c:
        masked_copy[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block)
    assert torch.equal(dst, src)
    assert c.bytes_loaded == c.bytes_stored == n * src.element_size()
    assert c.launches == 1 and c.programs == triton.cdiv(n, block)
    assert c.by_kernel["masked_copy"].bytes_total == c.bytes_total
    assert c.dot_flops == 0


def test_dot_flops_and_nesting():
    M, N, K = 16, 32, 64
    a, b = torch.randn(M, K), torch.randn(K, N)
    out = torch.empty(M, N)
    with iocount.count() as outer:
        with iocount.count() as inner:
            tile_matmul[(1,)](a, b, out, M=M, N=N, K=K)
        tile_matmul[(1,)](a, b, out, M=M, N=N, K=K)
    torch.testing.assert_close(out, a @ b)
    assert inner.dot_flops == 2 * M * N * K
    assert inner.bytes_loaded == (M * K + K * N) * 4 and inner.bytes_stored == M * N * 4
    assert outer.dot_flops == 2 * inner.dot_flops and outer.launches == 2


def test_atomics_read_and_write():
    n = 300
    idx = torch.randint(0, 10, (n,), dtype=torch.int32)
    hist = torch.zeros(10, dtype=torch.int32)
    with iocount.count() as c:
        atomic_hist[(2,)](idx, hist, n, BLOCK=256)
    assert torch.equal(hist, torch.bincount(idx, minlength=10).int())
    assert c.bytes_loaded == n * 4 + n * 4  # the indices, then each atomic's read
    assert c.bytes_stored == n * 4


def test_nothing_counted_outside():
    src = torch.ones(64)
    dst = torch.empty_like(src)
    with iocount.count() as c:
        pass
    masked_copy[(1,)](src, dst, 64, BLOCK=64)
    assert c.bytes_total == 0 and c.launches == 0
