"""The kernels are true on the hardware: every Triton kernel compiles for sm_80 and sm_90 at its
launchers' configs (shared memory within the limit, no spills in the main configs) and every
Pallas kernel lowers for TPU; and the checks behind that verdict can fail.

Compiling needs the interpreter off before `import kernels`, so it runs in fresh processes
(KC_INTERPRET=0); this pytest process stays in interpret mode."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.compile_report import compile_env

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(compile_env(), JAX_PLATFORMS="cpu")


def _python(code: str) -> dict:
    run = subprocess.run([sys.executable, "-c", code], env=ENV, cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report():
    """`kclub compile --json` over every target: the same command CI and users run."""
    run = subprocess.run([sys.executable, "-m", "shared.cli", "compile", "--json"], env=ENV,
                         cwd=ROOT, capture_output=True, text=True, timeout=1500)
    data = json.loads(run.stdout)
    return run.returncode, data


def _triton_kernels() -> set[str]:
    """Every @triton.jit function in kernels/ whose name says it is launched (…_kernel)."""
    names = set()
    for path in (ROOT / "kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list):
                names.add(node.name)
    return names


def test_every_kernel_compiles_fits_and_lowers(report):
    code, data = report
    bad = [r for r in data["rows"] if r["status"] != "ok"]
    assert code == 0 and not bad, "\n".join(
        f"{r['target']} {r['case']} {r['kernel']}: {r['status']}" for r in bad)
    for target in ("sm_80", "sm_90"):
        compiled = {r["kernel"] for r in data["rows"] if r["target"] == target}
        missing = _triton_kernels() - compiled
        assert not missing, f"kernels no compile case reaches on {target}: {sorted(missing)}"
    assert any(r["target"] == "tpu" for r in data["rows"])


def test_attention_forward_never_spills_and_uses_the_tensor_cores(report):
    _, data = report
    fwd = [r for r in data["rows"] if r["kernel"] == "flash_fwd_kernel" and r["dtype"] != "fp32"]
    assert {r["target"] for r in fwd} == {"sm_80", "sm_90"}
    for r in fwd:
        assert r["spill_bytes"] == 0, r
        if r["target"] == "sm_80":  # Ampere: mma.sync fed by cp.async (software pipelined)
            assert r["census"]["mma.sync"] > 0 and r["census"]["cp.async"] > 0, r
            assert r["census"]["wgmma"] == 0, r
        else:                       # Hopper: warpgroup MMAs
            assert r["census"]["wgmma"] > 0, r


# A kernel compiled at configs chosen to break: the checks must see it (so they can fail).
_BROKEN = """
import json, torch
import kernels
from kernels.device import compile_only
from kernels.attention.triton_bwd import flash_bwd_dkdv_kernel
q = torch.full((1, 1, 256, 128), float("nan"), dtype=torch.float16)
lse = torch.zeros(1, 1, 256)
out = {}
for name, (bm, bn, warps) in {"spills": (64, 64, 4), "too_big": (128, 128, 8)}.items():
    with compile_only("sm_80") as c:
        flash_bwd_dkdv_kernel[(1,)](q, q, q, q, lse, lse, q, q, 1, 256, 256, 128, 0.1,
                                    CAUSAL=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=128,
                                    num_warps=warps, num_stages=3)
    k = c[0]
    out[name] = dict(spill=k.spill_bytes, fits=k.fits, shared=k.shared_bytes, regs=k.registers)
out["untouched"] = bool(torch.isnan(q).all())   # compiled, never launched
print(json.dumps(out))
"""


def test_spills_and_shared_memory_overflow_are_detected():
    out = _python(_BROKEN)
    assert out["spills"]["spill"] > 0 and out["spills"]["regs"] == 255, out
    assert not out["too_big"]["fits"] and out["too_big"]["shared"] > 163 * 1024, out
    assert out["untouched"]


def test_launchers_choose_per_target_configs():
    code = """
import json, torch
import kernels
from kernels.device import compile_only
from kernels.softmax import softmax
from kernels.attention import flash_attention
from kernels.attention.configs import default_blocks
q = torch.randn(1, 2, 300, 128, dtype=torch.float16)
seen = {}
for t in ("sm_80", "sm_90"):
    with compile_only(t) as c:
        flash_attention(q, q, q)
        softmax(torch.randn(3, 5000))
        want = default_blocks("forward", 128, 2)
    got = {k.name: k for k in c}["flash_fwd_kernel"]
    seen[t] = dict(got=[got.constexprs["BLOCK_M"], got.constexprs["BLOCK_N"], got.num_warps,
                        got.num_stages, got.target],
                   want=[want.block_m, want.block_n, want.num_warps, want.num_stages, t],
                   names=sorted(k.name for k in c))
print(json.dumps(seen))
"""
    seen = _python(code)
    for t in ("sm_80", "sm_90"):
        assert seen[t]["got"] == seen[t]["want"], seen[t]
        assert "softmax_online_kernel" in seen[t]["names"]
    assert seen["sm_80"]["got"] != seen["sm_90"]["got"]   # the table differs at head_dim 128


def test_compile_only_refuses_the_interpreter():
    from kernels.device import INTERPRET, compile_only

    assert INTERPRET  # this process: the CPU test suite
    with pytest.raises(RuntimeError, match="KC_INTERPRET=0"), compile_only("sm_90"):
        pass
    with pytest.raises(ValueError, match="target must be one of"), compile_only("sm_75"):
        pass


def test_occupancy_follows_registers_and_shared_memory():
    from kernels.compile_only import TARGETS, occupancy

    h100 = TARGETS["sm_90"]
    assert occupancy(h100, 32, 4, 0) == 1.0            # 16 blocks × 4 warps = 64 warps
    assert occupancy(h100, 255, 4, 0) == 0.125         # 64K regs / (256·32) = 8 warps
    assert occupancy(h100, 64, 8, 200 * 1024) == 0.125  # shared memory: one block per SM


def test_a_lab_gets_its_families_compiled_from_interpret_mode():
    from shared.compile_report import compiled

    rows = compiled("sampling", "sm_90")
    assert {r["kernel"] for r in rows} == {"gumbel_sample_kernel", "speculative_accept_kernel"}
    assert all(r["status"] == "ok" and r["target"] == "sm_90" for r in rows)


def test_census_counts_instructions_not_mentions():
    from kernels.compile_only import census

    ptx = """
    // cp.async in a comment is not an instruction
    cp.async.cg.shared.global [%r1], [%rd1], 16;
    cp.async.bulk.tensor.2d.shared::cluster.global [%r2], [%rd2];
    @%p1 ld.global.v4.b32 {%r3, %r4, %r5, %r6}, [%rd3];
    ld.global.b16 %rs1, [%rd4];
    wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%f1}, %rd5, %rd6;
    ex2.approx.ftz.f32 %f2, %f3;
    """
    c = census(ptx)
    assert c["cp.async"] == 1 and c["cp.async.bulk"] == 1 and c["ld.global.v4"] == 1
    assert c["wgmma"] == 1 and c["mma.sync"] == 0 and c["ex2.approx"] == 1
