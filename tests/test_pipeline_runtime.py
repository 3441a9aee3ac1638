"""The pipeline runtime on 4 gloo processes against single-process training, the B/W split,
and failures that must end a run (never hang)."""

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.check import assert_close, rel_error, tolerance
from shared.models.llama import Llama, LlamaConfig
from shared.parallel import launch
from shared.parallel.pipeline import make_schedule
from shared.parallel.pipeline.backward import (
    backward_input,
    backward_weight,
    held_bytes,
    split_plan,
)
from shared.parallel.pipeline.stages import layer_ranges, split_llama
from shared.parallel.pipeline.worker import Job, ModelSpec, pipeline_worker, reference

P = 4
CFG = LlamaConfig(vocab_size=256, dim=32, n_layers=8, n_heads=4, n_kv_heads=2, ffn_dim=48,
                  max_seq_len=16)
SPEC = ModelSpec(CFG, seq_len=13, seed=3)  # odd sequence length on purpose


def test_every_schedule_trains_like_one_process():
    m, b = 4, 2
    jobs = [Job("ours", "gpipe", m, microbatch_size=b, grads=True),
            Job("ours", "1f1b", m, microbatch_size=b, grads=True),
            Job("ours", "interleaved-1f1b", m, chunks=2, microbatch_size=b, grads=True),
            Job("ours", "zb-h1", m, microbatch_size=b, grads=True),
            Job("torch", "1f1b", m, microbatch_size=b, grads=True),
            Job("torch", "zb-h1", m, microbatch_size=b, grads=True)]  # torch's zero bubble
    results = launch.spawn(pipeline_worker, P, SPEC, jobs, timeout_s=300)
    ref_loss, ref_grads = reference(SPEC, m * b)
    for j, job in enumerate(jobs):
        recs = [results[r][j][0] for r in range(P)]
        (loss,) = [rec["loss"] for rec in recs if rec["loss"] is not None]
        assert loss == pytest.approx(ref_loss, rel=1e-5), job
        grads = {n: g for rec in recs for n, g in rec["grads"].items()}
        assert grads.keys() == ref_grads.keys(), job
        for n, g in grads.items():
            assert_close(g, ref_grads[n], tol=tolerance(torch.float32), what=f"{job} {n}")
        if job.runtime != "ours":
            continue
        sched = make_schedule(job.schedule, P, m, chunks=job.chunks)
        for r, rec in enumerate(recs):
            run = rec["run"]
            assert [a for a, _, _ in run.spans] == list(sched.ranks[r])  # recorded in order
            assert all(0 <= s <= e for _, s, e in run.spans)
            if job.schedule == "gpipe":  # GPipe stashes all m microbatches
                assert run.peak_stashed == m
                assert run.peak_stashed_bytes >= m * min(run.stash_bytes)
            if job.schedule == "1f1b":  # PipeDream-Flush: at most p - r
                assert run.peak_stashed == min(P - r, m)
            if job.schedule == "zb-h1":  # between B and W: saved tensors + B's captures
                assert run.peak_stashed_bytes > run.peak_stashed * max(run.stash_bytes)


def test_sends_are_released_and_the_nccl_ordering_runs_on_gloo():
    """comms.P2P drops a send once the peer is known to have posted its receive, so the send
    buffers a 1F1B (or ZB-H1) rank holds between actions do not grow with m; GPipe, which
    hears nothing back until its backwards, holds ~m (the counter does see growth).
    lookahead=0 is the order the runtime uses under NCCL (receive posted with the send, never
    ahead of it): here it runs on gloo and must give the same loss."""
    jobs = [Job("ours", sched, m, chunks=c, microbatch_size=1, lookahead=la)
            for sched, c, la in (("1f1b", 1, 0), ("1f1b", 1, 1), ("zb-h1", 1, 0),
                                 ("interleaved-1f1b", 2, 0), ("gpipe", 1, 1))
            for m in (4, 16)]
    results = launch.spawn(pipeline_worker, P, SPEC, jobs, timeout_s=300)
    ref = {m: reference(SPEC, m)[0] for m in (4, 16)}
    peaks = {}
    for j, job in enumerate(jobs):
        recs = [results[r][j][0] for r in range(P)]
        (loss,) = [rec["loss"] for rec in recs if rec["loss"] is not None]
        assert loss == pytest.approx(ref[job.num_microbatches], rel=1e-5), job
        peaks[job.schedule, job.lookahead, job.num_microbatches] = [
            rec["run"].peak_sends for rec in recs]
    for key in (("1f1b", 0), ("1f1b", 1), ("zb-h1", 0)):
        assert peaks[(*key, 16)] == peaks[(*key, 4)], (key, peaks)
        assert max(peaks[(*key, 16)]) <= P, (key, peaks)
    assert min(peaks["gpipe", 1, 16]) >= 16 - 2 > max(peaks["gpipe", 1, 4]), peaks


@settings(max_examples=4)
@given(n_stages=st.sampled_from([2, 4]), batch=st.integers(1, 3), seq=st.integers(2, 9))
def test_split_backward_matches_autograd(n_stages, batch, seq):
    """B on every stage (last to first), then every W: the same input and weight gradients
    as one backward through the whole model (float64), and B alone touches no weight."""
    torch.manual_seed(n_stages * 100 + batch * 10 + seq)
    model = Llama(LlamaConfig(vocab_size=64, dim=16, n_layers=4, n_heads=2, n_kv_heads=1,
                              ffn_dim=24, max_seq_len=16)).double()
    tokens, targets = torch.randint(0, 64, (2, batch, seq))
    loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
    params = list(model.parameters())
    ref = torch.autograd.grad(loss, params)
    stages, x, inputs, outputs = split_llama(model, n_stages), tokens, [], []
    for i, stage in enumerate(stages):  # forward, cutting the graph between stages
        x = x.detach().requires_grad_() if i else x
        inp, x = stage.run(x)
        inputs.append(inp)
        outputs.append(x)
    outputs[-1] = F.cross_entropy(x.flatten(0, 1), targets.flatten())
    g, jobs = None, []
    for stage, inp, out in reversed(list(zip(stages, inputs, outputs, strict=True))):
        if inp.is_leaf:
            ref_in = torch.autograd.grad(out, inp, g, retain_graph=True)[0]
        job = split_plan(out, inp, list(stage.parameters()))
        g = backward_input(job, g)
        assert held_bytes(job) > 0  # B captured what W needs
        if inp.is_leaf:  # a stage input has no weights: its gradient is sent, not held for W
            assert job.inp_edge.node not in job.captured
        if inp.is_leaf:
            assert rel_error(g, ref_in) < 1e-12
        jobs.append(job)
    assert all(p.grad is None for p in params)  # B computed no weight gradient
    for job in jobs:
        backward_weight(job)
    for p, r in zip(params, ref, strict=True):
        assert rel_error(p.grad, r) < 1e-12


def test_split_backward_rejects_tied_weights():
    lin = torch.nn.Linear(4, 4, bias=False)
    x = torch.randn(2, 4, requires_grad=True)
    out = lin(lin(x)).sum()
    with pytest.raises(ValueError, match="tied weights"):
        split_plan(out, x, [lin.weight])


def test_stage_cut_errors():
    with pytest.raises(ValueError, match="cannot cut 3 layers into 4 stages"):
        layer_ranges(3, 4)
    assert layer_ranges(7, 3) == [(0, 3), (3, 5), (5, 7)]


def test_torchrun_launch_gives_the_reference_loss():
    """The torchrun way: python -m torch.distributed.run --standalone --nproc-per-node=4."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
           "-m", "shared.parallel.pipeline.worker", "--schedule", "zb-h1", "--microbatches", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", KC_DIST_TIMEOUT="60")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]
    (loss,) = map(float, re.findall(r"zb-h1 loss ([0-9.]+)", out.stdout))
    from shared.parallel.pipeline.worker import DEFAULT_SPEC
    ref_loss, _ = reference(DEFAULT_SPEC, 4 * 2)
    assert loss == pytest.approx(ref_loss, rel=1e-5)


def test_emulated_slots_pin_durations_and_change_nothing_else():
    """A stage with slots computes the same values and gradients, and its forward and backward
    last at least their slots (sleep_until never returns early)."""
    import time

    from shared.parallel.pipeline.stages import Slots
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2, n_kv_heads=1,
                              ffn_dim=24, max_seq_len=8))
    plain = split_llama(model, 2)[1]
    timed = split_llama(model, 2, slots=Slots(f=0.03, b=0.02, w=0.01))[1]
    x = torch.randn(2, 5, 16, requires_grad=True)
    ref = plain(x)
    g_ref = torch.autograd.grad(ref.sum(), x)[0]
    t0 = time.perf_counter()
    out = timed(x)
    assert time.perf_counter() - t0 >= 0.03
    t0 = time.perf_counter()
    g = torch.autograd.grad(out.sum(), x)[0]
    assert time.perf_counter() - t0 >= 0.03  # b + w
    assert torch.equal(out, ref) and torch.equal(g, g_ref)
