"""The plumbing: check, roofline, device, plot (bench and claims: test_bench, test_claims)."""

import math

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from kernels.device import POISON, new_output
from shared import check, device, plot, roofline


def test_rel_error_basics():
    ref = torch.tensor([3.0, 4.0])
    assert check.rel_error(ref, ref) == 0.0
    assert check.rel_error(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert check.rel_error(jnp.array([3.0, 4.0]), np.array([3.0, 4.0])) == 0.0
    assert check.rel_error(torch.tensor([float("nan"), 4.0]), ref) == math.inf
    inf = torch.tensor([float("-inf"), 1.0])
    assert check.rel_error(inf, inf) == 0.0        # the same infinity counts as equal
    with pytest.raises(ValueError, match="shape"):
        check.rel_error(torch.ones(2), torch.ones(3))


def test_tolerance_and_assert_close():
    assert check.tolerance(torch.float16) == check.tolerance(jnp.float16) == \
        check.tolerance("float16")
    assert check.tolerance(torch.float32) < check.tolerance(torch.float16)
    with pytest.raises(ValueError, match="dtype must be one of"):
        check.tolerance(torch.int32)
    x = torch.randn(100)
    assert check.assert_close(x, x.double()) < 1e-6
    with pytest.raises(AssertionError, match="relative error"):
        check.assert_close(x + 1, x.double(), what="y")


def test_poisoned_outputs():
    assert POISON  # tests run with KC_POISON=1
    assert torch.isnan(new_output((3, 4), torch.float32, "cpu")).all()
    assert (new_output((5,), torch.int32, "cpu") == torch.iinfo(torch.int32).max).all()


def test_seeds(monkeypatch):
    seeds = {check.fresh_seed() for _ in range(5)}
    assert len(seeds) > 1 and all(isinstance(s, int) for s in seeds)
    monkeypatch.setenv("KC_SEED", "123")   # replay a failing seed
    assert check.fresh_seed() == 123
    check.seed_everything(7)
    a = torch.rand(3)
    check.seed_everything(7)
    assert torch.equal(a, torch.rand(3))


def test_roofline_predict():
    h100 = roofline.HARDWARE["H100 SXM"]
    p = roofline.predict(1e12, 1e9, h100, "fp16")   # intensity 1000 > ridge ≈ 295: compute
    assert p.bound == "compute" and p.time_s == pytest.approx(1e12 / 989.4e12)
    q = roofline.predict(1e9, 1e10, "A100 80GB", "fp16")
    assert q.bound == "memory" and q.time_s == pytest.approx(1e10 / 2.039e12)
    assert q.flops_per_s == pytest.approx(1e9 / q.time_s)
    with pytest.raises(ValueError, match="dtype"):
        roofline.predict(1, 1, "TPU v5e", "fp64")
    fig, ax = plt.subplots()
    roofline.plot_roofline(ax, ["H100 SXM", "A100 80GB"], [("k", 1e9, 1e8)])
    plt.close(fig)


def test_this_cpu_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("KC_BUILD", str(tmp_path))
    cpu = roofline.this_cpu()
    assert cpu.peak("fp32") > 1e8 and cpu.mem_bw > 1e8
    assert roofline.this_cpu() == cpu  # cached
    assert roofline.predict(1e9, 1e9, "this CPU", "fp32").hardware == "this CPU"
    with pytest.raises(ValueError, match="hw must be one of"):
        roofline.hardware("B200")


def test_scale(monkeypatch):
    monkeypatch.setenv("KC_SCALE", "full")
    assert device.scale() == "full" and device.pick(ci=1, full=2) == 2
    monkeypatch.setenv("KC_SCALE", "huge")
    with pytest.raises(ValueError, match="KC_SCALE"):
        device.scale()
    monkeypatch.delenv("KC_SCALE")
    assert device.scale() == ("full" if device.gpu_available() else "ci")


def test_savefig(tmp_path, monkeypatch):
    monkeypatch.setenv("KC_BUILD", str(tmp_path))
    fig, ax = plt.subplots()
    ax.plot([1, 2])
    path = plot.savefig(fig, "demo", "line")
    plt.close(fig)
    assert path == tmp_path / "demo" / "line.png" and path.stat().st_size > 1000
