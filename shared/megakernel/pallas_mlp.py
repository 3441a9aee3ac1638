"""The MLP half of a decode layer run by the Pallas worker loop on several TPU cores (simulated
on a CPU by TPU interpret mode, where the workers are threads that really block on semaphores).

    out, parts = run_mlp(x, w_norm, w_gate, w_up, w_down, cores=4, tile=128,
                         interpret=pltpu.InterpretParams(detect_races=True))

Weights are stored input-major (w_gate, w_up: (D, F); w_down: (F, D)), so a task's tile is a
block of columns. The graph is graph.build_mlp_graph, validated, dealt round-robin to the cores.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from kernels.megakernel.persistent_pallas import mlp_persistent_pallas
from shared.megakernel.graph import build_mlp_graph
from shared.megakernel.schedule import assign, pallas_tables
from shared.models.llama import LlamaConfig


def mlp_config(D: int, F: int) -> LlamaConfig:
    """The sizes build_mlp_graph reads (dim, ffn_dim) as a config."""
    return LlamaConfig(vocab_size=1, dim=D, n_layers=1, n_heads=1, n_kv_heads=1, ffn_dim=F,
                       max_seq_len=1)


def check_mlp_args(x, w_norm, w_gate, w_up, w_down, cores: int, tile: int) -> None:
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
        raise ValueError(f"cores must be a positive int, got {cores!r}")
    if len(x.shape) != 2:
        raise ValueError(f"x must be (batch, dim), got shape {tuple(x.shape)}")
    B, D = x.shape
    F = w_gate.shape[-1]
    want = {"w_norm": (1, D), "w_gate": (D, F), "w_up": (D, F), "w_down": (F, D)}
    for name, w in (("w_norm", w_norm), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if tuple(w.shape) != want[name]:
            raise ValueError(f"{name} must have shape {want[name]}, got {tuple(w.shape)}")
    for name, a in (("x", x), ("w_norm", w_norm), ("w_gate", w_gate), ("w_up", w_up),
                    ("w_down", w_down)):
        if str(a.dtype) != "float32":
            raise TypeError(f"{name} must be float32, got {a.dtype}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1 or D % tile or F % tile:
        raise ValueError(f"tile={tile!r} must divide dim={D} and ffn_dim={F} (whole DMA tiles)")


def run_mlp(x, w_norm, w_gate, w_up, w_down, *, cores: int = 4, tile: int = 128,
            eps: float = 1e-5, interpret=None):
    """x + SwiGLU-MLP(rmsnorm(x)) by `cores` persistent workers; returns (out, {xn, act, down},
    the graph). `interpret`: a pltpu.InterpretParams (its core count is set to `cores`)."""
    check_mlp_args(x, w_norm, w_gate, w_up, w_down, cores, tile)
    B, D = x.shape
    graph = build_mlp_graph(mlp_config(D, w_gate.shape[1]), B, tile=tile)
    queues = assign(graph, cores)
    tables = {k: jnp.asarray(v) for k, v in pallas_tables(graph, queues).items()}
    if interpret is not None and not isinstance(interpret, bool):
        interpret = dataclasses.replace(interpret, num_cores_or_threads=cores)
    out, xn, act, down = mlp_persistent_pallas(
        tables, jnp.asarray(x), jnp.asarray(w_norm), jnp.asarray(w_gate), jnp.asarray(w_up),
        jnp.asarray(w_down), cores=cores, tile=tile, eps=eps, n_events=len(graph["events"]),
        interpret=interpret)
    return out, {"xn": xn, "act": act, "down": down}, graph


def mlp_reference(x, w_norm, w_gate, w_up, w_down, eps: float = 1e-5) -> np.ndarray:
    """The same in float64 numpy: the truth the kernel is checked against."""
    x, w_norm, w_gate, w_up, w_down = (np.asarray(a, np.float64)
                                       for a in (x, w_norm, w_gate, w_up, w_down))
    xn = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w_norm
    g = xn @ w_gate
    return x + (g / (1 + np.exp(-g)) * (xn @ w_up)) @ w_down
