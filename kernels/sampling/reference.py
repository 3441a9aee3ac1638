"""The specification of the sampling kernels, written for clarity (tests run it in float64).

gumbel_sample: the Gumbel-max trick. If g_i = −log(−log u_i) with u_i ~ U(0, 1) i.i.d., then
    argmax_i (logits_i / T + g_i)  ~  softmax(logits / T),
so sampling needs no normalisation and no cumulative sum (what FlashInfer's samplers exploit).

speculative_accept: Leviathan et al. 2023, Algorithm 1 (= Chen et al. 2023, Algorithm 2).
For each drafted token x_i ~ q_i: accept it with probability min(1, p_i(x)/q_i(x)); at the first
rejection n draw the next token from norm(max(0, p_n − q_n)); if all γ are accepted draw it
from p_γ, the target's distribution after the last draft. The result is distributed exactly as
p (paper §3, Appendix A.1). Sampling from the unnormalised residual again uses Gumbel-max:
argmax(log r + g) needs no division by Σr.
"""

from __future__ import annotations

import torch

from kernels.sampling.checks import (
    check_accept_inputs,
    check_logits,
    check_temperature,
    uniforms,
)


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise from U(0, 1) draws; u = 0 gives −inf (never chosen)."""
    return -torch.log(-torch.log(u))


def gumbel_sample_reference(logits: torch.Tensor, *, temperature: float = 1.0,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> int64 [B]: a token ~ softmax(logits / T); T = 0 is argmax (greedy)."""
    check_logits(logits)
    temperature = check_temperature(temperature)
    if temperature == 0:
        return logits.argmax(-1)
    u = uniforms(logits.shape, generator, logits.device)
    return (logits.float() / temperature + gumbel(u)).argmax(-1)


def speculative_accept_reference(draft_tokens: torch.Tensor, draft_probs: torch.Tensor,
                                 target_probs: torch.Tensor, *,
                                 generator: torch.Generator | None = None,
                                 check_inputs: bool = True):
    """-> (num_accepted int64 [B] in 0..γ, next_token int64 [B])."""
    if check_inputs:
        check_accept_inputs(draft_tokens, draft_probs, target_probs)
    B, gamma = draft_tokens.shape
    u_accept = uniforms((B, gamma), generator, draft_tokens.device)  # one per drafted token
    u_sample = uniforms((B, draft_probs.shape[2]), generator, draft_tokens.device)
    x = draft_tokens.long()[..., None]
    p = target_probs[:, :gamma].gather(2, x)[..., 0].float()  # p_i(x_i): [B, γ]
    q = draft_probs.gather(2, x)[..., 0].float()  # q_i(x_i): [B, γ]
    accepted = u_accept * q < p  # u < p/q without dividing (q > 0 is checked)
    # accepted prefix length = index of the first rejection (γ if none)
    idx = torch.arange(gamma, device=x.device)
    num_accepted = torch.where(accepted, gamma, idx).amin(1)  # [B]
    rows = torch.arange(B, device=x.device)
    p_n = target_probs[rows, num_accepted].float()  # [B, V]
    q_n = draft_probs[rows, num_accepted.clamp(max=gamma - 1)].float()
    q_n = torch.where((num_accepted < gamma)[:, None], q_n, 0.0)  # all accepted: sample p_γ
    residual = (p_n - q_n).clamp(min=0)
    # If rounding left no residual mass (p ≈ q), fall back to p itself.
    residual = torch.where(residual.sum(1, keepdim=True) > 0, residual, p_n)
    next_token = (torch.log(residual) + gumbel(u_sample)).argmax(1)
    return num_accepted, next_token
