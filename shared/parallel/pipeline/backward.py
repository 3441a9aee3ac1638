"""Split a stage's backward into B (input gradient) and W (weight gradients), Zero Bubble §2.

For a linear layer y = x A, B computes dL/dx = dL/dy A^T and W computes dL/dA = x^T dL/dy.
Generically, on the autograd graph of one stage:
- "input path": nodes through which the gradient reaches the stage input;
- "split nodes": input-path nodes with an edge into a part of the graph that reaches only
  parameters (for x @ A^T: the matmul node, whose other edge leads to A).
B runs autograd towards the input only: the engine computes just the outputs it needs, so a
matmul node yields dL/dx and skips dL/dA, while a hook captures the gradient entering each
split node. W later re-enters each split node with that gradient and asks for the parameters
only: this time the node computes dL/dA alone. No work is done twice.

The graph walk (`split_plan`) runs right after the forward: on a GPU it overlaps the forward
kernels still in flight, and it keeps Python off B, the critical path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge


@dataclass
class Split:
    """One microbatch-chunk's backward, cut in two: built after F, consumed by B then W."""

    out: torch.Tensor  # stage output (or scalar loss on the last stage)
    inp_edge: GradientEdge  # where B stops: the stage input (the embedding output on stage 0)
    nodes: list[tuple[object, list[torch.nn.Parameter]]]  # split nodes and their weights
    captured: dict = field(default_factory=dict)  # split node -> gradient entering it (B)


def _graph(root) -> list:
    """Nodes reachable from `root`, children before parents (post-order)."""
    order, seen, stack = [], {root}, [(root, iter(root.next_functions))]
    while stack:
        node, children = stack[-1]
        for child, _ in children:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append((child, iter(child.next_functions)))
                break
        else:
            order.append(node)
            stack.pop()
    return order


def split_plan(out: torch.Tensor, inp: torch.Tensor,
               params: Sequence[torch.nn.Parameter]) -> Split:
    """Find the split nodes of the graph from `inp` (and `params`) to `out`."""
    if out.grad_fn is None:
        raise ValueError("out must be the result of a differentiable computation")
    inp_edge = get_gradient_edge(inp)
    owner = {id(p): p for p in params}
    nodes = _graph(out.grad_fn)
    to_input: dict = {}
    to_params: dict = {}  # node -> ids of stage parameters it reaches
    for node in nodes:  # children first
        kids = [c for c, _ in node.next_functions if c is not None]
        to_input[node] = node is inp_edge.node or any(to_input[c] for c in kids)
        var = getattr(node, "variable", None)
        mine = {id(var)} if var is not None and id(var) in owner else set()
        to_params[node] = mine.union(*(to_params[c] for c in kids))
    split: list[tuple[object, list]] = []
    claimed: set[int] = set()
    for node in nodes:
        if not to_input[node]:
            continue
        kids = [c for c, _ in node.next_functions if c is not None]
        targets = set().union(*(to_params[c] for c in kids if not to_input[c]))
        if node is inp_edge.node:
            targets |= to_params[node]  # the embedding: W owns the table's gradient
        if targets:
            if targets & claimed:
                raise ValueError("a parameter is used twice in this stage (tied weights): "
                                 "the B/W split supports each weight used once")
            claimed |= targets
            split.append((node, [owner[i] for i in sorted(targets)]))
    return Split(out, inp_edge, split)


def backward_input(split: Split, grad_out: torch.Tensor | None) -> torch.Tensor:
    """B: dL/d(input) for L = <out, grad_out> (or L = out, a scalar loss), capturing the
    gradient entering each split node for W. The graph is kept alive for W."""
    captured = split.captured
    hooks = [node.register_prehook(lambda grads, node=node: captured.__setitem__(node, grads))
             for node, _ in split.nodes if node is not split.inp_edge.node]
    try:
        (grad_in,) = torch.autograd.grad(split.out, [split.inp_edge], grad_out,
                                         retain_graph=True)
    finally:
        for h in hooks:
            h.remove()
    if any(node is split.inp_edge.node for node, _ in split.nodes):
        # stage 0: the embedding's W needs dL/d(embedding output); elsewhere the input is a
        # leaf with no weights, and holding its gradient until W would only cost memory.
        captured[split.inp_edge.node] = (grad_in,)
    return grad_in


def held_bytes(split: Split) -> int:
    """Bytes B captured for W (distinct storages): what a B/W split holds beyond the forward's
    saved activations, which the graph retained for W keeps anyway."""
    seen = {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes()
            for grads in split.captured.values() for g in grads if g is not None}
    return sum(seen.values())


def backward_weight(split: Split) -> None:
    """W: accumulate dL/dW into each parameter's .grad from B's captures, then free them."""
    for node, params in split.nodes:
        grads = split.captured.get(node)
        if grads is None:
            raise RuntimeError(f"W before B: split node {node.name()} has no gradient yet")
        edges = [GradientEdge(node, i) for i, g in enumerate(grads) if g is not None]
        outs = [g for g in grads if g is not None]
        dws = torch.autograd.grad(edges, params, outs, retain_graph=True, allow_unused=True)
        for p, dw in zip(params, dws, strict=True):
            if dw is not None:
                p.grad = dw if p.grad is None else p.grad + dw
    split.captured.clear()
    split.nodes.clear()
