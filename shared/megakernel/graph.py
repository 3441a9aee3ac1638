"""A Llama decode step compiled into a graph of fine-grained tasks linked by event counters.

Mirage Persistent Kernel (MPK, arXiv 2512.22219, §3) lowers a step to a task graph: each task is
a tile of one operator; each event is a counter that a set of tasks increments and another set
waits for. A task may start once every event it waits on has been triggered `need` times; when
it finishes it triggers its own events. Everything here is plain data (dicts, lists, ints and
strings), so a graph is written with `json.dumps` and read back as the same graph.

One decode step of `shared.models.Llama` (batch B, one new token per sequence) becomes, per layer:

    rmsnorm ─► qkv tiles ─► rope (b, kv head) ─► attention (b, kv head) ─► o-proj tiles ─┐
    ┌─ residual tile j (waits only o-proj tile j) ◄──────────────────────────────────────┘
    └► rmsnorm ─► gate·up tiles (SwiGLU) ─► down tiles ─► residual tile j (waits down tile j)

framed by an embedding lookup, the final norm, lm-head tiles and a greedy argmax. A tile is
`tile` output columns of a matmul for all B rows. Events are per operator output, except the
residual adds, which wait for the one matmul tile they add: the finest dependency there is.

Each task also names the buffer regions it reads and writes (buffer, rows, columns): the
validator (validate.py) checks that the events order every write before the reads of it and
after earlier reads of the same elements, i.e. that the graph implies the operator data flow.
"""

from __future__ import annotations

from shared.models.llama import LlamaConfig

OPS = ("embed", "rmsnorm", "matmul", "swiglu", "rope", "attention", "add", "argmax")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def buffers(config: LlamaConfig, batch: int) -> dict[str, list[int]]:
    """The step's buffers, [rows, columns] each: activations (float32 in the kernel), the token
    ids in and out, and each layer's KV cache as [sequence, kv head] (the regions tasks touch)."""
    c, hd = config, config.head_dim
    return {"x": [batch, c.dim], "xn": [batch, c.dim],
            "qkv": [batch, (c.n_heads + 2 * c.n_kv_heads) * hd], "attn": [batch, c.n_heads * hd],
            "o": [batch, c.dim], "act": [batch, c.ffn_dim], "down": [batch, c.dim],
            "logits": [batch, c.vocab_size], "tokens": [batch, 1], "next_tokens": [batch, 1],
            **{f"kv{i}": [batch, c.n_kv_heads] for i in range(c.n_layers)}}


def _check_sizes(config, batch, tile) -> None:
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"config must be a LlamaConfig, got {type(config).__name__}")
    for name, value in (("batch", batch), ("tile", tile)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class _Builder:
    def __init__(self, config: LlamaConfig, batch: int, tile: int):
        self.c, self.B, self.tile = config, batch, tile
        self.tasks: list[dict] = []
        self.events: list[dict] = []

    def event(self, name: str) -> int:
        self.events.append({"name": name, "need": 0})
        return len(self.events) - 1

    def task(self, op: str, layer: int, args: dict, *, reads, writes, waits, trigger: int,
             flops: float, bytes_: float) -> None:
        """`reads`/`writes`: (buffer, r0, r1, c0, c1) half-open. `waits`: event ids (their
        `need` is fixed once the graph is built). Each task triggers one event once."""
        self.events[trigger]["need"] += 1
        self.tasks.append({"id": len(self.tasks), "op": op, "layer": layer, "args": args,
                           "reads": [list(r) for r in reads], "writes": [list(w) for w in writes],
                           "waits": list(waits), "triggers": [trigger],
                           "flops": float(flops), "bytes": float(bytes_)})

    def full(self, buf: str, cols: int) -> tuple:
        return (buf, 0, self.B, 0, cols)

    def norm(self, layer, weight, src_ready, name):
        d, B = self.c.dim, self.B
        ev = self.event(f"{name}.done")
        self.task("rmsnorm", layer, {"src": "x", "dst": "xn", "weight": weight},
                  reads=[self.full("x", d)], writes=[self.full("xn", d)],
                  waits=[] if src_ready is None else [src_ready],
                  trigger=ev, flops=4 * B * d, bytes_=(2 * B + 1) * d * 2)
        return ev

    def matmul(self, layer, op, weights, src, k, dst, n, ready, name, per_tile=False):
        """Tiles of dst[:, j:j+tile] = f(src @ W[j:j+tile].T); one event, or one per tile."""
        B, t = self.B, self.tile
        whole = None if per_tile else self.event(f"{name}.done")
        evs = []
        for j in range(0, n, t):
            w = min(t, n - j)
            ev = self.event(f"{name}.{j // t}") if per_tile else whole
            self.task(op, layer, {"src": src, "dst": dst, "weights": weights, "k": k,
                                  "col": j, "width": w},
                      reads=[self.full(src, k)], writes=[(dst, 0, B, j, j + w)], waits=[ready],
                      trigger=ev, flops=2 * B * k * w * len(weights),
                      bytes_=2 * (len(weights) * w * k + B * k + B * w))
            evs.append(ev)
        return evs if per_tile else whole

    def residual(self, layer, other, tile_events, name):
        """x[:, tile] += other[:, tile], each tile waiting only on the matmul tile it adds."""
        B, t = self.B, self.tile
        ev = self.event(f"{name}.done")
        for idx, j in enumerate(range(0, self.c.dim, t)):
            w = min(t, self.c.dim - j)
            self.task("add", layer, {"dst": "x", "a": "x", "b": other, "col": j, "width": w},
                      reads=[("x", 0, B, j, j + w), (other, 0, B, j, j + w)],
                      writes=[("x", 0, B, j, j + w)], waits=[tile_events[idx]], trigger=ev,
                      flops=B * w, bytes_=3 * B * w * 2)
        return ev

    def attention(self, layer, qkv_ready, seq_len):
        c, hd, B = self.c, self.c.head_dim, self.B
        group, kv_heads = c.n_heads // c.n_kv_heads, c.n_kv_heads
        k0, v0 = c.n_heads * hd, (c.n_heads + kv_heads) * hd
        done = self.event(f"L{layer}.attn.done")
        pairs = [(b, h) for b in range(B) for h in range(kv_heads)]
        roped = {}
        for b, h in pairs:   # all RoPE tasks first: one operator, then the attention operator
            roped[b, h] = self.event(f"L{layer}.rope.{b}.{h}")
            q, k, v = self._head_cols(h, group, k0, v0)
            self.task("rope", layer, {"b": b, "kv_head": h, "group": group},
                      reads=[("qkv", b, b + 1, *q), ("qkv", b, b + 1, *k), ("qkv", b, b + 1, *v)],
                      writes=[("qkv", b, b + 1, *q), ("qkv", b, b + 1, *k),
                              (f"kv{layer}", b, b + 1, h, h + 1)],
                      waits=[qkv_ready], trigger=roped[b, h], flops=6 * (group + 1) * hd,
                      bytes_=2 * (2 * group + 4) * hd * 2)
        for b, h in pairs:
            q, _, _ = self._head_cols(h, group, k0, v0)
            self.task("attention", layer, {"b": b, "kv_head": h, "group": group},
                      reads=[("qkv", b, b + 1, *q), (f"kv{layer}", b, b + 1, h, h + 1)],
                      writes=[("attn", b, b + 1, *q)], waits=[roped[b, h]], trigger=done,
                      flops=4 * group * seq_len * hd,
                      bytes_=2 * (2 * seq_len * hd + 2 * group * hd))
        return done

    def _head_cols(self, h, group, k0, v0):
        """Column ranges in qkv of KV head h's query group, its key and its value."""
        hd = self.c.head_dim
        return ((h * group * hd, (h + 1) * group * hd), (k0 + h * hd, k0 + (h + 1) * hd),
                (v0 + h * hd, v0 + (h + 1) * hd))

    def mlp(self, i, x_ready):
        """x += down(silu(gate(xn)) · up(xn)), xn = rmsnorm(x): the second half of a block."""
        c, p = self.c, f"layers.{i}."
        normed = self.norm(i, p + "ffn_norm", x_ready, f"L{i}.ffn_norm")
        act = self.matmul(i, "swiglu", [p + "gate_proj", p + "up_proj"], "xn", c.dim, "act",
                          c.ffn_dim, normed, f"L{i}.act")
        down = self.matmul(i, "matmul", [p + "down_proj"], "act", c.ffn_dim, "down", c.dim, act,
                           f"L{i}.down", per_tile=True)
        return self.residual(i, "down", down, f"L{i}.out")

    def layer(self, i, x_ready, seq_len):
        c, hd = self.c, self.c.head_dim
        n_qkv = (c.n_heads + 2 * c.n_kv_heads) * hd
        p = f"layers.{i}."
        normed = self.norm(i, p + "attn_norm", x_ready, f"L{i}.attn_norm")
        qkv = self.matmul(i, "matmul", [p + "qkv"], "xn", c.dim, "qkv", n_qkv, normed, f"L{i}.qkv")
        attn = self.attention(i, qkv, seq_len)
        o_tiles = self.matmul(i, "matmul", [p + "o_proj"], "attn", c.n_heads * hd, "o", c.dim,
                              attn, f"L{i}.o", per_tile=True)
        return self.mlp(i, self.residual(i, "o", o_tiles, f"L{i}.h"))


def build_decode_graph(config: LlamaConfig, batch: int, *, tile: int = 64,
                       seq_len: int | None = None) -> dict:
    """The task graph of one greedy decode step (JSON-serialisable dict).

    `tile`: output columns per matmul task (MPK's task granularity). `seq_len`: the context
    the attention tasks' counted work assumes (the simulator's task times); default the model's
    max_seq_len. Tasks are listed in program order (a valid topological order)."""
    _check_sizes(config, batch, tile)
    seq_len = config.max_seq_len if seq_len is None else seq_len
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    g = _Builder(config, batch, tile)
    c, B = config, batch
    x_ready = g.event("embed.done")
    g.task("embed", -1, {"weight": "embed"}, reads=[("tokens", 0, B, 0, 1)],
           writes=[g.full("x", c.dim)], waits=[], trigger=x_ready, flops=0,
           bytes_=2 * 2 * B * c.dim)
    for i in range(c.n_layers):
        x_ready = g.layer(i, x_ready, seq_len)
    normed = g.norm(c.n_layers, "norm", x_ready, "final_norm")
    logits = g.matmul(c.n_layers, "matmul", ["lm_head"], "xn", c.dim, "logits", c.vocab_size,
                      normed, "lm_head")
    done = g.event("step.done")
    g.task("argmax", c.n_layers, {}, reads=[g.full("logits", c.vocab_size)],
           writes=[("next_tokens", 0, B, 0, 1)], waits=[logits], trigger=done,
           flops=B * c.vocab_size, bytes_=4 * B * c.vocab_size)
    return {"model": {k: getattr(c, k) for k in c.__dataclass_fields__}, "batch": B,
            "tile": tile, "seq_len": seq_len, "buffers": buffers(c, B),
            "events": g.events, "tasks": g.tasks}


def operators(graph: dict) -> list[list[int]]:
    """The task ids of each operator, in program order: what a kernel-per-operator runtime
    launches one kernel for (consecutive tasks of the same op, layer and output buffer)."""
    groups: list[list[int]] = []
    key_prev = None
    for t in graph["tasks"]:
        key = (t["op"], t["layer"], t["writes"][0][0])
        if key != key_prev:
            groups.append([])
            key_prev = key
        groups[-1].append(t["id"])
    return groups
