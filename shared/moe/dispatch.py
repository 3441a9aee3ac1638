"""Getting tokens to their experts and back: GShard's one-hot einsum, Tutel's index dispatch,
MegaBlocks' sort.

All three run the same SwiGLU experts (weights w_gate_up [E, D, 2F], w_down [E, F, D]) and return
y [T, D] = Σ_j gate[t, j] · expert_{e(t,j)}(x[t]) over the assignments they keep.

einsum (GShard §2.2, Algorithm 1; Switch §2.2): every expert gets a fixed buffer of C slots,
C = ceil(capacity_factor · T·k / E). Slots are taken in priority order (all first choices,
then second choices, each in token order); an assignment that finds its expert full is
*dropped*: it contributes nothing (the residual carries the token on). Dispatch and combine are
dense [T, E, C] one-hot tensors contracted by einsum: O(T·E·C·D) FLOPs of moving data.

index (Tutel, Hwang et al. 2023; its fast_encode / fast_decode): the same capacity, the same slots,
the same drops and the same padded [E, C, D] expert batch, but tokens are *copied* into their
slot by index and read back by index: O(T·k·D) data movement instead of the one-hot contraction.
It does the einsum's work by a cheaper route, so it is the fair baseline for both: einsum vs
index measures the one-hot formulation; index vs sort (same capacity) measures padding.

sort (MegaBlocks §5): sort the T·k assignments by expert, run one grouped matmul over the
ragged groups, un-sort with the gates. Nothing is padded and nothing is dropped. Given a
capacity factor it applies the same dropping rule as einsum, for comparison (and speed on a
CPU): dropped assignments sort into a last bucket past Σ group_sizes, which the grouped matmul
leaves at zero (ragged_dot's contract), so they cost no expert FLOPs and contribute nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.moe import (
    grouped_matmul,
    grouped_matmul_torch,
    permute,
    permute_reference,
    unpermute,
    unpermute_reference,
)

BACKENDS = ("torch", "triton")


def capacity(tokens: int, k: int, num_experts: int, capacity_factor: float | None) -> int:
    """Slots per expert: ceil(cf · T·k / E) (Switch eq. 3, times k); None: T (never drops)."""
    if capacity_factor is None:
        return tokens
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    return max(1, math.ceil(capacity_factor * tokens * k / num_experts))


def capacity_slots(indices: torch.Tensor, num_experts: int, cap: int):
    """(slot [T, k] position of each assignment in its expert's buffer, keep [T, k] bool).

    Priority: choice j before choice j+1, then token order (GShard Algorithm 1).
    """
    T, k = indices.shape
    experts = torch.arange(num_experts, device=indices.device)
    # [k·T, E] one-hot, j-major; a comparison, not F.one_hot, whose range check reads the
    # indices back to the host
    onehot = (indices.t().reshape(-1, 1) == experts).long()
    slot = (torch.cumsum(onehot, dim=0) - 1).mul(onehot).sum(-1)     # [k·T] rank in expert
    slot = slot.view(k, T).t()
    return slot, slot < cap


def swiglu_batched(xin: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor):
    """[E, C, D] -> [E, C, D]: each expert's SwiGLU on its own buffer (batched matmul)."""
    gate, up = torch.bmm(xin, w_gate_up).chunk(2, dim=-1)            # [E, C, F] each
    return torch.bmm(F.silu(gate) * up, w_down)


def einsum_dispatch(x, gates, indices, w_gate_up, w_down, capacity_factor):
    """GShard dispatch. Returns (y [T, D], keep [T, k] bool)."""
    T, k = indices.shape
    E = w_gate_up.shape[0]
    cap = capacity(T, k, E, capacity_factor)
    slot, keep = capacity_slots(indices, E, cap)
    # dispatch[t, e, c] = 1 iff token t sits in slot c of expert e: a sum of k one-hot outer
    # products (masked where dropped); combine is the same weighted by the gates.
    e_hot = F.one_hot(indices, E).to(x.dtype)                        # [T, k, E]
    c_hot = F.one_hot(slot.clamp(max=cap - 1), cap).to(x.dtype)      # [T, k, C]
    kept = keep.to(x.dtype)
    dispatch = torch.einsum("tke,tkc,tk->tec", e_hot, c_hot, kept)
    combine = torch.einsum("tke,tkc,tk->tec", e_hot, c_hot, kept * gates)
    xin = torch.einsum("tec,td->ecd", dispatch, x)                   # [E, C, D]
    out = swiglu_batched(xin, w_gate_up, w_down)
    return torch.einsum("tec,ecd->td", combine, out), keep


def index_dispatch(x, gates, indices, w_gate_up, w_down, capacity_factor):
    """Tutel-style capacity dispatch by index. Returns (y [T, D], keep [T, k] bool): the same
    numbers as einsum_dispatch, with no host read (dropped rows go to a spare row, not a mask)."""
    T, k = indices.shape
    E, D = w_gate_up.shape[0], x.shape[1]
    cap = capacity(T, k, E, capacity_factor)
    slot, keep = capacity_slots(indices, E, cap)
    spare = E * cap                                       # one row past the E·C slots
    dest = torch.where(keep, indices * cap + slot, spare).reshape(-1)    # [T·k]
    tokens = torch.arange(T, device=x.device).repeat_interleave(k)      # a = t·k + j -> t
    # Kept assignments own distinct slots; only the spare row is written more than once, and it
    # is thrown away, so index_copy's "duplicates are nondeterministic" never reaches the output.
    buf = x.new_zeros(spare + 1, D).index_copy(0, dest, x.index_select(0, tokens))
    out = swiglu_batched(buf[:spare].view(E, cap, D), w_gate_up, w_down)
    out = torch.cat([out.reshape(spare, D), out.new_zeros(1, D)])      # spare row reads as 0
    picked = out.index_select(0, dest).view(T, k, D)
    return (picked * (gates * keep).unsqueeze(-1)).sum(dim=1), keep


def sort_dispatch(x, gates, indices, w_gate_up, w_down, backend: str = "torch",
                  capacity_factor: float | None = None):
    """MegaBlocks dispatch: permute, grouped SwiGLU, gated unpermute. (y [T, D], keep [T, k]).

    capacity_factor None: dropless, and keep is None (every assignment is kept).

    backend "triton": the Triton kernels (the GPU path; the interpreter on a CPU);
    backend "torch": torch index ops and torch's grouped GEMM (the sensible CPU path).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    E = w_gate_up.shape[0]
    keep, buckets = None, E
    if capacity_factor is not None:
        T, k = indices.shape
        _, keep = capacity_slots(indices, E, capacity(T, k, E, capacity_factor))
        # bucket E holds the dropped assignments: sorted last, past Σ group_sizes[:E]
        indices, buckets = torch.where(keep, indices, E), E + 1
    if backend == "triton":
        perm, gmm, unperm = permute, grouped_matmul, unpermute
    else:
        perm, gmm, unperm = permute_reference, grouped_matmul_torch, unpermute_reference
    xs, group_sizes, positions = perm(x, indices, buckets)          # [T·k, D] by expert
    group_sizes = group_sizes[:E]
    gate, up = gmm(xs, w_gate_up, group_sizes).chunk(2, dim=-1)      # [T·k, F] each
    ys = gmm((F.silu(gate) * up).contiguous(), w_down, group_sizes)  # [T·k, D], dropped = 0
    return unperm(ys, positions, gates), keep
