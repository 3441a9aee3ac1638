"""Drawing one data-parallel step as the engine recorded it: the compute thread (forward,
backward, and the time it sat waiting for a gather) above the communication thread (each
collective), and the parameter bytes a rank holds over the step."""

from __future__ import annotations

COLORS = {"forward": "tab:blue", "backward": "tab:green", "wait": "tab:red",
          "all_gather": "tab:orange", "reduce_scatter": "tab:purple", "all_reduce": "tab:gray"}


def plot_step(ax, spans, comm, title: str) -> None:
    """`spans`: (kind, unit, t0, t1) of the compute thread; `comm`: (op, unit, nbytes, t0, t1)
    of the communication thread; times in seconds from the step's start, drawn in ms."""
    rows = [(1, [(k, u, a, b) for k, u, a, b in spans]),
            (0, [(op, u, a, b) for op, u, _, a, b in comm])]
    seen = set()
    for y, items in rows:
        for kind, unit, a, b in items:
            ax.barh(y, (b - a) * 1e3, left=a * 1e3, color=COLORS[kind], edgecolor="k", lw=0.3,
                    label=None if kind in seen else kind.replace("_", "-"))
            seen.add(kind)
            if (b - a) * 1e3 > 0.04 * max(1e-9, ax.get_xlim()[1]) and kind != "wait":
                ax.text((a + b) / 2 * 1e3, y, unit.replace("layers.", "L"), ha="center",
                        va="center", fontsize=6)
    ax.set_yticks([0, 1], ["comm thread", "compute"])
    ax.set_xlabel("ms from the step's start")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.35))


def plot_memory(ax, memory, label: str) -> None:
    """`memory`: (t, parameter bytes resident) samples of one step, drawn as a step line."""
    if not memory:
        return
    ts, bs = zip(*memory, strict=True)
    ax.step([t * 1e3 for t in ts], [b / 2**10 for b in bs], where="post", label=label)
    ax.set_xlabel("ms from the step's start")
    ax.set_ylabel("parameter KiB resident")
