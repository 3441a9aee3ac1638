"""A failing or hung rank ends a pipeline run with its error: never a hang.
(Kept apart, with light imports: spawned ranks import this module to find their function.)"""

import time

import pytest
import torch
import torch.distributed as dist

from shared.models.llama import LlamaConfig
from shared.parallel import launch
from shared.parallel.pipeline import make_schedule
from shared.parallel.pipeline.comms import P2P
from shared.parallel.pipeline.worker import Job, ModelSpec, pipeline_worker

SPEC = ModelSpec(LlamaConfig(vocab_size=256, dim=32, n_layers=4, n_heads=4, n_kv_heads=2,
                             ffn_dim=48, max_seq_len=16), seq_len=8)


def test_a_failing_rank_ends_the_run_with_its_error():
    start = time.monotonic()
    job = Job("ours", "1f1b", 4, fail_at=3)  # rank 1 raises at its 4th action
    with pytest.raises(RuntimeError, match=r"rank 1 failed first(.|\n)*unknown action"):
        launch.spawn(pipeline_worker, 4, SPEC, [job], timeout_s=120)
    assert time.monotonic() - start < 100  # ended by the failure, not by the deadline


def _wait_for_silent_peer():
    """GPipe on 2 ranks, 1 microbatch: rank 0 runs F, sends, then waits in BW for the gradient
    rank 1 never sends (rank 1 hangs)."""
    if dist.get_rank() == 1:
        time.sleep(600)
    comm = P2P(make_schedule("gpipe", 2, 1), 0, torch.zeros(3), timeout_s=2.0)
    comm.start()
    comm.finish(0, torch.ones(3))  # F(0)'s activation, and BW(0)'s receive posted
    comm.recv(1)


def test_a_hung_rank_times_out_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 0 failed first(.|\n)*(Timed out|TimeoutError)"):
        launch.spawn(_wait_for_silent_peer, 2, timeout_s=120)
    assert time.monotonic() - start < 100


def test_spawn_rejects_bad_nprocs():
    with pytest.raises(ValueError, match="nprocs"):
        launch.spawn(pipeline_worker, 0, SPEC, [])
