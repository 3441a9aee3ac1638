"""Softmax kernels against the float64 reference: odd shapes, multi-tile rows, multi-row tiles
and persistent grids, extremes; the tiling heuristic; Pallas and XLA variants."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kernels.softmax import (
    safe_softmax,
    softmax,
    softmax_pallas,
    softmax_reference,
    softmax_xla_online,
    softmax_xla_safe,
)
from kernels.softmax import tiling as tilings
from kernels.softmax.tiling import Tiling
from shared import iocount
from shared.check import assert_close, fresh_seed, kernel_device, kernel_dtypes

TRITON = [softmax, safe_softmax]
DTYPES = kernel_dtypes(kernel_device())   # bf16 only on CUDA (see shared.check)


def _inputs(shape, dtype, seed, scale=3.0, device="cpu"):
    """Random inputs on `device` (the Triton tests pass theirs; JAX takes host arrays)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)


@pytest.mark.parametrize("fn", TRITON, ids=lambda f: f.__name__)
@pytest.mark.parametrize("shape,dim,block", [
    ((37, 1000), -1, 128),   # 8 tiles per row, last one ragged; 37 rows, not a power of two
    ((5, 3, 77), 1, 16),     # softmax over a middle dim
    ((300,), 0, 16),         # one long vector
    ((3, 4100), -1, None),   # default block: two tiles of 4096
    ((19, 50), -1, None),    # the row fits one tile: read once
    ((9, 1000), -1, None),   # one tile, rows a multiple of 8 (ALIGN 8: vector loads on a GPU)
    ((9, 1000), -1, 128),    # the same, swept in tiles
    ((9, 1001), -1, None),   # odd rows: ALIGN 1
])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_matches_reference(fn, shape, dim, block, dtype, device):
    seed = fresh_seed()
    x = _inputs(shape, dtype, seed, device=device)
    out = fn(x, dim, block_size=block)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, softmax_reference(x.double(), dim), what=f"{fn.__name__} seed={seed}")


# Launches the heuristic makes on a GPU, at sizes the interpreter runs: row blocks that straddle
# the last row, and fewer programs than row blocks, so programs walk several (the persistent loop).
TILINGS = [
    ((37, 100), Tiling(8, 128, 4, 3, 3)),     # one tile per row, 5 blocks (last: 5 rows) on 3
    ((19, 50), Tiling(16, 64, 2, 3, 1)),      # one program walks both blocks, the second 3 rows
    ((37, 1000), Tiling(8, 128, 4, 1, 2)),    # rows swept in 8 tiles, 5 blocks on 2 programs
    ((3, 4100), Tiling(8, 1024, 4, 1, 1)),    # the long-row launch: 8 rows per block, 3 there
    ((9, 1001), Tiling(4, 1024, 8, 3, 2)),    # odd row length (no vector loads), 3 blocks on 2
]


@pytest.mark.parametrize("fn", TRITON, ids=lambda f: f.__name__)
@pytest.mark.parametrize("shape,tiling", TILINGS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tilings_match_reference(fn, shape, tiling, dtype, device):
    seed = fresh_seed()
    x = _inputs(shape, dtype, seed, device=device)
    out = fn(x, tiling=tiling)
    assert_close(out, softmax_reference(x.double()), what=f"{fn.__name__} {tiling} seed={seed}")


@pytest.mark.parametrize("shape", [(301, 77), (130, 1000), (67, 4096), (23, 2049)])
def test_heuristic_on_a_small_gpu(shape, device):
    """The heuristic's own short-row launch, as it would be on a GPU of 2 SMs: persistent
    programs that walk several blocks, ragged last blocks; online and safe alike."""
    seed = fresh_seed()
    x = _inputs(shape, torch.float32, seed, device=device)
    t = tilings.choose(*shape, 4, None, sms=2)
    assert t.programs < -(-shape[0] // t.block_m), t      # some program walks several blocks
    ref = softmax_reference(x.double())
    for fn in TRITON:
        assert_close(fn(x, tiling=t), ref, what=f"{fn.__name__} {t} seed={seed}")


def test_one_tile_path_is_shared(device):
    """Rows that fit one tile: online and safe run the same code, so the same bits."""
    x = _inputs((45, 700), torch.float32, fresh_seed(), device=device)
    for t in (None, Tiling(16, 1024, 4, 3, 2)):
        assert torch.equal(softmax(x, tiling=t), safe_softmax(x, tiling=t))


@pytest.mark.parametrize("rows,cols,size,want", [
    # short rows: ~8 KB tiles, 32 bytes per thread, a persistent grid of 4 (8 warps) or 2
    # (16 warps) programs per SM, 3 tiles in flight
    (4096, 1024, 2, Tiling(4, 1024, 8, 3, 528)),
    (4096, 1024, 4, Tiling(2, 1024, 8, 3, 528)),
    (4096, 4096, 2, Tiling(1, 4096, 8, 3, 528)),
    (4096, 4096, 4, Tiling(1, 4096, 16, 3, 264)),     # a 16 KB row is one tile
    (100_000, 128, 2, Tiling(32, 128, 8, 3, 528)),
    (4096, 128, 2, Tiling(16, 128, 4, 3, 256)),       # 32 rows a block would leave SMs idle
    (256, 1000, 2, Tiling(1, 1024, 2, 3, 256)),       # one row per program
    # long rows: the measured [8, 1024] on 4 warps, one block per program, no prefetch
    (4096, 4097, 2, Tiling(8, 1024, 4, 1, 512)),
    (4096, 65_536, 2, Tiling(8, 1024, 4, 1, 512)),
    (4, 128_256, 4, Tiling(1, 1024, 4, 1, 4)),        # a decode step: 4 programs, not 1
])
def test_heuristic_choices(rows, cols, size, want):
    """What kernels/softmax/tiling.py promises, on an H200's 132 SMs."""
    got = tilings.choose(rows, cols, size, None, sms=132)
    assert got == want
    if cols <= got.block_n:   # one tile: every thread holds 32 bytes of it, and what is
        #                       launched fits on the GPU at once at the register budget
        assert got.block_m * got.block_n * size == 32 * got.num_warps * tilings.BYTES_PER_THREAD
        per_sm = tilings.programs_per_sm(got.num_warps)
        assert got.programs <= 132 * per_sm
        assert per_sm * got.num_warps * 32 * tilings.REGISTER_BUDGET <= 65536


def test_block_size_sets_the_width():
    assert tilings.choose(64, 1000, 2, 128, sms=132).block_n == 128     # swept in tiles of 128
    assert tilings.choose(64, 1000, 2, 2048, sms=132).block_n == 2048   # one (padded) tile
    with pytest.raises(ValueError, match="block_size"):
        tilings.choose(64, 1000, 2, 100, sms=132)


@pytest.mark.parametrize("fn", TRITON, ids=lambda f: f.__name__)
def test_extreme_values(fn, device):
    x = _inputs((6, 300), torch.float32, fresh_seed(), device=device)
    x[0] = float("-inf")                 # no defined softmax: NaN, as torch
    x[1, :200] = float("-inf")           # the first tiles are all −inf: no NaN may leak
    x[2] *= 1e4                          # exp would overflow without the max
    x[3, 5] = 1e30
    x[4] -= 1e6
    ref = softmax_reference(x.double())
    out = fn(x, block_size=64)
    assert torch.isnan(out[0]).all()
    assert_close(out[1:], ref[1:], what=fn.__name__)
    assert torch.allclose(out[1:].double().sum(-1), torch.ones(5, dtype=torch.float64,
                                                               device=device))


@given(rows=st.integers(1, 40), cols=st.integers(1, 700), block=st.sampled_from([16, 64, 256]),
       scale=st.floats(0.01, 100.0), seed=st.integers(0, 2**31))
def test_online_property(rows, cols, block, scale, seed, device):
    x = _inputs((rows, cols), torch.float32, seed, scale, device)
    y = softmax(x, block_size=block)
    assert_close(y, softmax_reference(x.double()))
    # softmax is invariant to adding a constant to the row
    assert_close(softmax(x + 17.5, block_size=block), y.double(), tol=1e-5)


def _pallas_target(target, monkeypatch, request):
    """Lay the Pallas kernel out for `target`; the TPU layout through conftest's
    tpu_interpret_on_cpu (interpret mode on JAX's CPU device on a GPU host, where the Triton
    lowering cannot take it)."""
    if target == "tpu":
        request.getfixturevalue("tpu_interpret_on_cpu")
    monkeypatch.setenv("KC_PALLAS_TARGET", target)


@pytest.mark.parametrize("shape,axis,block", [((37, 1000), -1, 128), ((5, 3, 77), 1, None),
                                              ((3, 2100), -1, 1024)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16], ids=str)
@pytest.mark.parametrize("target", ["tpu", "gpu"])
def test_pallas_matches_reference(shape, axis, block, dtype, target, monkeypatch, request):
    # target: the TPU variant (column grid axis "arbitrary") or the GPU one (stats loop over the
    # columns in the kernel body, masked loads/stores), both in interpret mode on a CPU host; on
    # a GPU host the GPU one is compiled and the TPU one interpreted on JAX's CPU device
    _pallas_target(target, monkeypatch, request)
    seed = fresh_seed()
    x = _inputs(shape, torch.float64, seed)
    out = softmax_pallas(jnp.asarray(x.numpy(), dtype=dtype), axis, block_size=block)
    assert out.dtype == dtype
    ref = softmax_reference(torch.from_numpy(np.asarray(jnp.asarray(x.numpy(), dtype=dtype),
                                                        dtype=np.float64)), axis)
    assert_close(out, ref, dtype=dtype, what=f"pallas seed={seed}")


@pytest.mark.parametrize("target", ["tpu", "gpu"])
def test_pallas_extremes(target, monkeypatch, request):
    _pallas_target(target, monkeypatch, request)
    x = _inputs((9, 300), torch.float32, fresh_seed())
    x[1, :200] = float("-inf")
    x[2] *= 1e4
    out = softmax_pallas(jnp.asarray(x.numpy()), block_size=128)
    assert_close(out, softmax_reference(x.double()))


def test_gradient(device):
    x = _inputs((7, 130), torch.float64, fresh_seed(), device=device).float().requires_grad_()
    dy = torch.randn(7, 130, device=device)
    softmax(x, block_size=32).backward(dy)
    xr = x.detach().double().requires_grad_()
    softmax_reference(xr).backward(dy.double())
    assert_close(x.grad, xr.grad)


@pytest.mark.interpreter
def test_memory_accesses_per_element(device):
    """The paper's claim, counted: safe 4 accesses per element, online 3; a row that fits one
    tile is read once by both (the same register-resident path), so 2 and 2."""
    rows, cols = 8, 1000
    x = _inputs((rows, cols), torch.float32, fresh_seed(), device=device)
    per_element = {}
    for name, fn, block in [("safe", safe_softmax, 128), ("online", softmax, 128),
                            ("safe, one tile", safe_softmax, 1024),
                            ("online, one tile", softmax, 1024)]:
        with iocount.count() as c:
            fn(x, block_size=block)
        per_element[name] = c.bytes_total / (rows * cols * 4)
        assert c.bytes_stored == rows * cols * 4
    assert per_element == {"safe": 4.0, "online": 3.0, "safe, one tile": 2.0,
                           "online, one tile": 2.0}


@pytest.mark.parametrize("size,lengths,align", [
    (2, (1000, 1000, 1000), 8),   # fp16: 8 elements = one 16-byte vector
    (4, (1000, 1000, 1000), 4),   # fp32: 4 elements
    (2, (1004, 1004, 1004), 4),   # 1004 = 4 · 251
    (2, (1000, 1001, 1000), 1),   # one odd stride is enough to forbid vectors
    (2, (16, 16, 16), 8),         # never more than one vector
])
def test_alignment_promise(size, lengths, align):
    from kernels.softmax.triton import _alignment

    assert _alignment(size, *lengths) == align


DEV = kernel_device()


@pytest.mark.parametrize("bad,err,match", [
    (lambda: softmax([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    (lambda: softmax(torch.tensor(1.0, device=DEV)), ValueError, "at least 1 dimension"),
    (lambda: softmax(torch.empty(3, 0, device=DEV)), ValueError, "x is empty"),
    (lambda: softmax(torch.ones(3, dtype=torch.int32, device=DEV)), TypeError,
     "x must have dtype"),
    (lambda: softmax(torch.ones(3, 4, device=DEV), dim=2), ValueError, "dim=2 is out of range"),
    (lambda: softmax(torch.ones(3, 4, device=DEV), block_size=24), ValueError, "block_size"),
    (lambda: softmax(torch.ones(3, 4, device=DEV), tiling=(8, 16)), TypeError, "tiling must"),
    (lambda: safe_softmax(torch.ones(3, 4, device=DEV), tiling=Tiling(3, 16, 1, 1, 1)),
     ValueError, "tiling.block_m"),
    (lambda: softmax(torch.ones(3, 4, device=DEV), tiling=Tiling(4, 16, 1, 1, 0)), ValueError,
     "tiling.programs"),
    (lambda: softmax(torch.ones(3, 4, device=DEV), block_size=16, tiling=Tiling(4, 16, 1, 1, 1)),
     ValueError, "block_size or tiling"),
    (lambda: softmax_pallas(np.ones(3)), TypeError, "x must be a jax.Array"),
    (lambda: softmax_pallas(jnp.ones((3,), jnp.int32)), TypeError, "dtype"),
    (lambda: softmax_pallas(jnp.ones((3, 4)), axis=-3), ValueError, "axis=-3"),
    (lambda: softmax_pallas(jnp.ones((3, 0))), ValueError, "empty"),
    (lambda: softmax_pallas(jnp.ones((3, 4)), block_size=64), ValueError, "block_size"),
])
def test_bad_input(bad, err, match):
    with pytest.raises(err, match=match):
        bad()


@pytest.mark.parametrize("fn", TRITON, ids=lambda f: f.__name__)
def test_bf16_runs_only_where_it_is_computed_right(fn, device):
    """The interpreter computes bf16 on the raw bits: refused there; computed on a GPU."""
    x = _inputs((4, 50), torch.bfloat16, fresh_seed(), device=device)
    if torch.bfloat16 in DTYPES:
        assert_close(fn(x), softmax_reference(x.double()), what=f"{fn.__name__} bf16")
    else:
        with pytest.raises(TypeError, match="bfloat16"):
            fn(x)


@pytest.mark.parametrize("fn", [softmax_xla_online, softmax_xla_safe], ids=lambda f: f.__name__)
def test_xla_versions(fn):
    x = _inputs((13, 517), torch.float32, fresh_seed())
    x[1, :300] = float("-inf")
    x[2] *= 1e4
    assert_close(fn(jnp.asarray(x.numpy())), softmax_reference(x.double()))


def test_compiled_fusions_lists_the_reductions():
    """XLA:CPU's fusions, on any host: compiled_fusions pins the CPU device (on a GPU host XLA:GPU
    would compile and name them otherwise); safe's max reduction is a fusion of its own, the
    online ⊕-reduce a generated loop."""
    from shared.benchmarks.online_softmax import compiled_fusions

    safe = compiled_fusions(softmax_xla_safe, 64, 256)
    online = compiled_fusions(softmax_xla_online, 64, 256)
    assert any("reduce_max" in line for line in safe)
    assert any("reduce" in line and "kLoop" in line for line in online)
