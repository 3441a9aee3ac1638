"""The tensor-parallel Llama block the JAX way: `shard_map` over a named mesh axis "tp".

Weights carry their split in their PartitionSpec: q/k/v and gate/up by output (heads, FFN
columns), o and down by input. Inside, each device computes its heads and FFN slice, and the
two row-parallel outputs are summed with `lax.psum(.., "tp")`: Megatron's g. There is no f to
write: x is the same on every device (invariant over "tp"); casting it to device-varying (`pcast`,
what shard_map's check_vma inserts wherever an invariant value meets a sharded weight)
transposes, under `jax.grad`, into a psum. So f is that cast, done once per column-parallel
group, and the backward's two all-reduces come out of autograd: `count_psums` finds 2 in the
forward's program and 4 in the gradient's (which replays the forward).

Key/value heads are repeated to one per query head before sharding (so any p dividing
n_heads works); the torch version replicates only the heads a rank needs.
On CPU, simulate devices with XLA_FLAGS=--xla_force_host_platform_device_count=8, set before
jax is imported.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

AXIS = "tp"
SPECS = {"attn_norm": P(), "wq": P(None, AXIS, None), "wk": P(None, AXIS, None),
         "wv": P(None, AXIS, None), "wo": P(AXIS, None, None), "ffn_norm": P(),
         "w_gate": P(None, AXIS), "w_up": P(None, AXIS), "w_down": P(AXIS, None)}


def from_torch(block) -> dict:
    """A shared.models.llama.Block's weights as jnp arrays: wq/wk/wv [D, H, hd] (k, v repeated
    to every query head), wo [H, hd, D], w_gate/w_up [D, F], w_down [F, D]."""
    a, f = block.attn, block.ffn
    H, hd, group = a.n_heads, a.head_dim, a.n_heads // a.n_kv_heads
    t = lambda w: np.asarray(w.detach().float().numpy())
    heads = lambda w, n: t(w).T.reshape(-1, n, hd)
    return {"attn_norm": t(block.attn_norm.weight), "wq": heads(a.q_proj.weight, H),
            "wk": np.repeat(heads(a.k_proj.weight, a.n_kv_heads), group, axis=1),
            "wv": np.repeat(heads(a.v_proj.weight, a.n_kv_heads), group, axis=1),
            "wo": t(a.o_proj.weight).T.reshape(H, hd, -1), "ffn_norm": t(block.ffn_norm.weight),
            "w_gate": t(f.gate_proj.weight).T, "w_up": t(f.up_proj.weight).T,
            "w_down": t(f.down_proj.weight).T}


def _rms(x, w, eps=1e-5):
    return w * x * lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps)


def _rope(x, theta=10000.0):
    """x [B, T, h, hd], rotate-half layout (llama.py's apply_rope)."""
    T, hd = x.shape[1], x.shape[-1]
    inv = 1.0 / theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)
    ang = jnp.arange(T, dtype=jnp.float32)[:, None] * inv
    ang = jnp.concatenate([ang, ang], -1)[None, :, None, :]
    x1, x2 = jnp.split(x, 2, -1)
    return x * jnp.cos(ang) + jnp.concatenate([-x2, x1], -1) * jnp.sin(ang)


def _same(y):
    return y


def block(params: dict, x: jax.Array, f=_same, g=_same) -> jax.Array:
    """One Llama block on whatever heads / FFN columns `params` hold. Megatron's f marks the
    input of the column-parallel group, g sums the row-parallel partial outputs: both
    identities unsharded; inside shard_map f = pcast to varying, g = psum over "tp"."""
    h = f(_rms(x, params["attn_norm"]))                                 # f #1
    q, k, v = (_rope(jnp.einsum("btd,dhe->bthe", h, params[w])) if w != "wv" else
               jnp.einsum("btd,dhe->bthe", h, params[w]) for w in ("wq", "wk", "wv"))
    T, hd = x.shape[1], q.shape[-1]
    s = jnp.einsum("bqhe,bkhe->bhqk", q, k) / jnp.sqrt(hd)
    s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
    o = jnp.einsum("bhqk,bkhe->bqhe", jax.nn.softmax(s, -1), v)
    x = x + g(jnp.einsum("bthe,hed->btd", o, params["wo"]))            # g #1
    h = f(_rms(x, params["ffn_norm"]))                                  # f #2
    a = jax.nn.silu(h @ params["w_gate"]) * (h @ params["w_up"])
    return x + g(a @ params["w_down"])                                 # g #2


def make_mesh(p: int) -> jax.sharding.Mesh:
    if jax.device_count() < p:
        raise ValueError(f"need {p} devices for tp={p}, have {jax.device_count()}: set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={p} before "
                         f"importing jax")
    return jax.make_mesh((p,), (AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:p])


def tp_block(params: dict, x: jax.Array, mesh: jax.sharding.Mesh, *,
             explicit_f: bool = True) -> jax.Array:
    """The block with its weights split over the mesh's "tp" axis; x and the output are
    replicated. Without `explicit_f`, shard_map casts the normed input to varying at each of
    its uses (q, k, v; gate, up) and the gradient sums them with five psums instead of two."""
    p = mesh.shape[AXIS]
    if params["wq"].shape[1] % p or params["w_gate"].shape[1] % p:
        raise ValueError(f"heads {params['wq'].shape[1]} and ffn {params['w_gate'].shape[1]} "
                         f"must be divisible by tp={p}")
    f = (lambda y: lax.pcast(y, AXIS, to="varying")) if explicit_f else _same
    fn = jax.shard_map(lambda pr, x: block(pr, x, f, lambda y: lax.psum(y, AXIS)), mesh=mesh,
                       in_specs=({k: SPECS[k] for k in params}, P()), out_specs=P())
    return fn(params, x)


def count_psums(fn, *args) -> int:
    """psum equations in fn's program (what runs as all-reduces), nested jaxprs included."""
    def walk(jaxpr) -> int:
        here = sum(eqn.primitive.name.startswith("psum") for eqn in jaxpr.eqns)
        return here + sum(walk(sub) for sub in jax.extend.core.subjaxprs(jaxpr))
    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def check(params: dict, x, dy, p: int) -> dict:
    """TP over p devices vs the unsharded block: relative errors of the output, of x's
    gradient and of every weight's gradient (loss = sum(out * dy)), and the psum counts."""
    mesh = make_mesh(p)

    def loss(f):  # (loss, output): one compile gives the forward and the gradients
        def fn(pr, x):
            y = f(pr, x)
            return jnp.sum(y * dy), y
        return jax.jit(jax.value_and_grad(fn, (0, 1), has_aux=True))

    (_, y_tp), g_tp = loss(lambda pr, x: tp_block(pr, x, mesh))(params, x)
    (_, y_ref), g_ref = loss(block)(params, x)
    rel = lambda a, r: float(jnp.linalg.norm(a - r) / jnp.linalg.norm(r))
    out = {"forward": rel(y_tp, y_ref), "grad_x": rel(g_tp[1], g_ref[1])}
    out.update({f"grad_{k}": rel(g_tp[0][k], g_ref[0][k]) for k in params})
    out["psums_forward"] = count_psums(lambda pr, x: tp_block(pr, x, mesh), params, x)
    for explicit in (True, False):
        def total(pr, x, e=explicit):
            return jnp.sum(tp_block(pr, x, mesh, explicit_f=e) * dy)
        out["psums_grad" if explicit else "psums_grad_implicit_f"] = count_psums(
            jax.grad(total), params, x)
    return out
