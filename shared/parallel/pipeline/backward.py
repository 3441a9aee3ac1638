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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge


@dataclass
class WeightGrad:
    """What W needs: for each split node, the gradient that entered it and its parameters."""

    jobs: list[tuple[object, tuple, list[torch.nn.Parameter]]] = field(default_factory=list)


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


def backward_input(out: torch.Tensor, grad_out: torch.Tensor | None, inp: torch.Tensor,
                   params: Sequence[torch.nn.Parameter]) -> tuple[torch.Tensor, WeightGrad]:
    """B: dL/d(inp) for L = <out, grad_out> (or L = out when it is a scalar loss), and the
    captures W needs. The graph is kept alive for W."""
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
    captured: dict = {}
    hooks = [node.register_prehook(lambda grads, node=node: captured.__setitem__(node, grads))
             for node, _ in split if node is not inp_edge.node]
    try:
        (grad_in,) = torch.autograd.grad(out, [inp_edge], grad_out, retain_graph=True)
    finally:
        for h in hooks:
            h.remove()
    jobs = []
    for node, ps in split:
        grads = (grad_in,) if node is inp_edge.node else captured.get(node)
        if grads is None:
            raise RuntimeError(f"split node {node.name()} did not run during B")
        jobs.append((node, grads, ps))
    return grad_in, WeightGrad(jobs)


def backward_weight(wg: WeightGrad) -> None:
    """W: accumulate dL/dW into each parameter's .grad from B's captures."""
    for node, grads, params in wg.jobs:
        edges = [GradientEdge(node, i) for i, g in enumerate(grads) if g is not None]
        outs = [g for g in grads if g is not None]
        dws = torch.autograd.grad(edges, params, outs, retain_graph=True, allow_unused=True)
        for p, dw in zip(params, dws, strict=True):
            if dw is not None:
                p.grad = dw if p.grad is None else p.grad + dw
    wg.jobs.clear()
