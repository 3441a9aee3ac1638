"""The sampling kernels in Triton: one program per sequence, the vocabulary streamed in tiles.

Both kernels end in an argmax over V of (score + Gumbel noise) kept as a running (max, index)
pair across tiles of BLOCK_V, so any V works and each probability is read once:
    gumbel_sample       reads logits [V] + uniforms [V]                       per row
    speculative_accept  gathers p_i(x_i), q_i(x_i) for the γ drafts, then reads
                        p_n, q_n [V] at the first rejection n, + uniforms [V]  per row
Decoding is memory bound (a handful of rows, V up to 128k), so one program per row with a
wide tile is the layout; a GPU would split huge V across programs with a second-pass reduction.
The uniforms come from the host (checks.uniforms) so the kernels and references agree exactly;
an in-kernel Philox (tl.rand) would save reading them, at the price of that exact check.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.device import new_output
from kernels.launch import offset
from kernels.sampling.checks import (
    check_accept_inputs,
    check_logits,
    check_temperature,
    uniforms,
)

MAX_BLOCK_V = 4096


@triton.jit
def _argmax_update(best, best_idx, score, offs):
    """Fold one tile into the running argmax; ties keep the lowest index (as torch.argmax)."""
    tile_max = tl.max(score, axis=0)
    tile_idx = tl.min(tl.where(score == tile_max, offs, 2147483647), axis=0)
    take = tile_max > best
    return tl.where(take, tile_max, best), tl.where(take, tile_idx, best_idx)


@triton.jit
def _gumbel(u):
    return -tl.log(-tl.log(u))


@triton.jit
def gumbel_sample_kernel(logits_ptr, u_ptr, out_ptr, V, stride_l, inv_temp,
                         GREEDY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    logits_row = logits_ptr + offset(row, stride_l)   # int64: B·V passes 2^31 at big vocabularies
    u_row = u_ptr + offset(row, V)
    best = -float("inf")
    best_idx = 0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(logits_row + offs, mask=mask, other=-float("inf"))
        score = x.to(tl.float32)
        if not GREEDY:
            u = tl.load(u_row + offs, mask=mask, other=0.0)
            score = score * inv_temp + _gumbel(u)
        score = tl.where(mask, score, -float("inf"))
        best, best_idx = _argmax_update(best, best_idx, score, offs)
    tl.store(out_ptr + row, best_idx.to(tl.int64))


def _block_v(V: int) -> int:
    return min(triton.next_power_of_2(V), MAX_BLOCK_V)


def gumbel_sample(logits: torch.Tensor, *, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> int64 [B], a token ~ softmax(logits / T); T = 0 is greedy argmax."""
    check_logits(logits)
    temperature = check_temperature(temperature)
    logits = logits.contiguous()
    B, V = logits.shape
    greedy = temperature == 0
    u = logits if greedy else uniforms((B, V), generator, logits.device)  # u unused if greedy
    out = new_output((B,), torch.int64, logits.device)
    gumbel_sample_kernel[(B,)](logits, u, out, V, logits.stride(0),
                               0.0 if greedy else 1.0 / temperature,
                               GREEDY=greedy, BLOCK_V=_block_v(V))
    return out


@triton.jit
def speculative_accept_kernel(tok_ptr, q_ptr, p_ptr, ua_ptr, us_ptr, n_out_ptr, next_out_ptr,
                              GAMMA, V, BLOCK_G: tl.constexpr, BLOCK_V: tl.constexpr):
    b = tl.program_id(0)
    q_row = q_ptr + offset(b, GAMMA * V)  # draft_probs[b]: [γ, V]; B·(γ+1)·V may pass 2^31
    p_row = p_ptr + offset(b, (GAMMA + 1) * V)  # target_probs[b]: [γ+1, V]
    # 1. Accept x_i with probability min(1, p_i(x_i)/q_i(x_i)): u_i * q < p (Alg. 1).
    i = tl.arange(0, BLOCK_G)
    gmask = i < GAMMA
    x = tl.load(tok_ptr + b * GAMMA + i, mask=gmask, other=0)
    p = tl.load(p_row + i * V + x, mask=gmask, other=0.0).to(tl.float32)
    q = tl.load(q_row + i * V + x, mask=gmask, other=1.0).to(tl.float32)
    u = tl.load(ua_ptr + b * GAMMA + i, mask=gmask, other=1.0)
    rejected = (u * q >= p) & gmask
    n = tl.min(tl.where(rejected, i, GAMMA), axis=0)  # first rejection, γ if none
    # 2. Next token ~ norm(max(0, p_n − q_n)), or p_γ when all were accepted (q_n := 0).
    #    Gumbel-max on log(residual); a second running argmax on log(p_n) is the fallback
    #    for a residual that rounding made all zero.
    q_len = tl.where(n < GAMMA, V, 0)  # q_n's row is read only if there was a rejection
    q_n = q_row + tl.minimum(n, GAMMA - 1) * V
    best, best_idx = -float("inf"), 0
    best_p, best_p_idx = -float("inf"), 0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        pv = tl.load(p_row + n * V + offs, mask=mask, other=0.0).to(tl.float32)
        qv = tl.load(q_n + offs, mask=offs < q_len, other=0.0).to(tl.float32)
        g = _gumbel(tl.load(us_ptr + offset(b, V) + offs, mask=mask, other=0.0))
        r = tl.maximum(pv - qv, 0.0)
        score = tl.where(mask & (r > 0), tl.log(r) + g, -float("inf"))
        score_p = tl.where(mask & (pv > 0), tl.log(pv) + g, -float("inf"))
        best, best_idx = _argmax_update(best, best_idx, score, offs)
        best_p, best_p_idx = _argmax_update(best_p, best_p_idx, score_p, offs)
    nxt = tl.where(best > -float("inf"), best_idx, best_p_idx)
    tl.store(n_out_ptr + b, n.to(tl.int64))
    tl.store(next_out_ptr + b, nxt.to(tl.int64))


def speculative_accept(draft_tokens: torch.Tensor, draft_probs: torch.Tensor,
                       target_probs: torch.Tensor, *, generator: torch.Generator | None = None,
                       check_inputs: bool = True):
    """Shapes [B, γ], [B, γ, V], [B, γ+1, V] -> (num_accepted int64 [B], next_token int64 [B]).

    ``check_inputs=False`` skips the distribution checks (they synchronise with the host).
    """
    if check_inputs:
        B, gamma, V = check_accept_inputs(draft_tokens, draft_probs, target_probs)
    else:
        (B, gamma), V = draft_tokens.shape, draft_probs.shape[2]
    device = draft_tokens.device
    u_accept = uniforms((B, gamma), generator, device)  # same draws, same order as the reference
    u_sample = uniforms((B, V), generator, device)
    num_accepted = new_output((B,), torch.int64, device)
    next_token = new_output((B,), torch.int64, device)
    speculative_accept_kernel[(B,)](
        draft_tokens.contiguous(), draft_probs.contiguous(), target_probs.contiguous(),
        u_accept, u_sample, num_accepted, next_token, gamma, V,
        BLOCK_G=triton.next_power_of_2(gamma), BLOCK_V=_block_v(V))
    return num_accepted, next_token
