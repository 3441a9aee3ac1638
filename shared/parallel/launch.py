"""Process groups for CPU and GPU, launched the torchrun way; nothing hangs.

Two ways in, one init path (``env://``):
- ``python -m torch.distributed.run --standalone --nproc-per-node=N -m <module>``: torchrun
  sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and tears the group down if a worker dies;
- `spawn(fn, nprocs, *args)`: the same variables set here, a port picked at run time, a
  deadline for the whole run, and the first failing rank's traceback raised in the parent
  after the other ranks are killed.
Every collective and point-to-point wait uses the group's timeout (`TIMEOUT_S`).
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

TIMEOUT_S = float(os.environ.get("KC_DIST_TIMEOUT", "60"))  # per collective / recv


def free_port() -> int:
    """A TCP port the OS says is free now (picked at run time, never a fixed one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_from_env(timeout_s: float = TIMEOUT_S) -> tuple[int, int]:
    """Join the process group described by the torchrun variables; returns (rank, world).
    NCCL when every rank can have its own GPU, gloo otherwise."""
    world = int(os.environ["WORLD_SIZE"])
    use_nccl = torch.cuda.is_available() and torch.cuda.device_count() >= int(
        os.environ.get("LOCAL_WORLD_SIZE", world))
    if use_nccl:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_nccl else "gloo", init_method="env://",
                            timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    """This rank's device: its GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _entry(local_rank: int, fn, nprocs: int, port: int, outdir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nprocs),
                      LOCAL_WORLD_SIZE=str(nprocs))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    try:
        init_from_env()
        result = fn(*args)
    except BaseException:
        # The first rank to fail is the cause; its peers fail after it (connection reset, a
        # timeout). Stamp the time so the parent can report the cause, not a symptom.
        err = Path(outdir) / f"rank{local_rank}.err"
        err.write_text(f"{time.time()!r}\n{traceback.format_exc()}")
        raise
    torch.save(result, Path(outdir) / f"rank{local_rank}.pt")
    dist.destroy_process_group()


def spawn(fn, nprocs: int, *args, timeout_s: float = 600.0) -> list:
    """Run ``fn(*args)`` on `nprocs` fresh processes in one process group and return each
    rank's result. `fn` must be a module-level function (spawn pickles it by name).

    A rank that raises ends the run: the others are killed and RuntimeError carries that
    rank's traceback. Past `timeout_s` every rank is killed and TimeoutError raised."""
    if not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs must be an int >= 1, got {nprocs!r}")
    with tempfile.TemporaryDirectory(prefix="kc-spawn-") as outdir:
        ctx = mp.start_processes(_entry, args=(fn, nprocs, free_port(), outdir, args),
                                 nprocs=nprocs, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=0.2):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} on {nprocs} ranks ran past "
                                       f"timeout_s={timeout_s}")
        except ProcessException as e:  # join() has already killed the other ranks
            raise RuntimeError(_first_failure(fn.__name__, outdir, e)) from None
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=False)
                for r in range(nprocs)]


def _first_failure(name: str, outdir: str, exc: ProcessException) -> str:
    """The message of the rank that failed first (earliest stamp), naming the others."""
    failures = []
    for err in Path(outdir).glob("rank*.err"):
        stamp, _, text = err.read_text().partition("\n")
        failures.append((float(stamp), int(err.stem[4:]), text))
    if not failures:  # killed without a Python exception (signal, os._exit)
        return f"{name}: rank {exc.error_index} died: {exc}"
    failures.sort()
    _, rank, text = failures[0]
    others = sorted(r for _, r, _ in failures[1:])
    after = f" (then ranks {others} failed after it)" if others else ""
    # a rank that exited without a traceback (os._exit, a signal) wrote nothing: its peers'
    # "connection reset" would otherwise be all the message says
    silent = exc.error_index not in {r for _, r, _ in failures}
    lost = (f"rank {exc.error_index} exited (code {getattr(exc, 'exit_code', '?')}) without "
            f"a traceback; ") if silent else ""
    return f"{lost}{name}: rank {rank} failed first{after}:\n{text}"
