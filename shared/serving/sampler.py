"""The next token of each request in a step: greedy, or temperature with top-k / top-p.

Top-k and top-p (nucleus, Holtzman et al. 2020) are masks on the logits, plain torch ops; the
draw itself is kernels/sampling's Gumbel-max kernel (`gumbel_sample`, chosen by
shared/inference/generate.ops: Triton on a GPU, its reference under the interpreter). Each
request draws with its own generator when it has a seed, so what it samples does not depend
on which other requests shared its batch.
"""

from __future__ import annotations

import torch

from shared.inference.generate import ops
from shared.serving.request import SamplingParams


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [V] / T with every token outside the top-k and the top-p nucleus at −inf."""
    x = logits.double() / params.temperature
    if params.top_k and params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1:
        sorted_x, order = torch.sort(x, descending=True)
        p = torch.softmax(sorted_x, -1)
        # keep a token while the mass before it is below top_p: the first is always kept
        drop = (torch.cumsum(p, -1) - p) >= params.top_p
        x = x.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return x


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None], impl: str | None = None) -> list[int]:
    """logits [B, V] -> one token per row. Greedy rows are an argmax; the others go through
    the sampling kernel one row at a time, each with its request's generator."""
    draw, _ = ops(impl)
    tokens = logits.argmax(-1).tolist()
    for i, (p, g) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            row = filter_logits(logits[i], p)[None]
            tokens[i] = int(draw(row, temperature=1.0, generator=g)[0])
    return tokens
