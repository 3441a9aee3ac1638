"""Pipeline parallelism the TPU way: one SPMD program, stages on a mesh axis, `ppermute`.

Every device runs the same loop of m + p - 1 steps (GPipe §2.2's fill, steady, drain). At
step t, device s applies its stage to the activation it holds, and `ppermute` shifts every
activation one device down the ring: stage 0 takes microbatch t as input, stage p - 1 finishes
microbatch t - (p - 1). The backward needs no code: `jax.grad` transposes the loop, and a
shift down the ring transposes into a shift up, i.e. gradients flow to the previous stage.
The bubble is visible in the structure: of the (m + p - 1) p stage-steps, only m p carry a
real microbatch, the rest compute on zeros: (p - 1)/(m + p - 1) wasted, GPipe's fraction.

On CPU, simulate devices with XLA_FLAGS=--xla_force_host_platform_device_count=8, set before
jax is imported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, PartitionSpec

AXIS = "stage"


def mlp_stage(params: dict, x: jax.Array) -> jax.Array:
    """A stage: L residual tanh-MLP layers. params w1 [L, d, h], w2 [L, h, d]; x [b, d]."""
    def layer(x, w):
        return x + jnp.tanh(x @ w[0]) @ w[1], None
    return lax.scan(layer, x, (params["w1"], params["w2"]))[0]


def init_params(key: jax.Array, p: int, layers: int, d: int, h: int) -> dict:
    """Stacked per-stage parameters: leading axis = stage (sharded over the mesh)."""
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (p, layers, d, h)) / d ** 0.5,
            "w2": jax.random.normal(k2, (p, layers, h, d)) / h ** 0.5}


def reference(stage_fn, params: dict, xs: jax.Array) -> jax.Array:
    """Unpipelined: every microbatch through stage 0, 1, ..., p - 1. xs [m, b, d]."""
    p = jax.tree.leaves(params)[0].shape[0]
    for s in range(p):
        ps = jax.tree.map(lambda a, s=s: a[s], params)
        xs = jax.vmap(lambda x, ps=ps: stage_fn(ps, x))(xs)
    return xs


def make_mesh(p: int) -> jax.sharding.Mesh:
    if jax.device_count() < p:
        raise ValueError(f"need {p} devices for {p} stages, have {jax.device_count()}: set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={p} before "
                         f"importing jax")
    return jax.make_mesh((p,), (AXIS,), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:p])


def pipeline(stage_fn, params: dict, xs: jax.Array, mesh: jax.sharding.Mesh) -> jax.Array:
    """Pipelined forward over the mesh's stage axis: ys [m, b, d] equal to `reference`."""
    p = mesh.shape[AXIS]
    if jax.tree.leaves(params)[0].shape[0] != p:
        raise ValueError(f"params must be stacked over {p} stages (leading axis), got "
                         f"{jax.tree.leaves(params)[0].shape[0]}")
    m = xs.shape[0]
    ring = [(s, (s + 1) % p) for s in range(p)]

    def per_device(params, xs):  # params: this stage's block [1, ...]; xs [m, b, d]
        params = jax.tree.map(lambda a: a[0], params)
        s = lax.axis_index(AXIS)

        def step(carry, t):
            held, ys = carry  # held: activation arriving at this stage; ys: finished
            inp = jnp.where(s == 0, xs[jnp.minimum(t, m - 1)], held)
            out = stage_fn(params, inp)
            done = t - (p - 1)  # microbatch leaving the last stage at step t
            write = (s == p - 1) & (done >= 0)
            ys = ys.at[jnp.maximum(done, 0)].set(
                jnp.where(write, out, ys[jnp.maximum(done, 0)]))
            return (lax.ppermute(out, AXIS, ring), ys), None

        # The carry differs per device ("varying" over the axis, check_vma): say so up front.
        init = lax.pcast((jnp.zeros_like(xs[0]), jnp.zeros_like(xs)), AXIS, to="varying")
        (_, ys), _ = lax.scan(step, init, jnp.arange(m + p - 1))
        return lax.psum(jnp.where(s == p - 1, ys, 0.0), AXIS)  # last stage's outputs

    return jax.shard_map(per_device, mesh=mesh, in_specs=(PartitionSpec(AXIS), PartitionSpec()),
                         out_specs=PartitionSpec())(params, xs)


def check(p: int = 4, m: int = 6, b: int = 3, d: int = 16, h: int = 24, layers: int = 2,
          seed: int = 0) -> dict[str, float]:
    """Pipelined vs unpipelined forward, loss gradients for params and inputs: relative
    errors (float32)."""
    mesh = make_mesh(p)
    kp, kx, kt = jax.random.split(jax.random.key(seed), 3)
    params = init_params(kp, p, layers, d, h)
    xs = jax.random.normal(kx, (m, b, d))
    target = jax.random.normal(kt, (m, b, d))

    def loss(fn):  # (mean-square loss, outputs): one compile gives forward and gradients
        def f(params, xs):
            ys = fn(params, xs)
            return jnp.mean((ys - target) ** 2), ys
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    (_, y_pipe), g_pipe = loss(lambda pr, x: pipeline(mlp_stage, pr, x, mesh))(params, xs)
    (_, y_ref), g_ref = loss(lambda pr, x: reference(mlp_stage, pr, x))(params, xs)
    rel = lambda a, r: float(jnp.linalg.norm(a - r) / jnp.linalg.norm(r))
    return {"forward": rel(y_pipe, y_ref),
            "grad_w1": rel(g_pipe[0]["w1"], g_ref[0]["w1"]),
            "grad_w2": rel(g_pipe[0]["w2"], g_ref[0]["w2"]),
            "grad_x": rel(g_pipe[1], g_ref[1])}
