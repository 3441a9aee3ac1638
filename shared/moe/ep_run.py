"""Run the expert-parallel layer on W gloo ranks the torchrun way, and check it against one process.

    python -m torch.distributed.run --standalone --nproc-per-node=4 -m shared.moe.ep_run ...

`--standalone` starts the rendezvous on a free port picked at run time. Every rank builds the same
layer and the same global batch from the seed, runs its token shard through ExpertParallelMoE,
backpropagates a fixed upstream gradient, all-reduces the router gradients and saves what it got.
`launch()` (the parent side) starts torchrun with a timeout and turns a failed rank into an
exception carrying that rank's error; `single_process()` computes the same numbers in one process.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from shared.moe.layer import MoELayer
from shared.moe.routers import TopKRouter
from shared.paths import ROOT


@dataclass(frozen=True)
class EPConfig:
    experts: int = 8
    k: int = 2
    dim: int = 32
    ffn: int = 48
    tokens: int = 24        # per rank
    seed: int = 0
    fail_rank: int = -1     # a rank that raises on purpose (to prove failures end the run)
    timeout: float = 60.0   # seconds for every collective

    def argv(self) -> list[str]:
        return [f"--{k.replace('_', '-')}={v}" for k, v in asdict(self).items()]


def build_layer(cfg: EPConfig) -> MoELayer:
    """The full single-process layer, identical on every rank (seeded)."""
    torch.manual_seed(cfg.seed)
    return MoELayer(cfg.dim, cfg.ffn, TopKRouter(cfg.dim, cfg.experts, cfg.k), init_std=0.2)


def make_batch(cfg: EPConfig, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, dy) for all world · tokens tokens: rank r owns rows [r·tokens, (r+1)·tokens)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(world * cfg.tokens, cfg.dim, generator=gen)
    dy = torch.randn(world * cfg.tokens, cfg.dim, generator=gen)
    return x, dy


def single_process(cfg: EPConfig, world: int) -> dict[str, torch.Tensor]:
    """The reference: the whole batch through one MoELayer, same upstream gradient."""
    layer = build_layer(cfg)
    x, dy = make_batch(cfg, world)
    x.requires_grad_(True)
    (layer(x) * dy).sum().backward()
    return {"y": layer(x).detach(), "dx": x.grad, "router": layer.router.weight.grad,
            "w_gate_up": layer.w_gate_up.grad, "w_down": layer.w_down.grad}


def worker(cfg: EPConfig, out_dir: Path) -> None:
    from shared.moe.expert_parallel import ExpertParallelMoE, allreduce_router_grads

    dist.init_process_group("gloo", timeout=timedelta(seconds=cfg.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if rank == cfg.fail_rank:
            raise RuntimeError(f"rank {rank} fails on purpose (fail_rank={cfg.fail_rank})")
        ep = ExpertParallelMoE(build_layer(cfg))
        x_all, dy_all = make_batch(cfg, world)
        rows = slice(rank * cfg.tokens, (rank + 1) * cfg.tokens)
        x = x_all[rows].clone().requires_grad_(True)
        y = ep(x)
        (y * dy_all[rows]).sum().backward()
        allreduce_router_grads(ep)
        torch.save({"y": y.detach(), "dx": x.grad, "router": ep.router.weight.grad,
                    "w_gate_up": ep.w_gate_up.grad, "w_down": ep.w_down.grad,
                    "sent_rows": ep.sent_rows, "itemsize": x.element_size()},
                   out_dir / f"rank{rank}.pt")
        dist.barrier()
    except BaseException:
        # Leave the error, time-stamped, for the launcher: the first one is the root cause (the
        # other ranks then fail only because their peer's connection closed).
        (out_dir / f"rank{rank}.error").write_text(f"{time.time()}\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def launch(cfg: EPConfig, world: int = 4, timeout: float = 180.0) -> list[dict]:
    """Run `world` ranks under torchrun; return each rank's saved results, in rank order.

    Raises RuntimeError with torchrun's report (the failed rank's traceback) if any rank fails,
    and kills the whole process group if the run outlives `timeout` seconds.
    """
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={world}", "-m", "shared.moe.ep_run", *cfg.argv(),
               f"--out={tmp}"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # torchrun and its workers: our own group
            proc.communicate()
            raise RuntimeError(f"expert-parallel run exceeded {timeout:.0f} s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"expert-parallel run failed (torchrun exit {proc.returncode}); "
                               f"{_first_error(Path(tmp), log)}")
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]


def _first_error(tmp: Path, log: str) -> str:
    errors = sorted((float(p.read_text().split("\n", 1)[0]), p) for p in tmp.glob("*.error"))
    if not errors:
        return "torchrun's log ends:\n" + "\n".join(log.splitlines()[-30:])
    when, path = errors[0]
    return f"first failure on {path.stem}:\n" + path.read_text().split("\n", 1)[1]


def gather_results(ranks: list[dict]) -> dict[str, torch.Tensor]:
    """Stitch the ranks' shards into single-process shapes (router grads are already summed)."""
    return {"y": torch.cat([r["y"] for r in ranks]), "dx": torch.cat([r["dx"] for r in ranks]),
            "router": ranks[0]["router"],
            "w_gate_up": torch.cat([r["w_gate_up"] for r in ranks]),
            "w_down": torch.cat([r["w_down"] for r in ranks])}


@record  # a failing rank's traceback goes to torchrun, which prints it as the root cause
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, value in asdict(EPConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--out", type=Path, required=True)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    worker(EPConfig(**args), out)


if __name__ == "__main__":
    main()
