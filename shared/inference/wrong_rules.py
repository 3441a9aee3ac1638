"""Subtly wrong acceptance rules, kept to show that the lab's distribution tests can fail.

Each is a plausible bug in Leviathan et al.'s Algorithm 1 (Chen et al.'s Algorithm 2), with
the signature of `speculative_accept` and the same random draws as its reference, so any
difference in output is the bug's. `exact_two_tokens` gives, for γ = 1, the exact joint
distribution of the first two tokens a rule emits (from the models' distributions,
`first_two_distributions`), so the χ² test of `first_two` samples has a power against each bug
that can be computed rather than hoped for.
"""

from __future__ import annotations

from functools import partial

import torch

from kernels.sampling.checks import uniforms
from kernels.sampling.reference import gumbel
from shared.inference.speculative import Drafter, speculative_generate

FLAWS = {
    "resample from p": "at a rejection, draw from p instead of norm(max(0, p − q))",
    "swapped residual": "at a rejection, draw from norm(max(0, q − p))",
    "swapped ratio": "accept with probability min(1, q/p) instead of min(1, p/q)",
    "bonus from p_γ": "all γ accepted: the extra token comes from p_γ, not p_{γ+1}",
    "accept if p >= q": "accept iff p(x) >= q(x), deterministically",
}


def _check_flaw(flaw: str | None) -> None:
    if flaw is not None and flaw not in FLAWS:
        raise ValueError(f"flaw must be None or one of {sorted(FLAWS)}, got {flaw!r}")


def flawed_accept(draft_tokens: torch.Tensor, draft_probs: torch.Tensor,
                  target_probs: torch.Tensor, *, flaw: str, generator=None,
                  check_inputs: bool = False):
    """speculative_accept_reference with one bug (`flaw`, a key of FLAWS) put in."""
    _check_flaw(flaw)
    B, gamma = draft_tokens.shape
    V, device = draft_probs.shape[2], draft_tokens.device
    u_accept = uniforms((B, gamma), generator, device)  # the reference's draws, in its order
    u_sample = uniforms((B, V), generator, device)
    x = draft_tokens.long()[..., None]
    p = target_probs[:, :gamma].gather(2, x)[..., 0].float()
    q = draft_probs.gather(2, x)[..., 0].float()
    accepted = {"swapped ratio": u_accept * p < q,
                "accept if p >= q": p >= q}.get(flaw, u_accept * q < p)
    idx = torch.arange(gamma, device=device)
    n = torch.where(accepted, gamma, idx).amin(1)
    rows = torch.arange(B, device=device)
    row = torch.where(n == gamma, gamma - 1, n) if flaw == "bonus from p_γ" else n
    p_n = target_probs[rows, row].float()
    q_n = torch.where((n < gamma)[:, None], draft_probs[rows, n.clamp(max=gamma - 1)].float(), 0)
    residual = {"resample from p": p_n,
                "swapped residual": (q_n - p_n).clamp(min=0)}.get(flaw, (p_n - q_n).clamp(min=0))
    residual = torch.where(residual.sum(1, keepdim=True) > 0, residual, p_n)
    return n, (torch.log(residual) + gumbel(u_sample)).argmax(1)


def rule(flaw: str):
    """The flawed rule as a drop-in `accept=` for speculative_generate."""
    _check_flaw(flaw)
    return partial(flawed_accept, flaw=flaw)


def _accept_prob(p: torch.Tensor, q: torch.Tensor, flaw: str | None) -> torch.Tensor:
    """P(accept | x = v) for every v (last axis)."""
    if flaw == "swapped ratio":
        return torch.where(p > 0, (q / p).clamp(max=1), 1.0)
    if flaw == "accept if p >= q":
        return (p >= q).to(p.dtype)
    return torch.where(q > 0, (p / q).clamp(max=1), 0.0)


def _residual(p: torch.Tensor, q: torch.Tensor, flaw: str | None) -> torch.Tensor:
    r = {"resample from p": p, "swapped residual": (q - p).clamp(min=0)}.get(
        flaw, (p - q).clamp(min=0))
    s = r.sum(-1, keepdim=True)
    return torch.where(s > 0, r / s.clamp(min=1e-300), p)


def _one_step(p: torch.Tensor, q: torch.Tensor, flaw: str | None) -> torch.Tensor:
    """Distribution of the first token a round emits: x ~ q kept, or the residual."""
    kept = q * _accept_prob(p, q, flaw)
    return kept + (1 - kept.sum(-1, keepdim=True)) * _residual(p, q, flaw)


def exact_two_tokens(p1: torch.Tensor, q1: torch.Tensor, p2: torch.Tensor, q2: torch.Tensor,
                     flaw: str | None = None) -> torch.Tensor:
    """Exact joint P(t1, t2) [V, V] of the first two tokens at γ = 1 under a rule (None: the
    right one, which gives p1(t1)·p2(t2 | t1)). p1, q1 [V]: target and drafter after the
    prompt; p2, q2 [V, V]: row t1 is the distribution after prompt + t1.

    Round 1 drafts x ~ q1. Kept: t1 = x and t2 is the bonus token, from p2[x] (from p1 under
    the bonus bug). Rejected: t1 ~ residual(p1, q1), and round 2 decides t2 from
    (p2[t1], q2[t1]) as one ordinary step."""
    _check_flaw(flaw)
    p1, q1, p2, q2 = (t.double() for t in (p1, q1, p2, q2))
    kept = q1 * _accept_prob(p1, q1, flaw)  # [V]: P(round 1 keeps x = t1)
    bonus = p1.expand_as(p2) if flaw == "bonus from p_γ" else p2
    rejected = (1 - kept.sum()) * _residual(p1, q1, flaw)
    return kept[:, None] * bonus + rejected[:, None] * _one_step(p2, q2, flaw)


def first_two_distributions(target, drafter: Drafter, prefix: torch.Tensor) -> dict:
    """What decides the first two tokens after `prefix` [1, P] at T = 1, float64: p1, q1 [V]
    (target, drafter) and p2, q2 [V, V] (row t: after prefix + t): exact_two_tokens' input."""
    V = target.config.vocab_size
    cont = torch.cat([prefix.expand(V, -1), torch.arange(V, device=prefix.device)[:, None]], 1)
    m, k = drafter.model, drafter.n_layers
    with torch.no_grad():
        dist = lambda logits: torch.softmax(logits[:, -1].double(), -1)
        return {"p1": dist(target(prefix))[0], "p2": dist(target(cont)),
                "q1": dist(m(prefix, n_layers=k))[0], "q2": dist(m(cont, n_layers=k))}


def first_two(target, drafter: Drafter, prefix: torch.Tensor, n: int, *, accept=None,
              seed: int = 7) -> torch.Tensor:
    """n independent continuations of `prefix`, two tokens each, γ = 1, T = 1, through the
    real decoding loop: int64 [n, 2]. The second token is the bonus token whenever the first
    draft is kept, so a bonus bug shows in it."""
    gen = torch.Generator(device=prefix.device).manual_seed(seed)
    return speculative_generate(target, drafter, prefix.expand(n, -1), 2, gamma=1,
                                temperature=1.0, generator=gen, accept=accept).tokens


def pair_counts(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """tokens int64 [n, 2] -> counts of each (t1, t2) pair, [V, V]."""
    return torch.bincount(tokens[:, 0] * vocab + tokens[:, 1],
                          minlength=vocab * vocab).reshape(vocab, vocab)
