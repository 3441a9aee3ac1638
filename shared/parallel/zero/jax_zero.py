"""ZeRO-3 the JAX way: parameters sharded over a `data` mesh axis and gathered inside
`shard_map` just before use; `jax.grad` then produces ZeRO's gradient communication by itself,
because the transpose of an all-gather is a reduce-scatter: each device receives only the
gradient rows of its own shard, summed over the batch shards of every device (§5.3's P_os+g+p:
all-gather forward, all-gather backward, reduce-scatter of the gradients).

On CPU, simulate devices with XLA_FLAGS=--xla_force_host_platform_device_count=4, set before
jax is imported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, PartitionSpec

AXIS = "data"


def make_mesh(n: int) -> jax.sharding.Mesh:
    if jax.device_count() < n:
        raise ValueError(f"need {n} devices for Nd={n}, have {jax.device_count()}: set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before "
                         "importing jax")
    return jax.make_mesh((n,), (AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def mlp_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """The reference: mean-square error of relu(x W1) W2, params {"w1": [d, h], "w2": [h, d]}."""
    return jnp.mean((jax.nn.relu(x @ params["w1"]) @ params["w2"] - y) ** 2)


def zero3_loss(mesh: jax.sharding.Mesh, *, regather: bool = True):
    """The same loss with each weight's rows and the batch's rows split over the mesh.
    `regather`: keep only the shards for the backward and gather again there (ZeRO-3's
    memory saving: `jax.checkpoint` drops the gathered weights); without it XLA keeps the
    full weights from the forward, as ZeRO-2 would."""

    def local(shards, x, y):  # shards: this device's rows of each weight; x, y: its rows
        full = {k: lax.all_gather(w, AXIS, tiled=True) for k, w in shards.items()}  # gather
        return mlp_loss(full, x, y)

    def per_device(shards, x, y):
        loss = (jax.checkpoint(local) if regather else local)(shards, x, y)
        return lax.pmean(loss, AXIS)  # the global mean over equal batch shards

    spec = PartitionSpec(AXIS)
    return jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, spec),
                         out_specs=PartitionSpec())


def check(n: int = 4, b: int = 8, d: int = 12, h: int = 20, seed: int = 0,
          regather: bool = True) -> dict:
    """Sharded vs one-device loss and gradients (relative errors), and the collectives the
    compiled gradient program holds (counted in its StableHLO)."""
    for name, v in (("b", b), ("d", d), ("h", h)):
        if v % n:
            raise ValueError(f"{name}={v} must be a multiple of Nd={n}")
    mesh = make_mesh(n)
    k1, k2, kx, ky = jax.random.split(jax.random.key(seed), 4)
    params = {"w1": jax.random.normal(k1, (d, h)) / d**0.5,
              "w2": jax.random.normal(k2, (h, d)) / h**0.5}
    x, y = jax.random.normal(kx, (b, d)), jax.random.normal(ky, (b, d))
    grad_fn = jax.jit(jax.value_and_grad(zero3_loss(mesh, regather=regather)))
    loss, grads = grad_fn(params, x, y)
    ref_loss, ref_grads = jax.value_and_grad(mlp_loss)(params, x, y)
    rel = lambda a, r: float(jnp.linalg.norm(a - r) / jnp.linalg.norm(r))
    hlo = grad_fn.lower(params, x, y).as_text()
    return {"loss": rel(loss, ref_loss), "grad_w1": rel(grads["w1"], ref_grads["w1"]),
            "grad_w2": rel(grads["w2"], ref_grads["w2"]),
            "all_gathers": hlo.count("stablehlo.all_gather"),
            "reduce_scatters": hlo.count("stablehlo.reduce_scatter"),
            "all_reduces": hlo.count("stablehlo.all_reduce")}
