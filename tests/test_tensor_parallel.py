"""Tensor parallelism on real gloo ranks: the TP Llama equals the single-process one (loss,
logits, every gradient) at p = 2 and 4, with Megatron's all-reduce count; column layers are
exact; bad input is refused; a failing rank ends the run."""

import dataclasses
import time

import pytest
import torch
from torch import nn

from shared import roofline
from shared.benchmarks import tensor_parallel as bench
from shared.check import assert_close, fresh_seed, rel_error, tolerance
from shared.models.llama import LlamaConfig
from shared.parallel.tensor import ColumnParallelLinear, RowParallelLinear, TPComm, run
from shared.parallel.tensor.model import head_split
from shared.parallel.tensor.torch_tp import TorchTP

FP32 = tolerance(torch.float32)


@pytest.fixture(scope="module")
def weights():
    return run.target_weights()


@pytest.mark.parametrize("p", [2, 3, 4])
def test_column_parallel_outputs_are_the_full_layers_columns_exactly(p):
    gen = torch.Generator().manual_seed(fresh_seed())
    lin = nn.Linear(37, 12 * p, bias=False)
    nn.init.normal_(lin.weight, generator=gen)
    x = torch.randn(3, 29, 37, generator=gen)
    full = lin(x)
    cols = []
    for r in range(p):
        col = ColumnParallelLinear(lin, TPComm(r, p), "lin")
        y = torch.full((3, 29, 12), float("nan"))  # poisoned: every element must be written
        y.copy_(col(x))
        cols.append(y)
        assert torch.equal(y, full[..., col.weight.shard.index]), f"rank {r} of {p}"
    assert torch.equal(torch.cat(cols, -1), full)


def test_bad_input_is_refused_with_the_argument_named():
    lin = nn.Linear(8, 10, bias=False)
    with pytest.raises(ValueError, match="out_features=10 must be divisible"):
        ColumnParallelLinear(lin, TPComm(0, 4), "lin")
    with pytest.raises(ValueError, match="in_features=8 must be divisible"):
        RowParallelLinear(lin, TPComm(0, 3), "lin")
    with pytest.raises(TypeError, match="nn.Linear without bias"):
        ColumnParallelLinear(nn.Linear(8, 8), TPComm(0, 2), "lin")
    with pytest.raises(ValueError, match="rank must be in"):
        TPComm(2, 2)
    with pytest.raises(ValueError, match="n_heads=6 must be divisible"):
        head_split(6, 2, TPComm(0, 4))
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        head_split(12, 3, TPComm(0, 2))
    row = RowParallelLinear(lin, TPComm(0, 2), "lin")
    with pytest.raises(ValueError, match="x must end in this rank's 4 inputs"):
        row(torch.randn(2, 8))


def test_gqa_heads_split_and_replicate():
    assert head_split(4, 2, TPComm(3, 4)) == (range(3, 4), range(1, 2))  # replicated kv head
    assert head_split(8, 4, TPComm(1, 2)) == (range(4, 8), range(2, 4))  # kv heads split


def _check(ranks, ref, p, n_layers):
    for r in ranks:
        assert abs(r["loss"] - ref["loss"]) <= FP32 * abs(ref["loss"]), (p, r["loss"])
        assert_close(r["logits"], ref["logits"], tol=FP32, what=f"p={p} logits")
    for name, full in ref["grads"].items():
        pairs = run.assemble(ranks, name, full)
        assert pairs, f"{name} is on no rank"
        for got, want in pairs:
            assert_close(got, want, tol=FP32, what=f"p={p} grad {name}")
    # Every element of every parameter is held by some rank: nothing was left out.
    for name, full in ref["grads"].items():
        seen = torch.zeros_like(full, dtype=torch.bool)
        for r in ranks:
            for shard, _ in r["grads"].values():
                if shard.name == name:
                    if shard.dim is None:
                        seen[:] = True
                    else:
                        seen.index_fill_(shard.dim, shard.index, True)
        assert seen.all(), name
    # Megatron §3: 2 all-reduces per layer forward (g after attention and MLP) and 2 backward
    # (their f's); around them the embedding's g, the loss's 3, the lm_head's f.
    for r in ranks:
        assert r["forward"].count("all_reduce") == 2 * n_layers + 1 + 3
        assert r["backward"].count("all_reduce") == 2 * n_layers + 1
        assert r["sync"].count("all_reduce") == (2 * n_layers if p > 2 else 0)  # kv replicas


def test_tp2_and_tp4_equal_the_single_process_model(weights):
    job = run.proof_job(batch=2, seq=37, seed=fresh_seed() % 1000)
    ref = run.single_process(job, weights)
    ref64 = run.single_process(job, weights, torch.float64)
    n_layers = weights["config"].n_layers
    by_p = {}
    jobs = [dataclasses.replace(job, tp=2), job,  # TP=2 twice (two groups) and TP=4, 4 ranks
            run.Timing(LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=4,
                                   ffn_dim=96, max_seq_len=32), batch=2, seq=16, slot_s=None,
                       rounds=2, tp=2),
            TorchTP(job.tokens, job.targets, tp=2, rounds=2)]
    results = run.launch(jobs, 4, weights, timeout_s=240)
    timing = results[2]
    assert len(timing) == 2 and all(len(r["times"]) == 2 for r in timing)
    # torch's own TP (DTensor) on the same model: same loss and gradients; its per-module plan
    # all-reduces each column layer's input gradient: 2 forward + 5 backward per layer.
    theirs = results[3][0]
    assert abs(theirs["loss"] - ref["loss"]) <= FP32 * abs(ref["loss"])
    for name, full in ref["grads"].items():
        assert_close(theirs["grads"][name], full, tol=FP32, what=f"torch TP grad {name}")
    assert theirs["comm_counts"] == {"all_reduce": 7 * n_layers}
    assert len(theirs["times"]["ours"]) == len(theirs["times"]["torch"]) == 2
    for p, ranks in ((2, results[0]), (4, results[1])):
        _check(ranks, ref, p, n_layers)
        by_p[p] = ranks
        # Megatron's volume: each block's 4 all-reduces move [b, s, h] fp32 each.
        fwd, bwd = ranks[0]["forward"], ranks[0]["backward"]
        block_bytes = bench.payload_bytes(fwd) + bench.payload_bytes(bwd) \
            - 2 * job.tokens.numel() * 4 * weights["config"].dim - 3 * 4 * job.tokens.numel()
        # (minus the embedding's g, the lm_head's f, the loss's 3 numbers per token)
        assert block_bytes == n_layers * bench.layer_allreduce_bytes(
            *job.tokens.shape, weights["config"].dim)
        wire = fwd.bytes("all_reduce") / bench.payload_bytes(fwd)  # ring: 2(p-1)/p
        assert abs(wire - 2 * (p - 1) / p) < 1e-3, wire
        # TP's error against float64 is fp32 rounding, like the single process's own.
        assert rel_error(ranks[0]["logits"], ref64["logits"]) < 10 * max(
            rel_error(ref["logits"], ref64["logits"]), 1e-7)
    one = run.in_process([job], weights)[0]
    assert torch.equal(one["logits"], ref["logits"]), "TP=1 is the model itself"
    # Per-rank parameter bytes: the blocks and the vocabulary split p ways, the norms not,
    # k/v rows replicated at p = 4 > n_kv_heads = 2: the formula counts each tensor.
    for p, ranks in ((1, [one]), *by_p.items()):
        for r in ranks:
            assert r["param_bytes"] == bench.param_bytes_predicted(weights["config"], p), p


def test_a_failing_rank_ends_the_run_with_its_error(weights):
    job = run.proof_job(batch=1, seq=8, seed=0, fail_rank=1)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 fails on purpose"):
        run.launch([job], 2, weights, timeout_s=120)
    assert time.monotonic() - start < 120


def test_weak_scaling_model_calibrated_at_8_way_reproduces_the_anchor_and_falls_with_p():
    assert bench.V100["peak"] == roofline.hardware("V100 SXM3").peak("fp16")  # one table
    k = bench.calibrate(bench.MEGATRON_WEAK[-1], 0.77, bench.V100)
    effs = [bench.weak_scaling_predicted(s, peak=bench.V100["peak"],
                                         fraction=bench.BASELINE_FRACTION,
                                         link_bw=bench.V100["link_bw"], comm_scale=k)["efficiency"]
            for s in bench.MEGATRON_WEAK]
    assert effs[0] == 1.0 and abs(effs[-1] - 0.77) < 1e-12
    assert all(a > b for a, b in zip(effs, effs[1:], strict=False))
    # ring all-reduce: 2(p-1) latencies, 2(p-1)/p of the bytes
    assert bench.ring_allreduce_s(8e6, 4, 1e-5, 1e9) == pytest.approx(6e-5 + 1.5 * 8e-3)
