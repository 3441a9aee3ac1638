"""A small Llama-style decoder: RMSNorm, rotary positions (RoPE), grouped-query attention, SwiGLU.

Module names follow Hugging Face's ``LlamaForCausalLM`` (q_proj, gate_proj, ...), and RoPE uses
its "rotate half" layout, so weights map one to one (shared/models/hf.py proves equal logits).

Plain training calls ``Llama(tokens)`` or, stage by stage, ``embed -> layers[i:j] -> norm ->
lm_head`` with ``Block(x)``: positions start at 0 and attention is causal. Decoding passes a KV
cache (shared/inference/kv_cache.py) and per-sequence start positions as keywords.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be a multiple of n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError("rope_theta and norm_eps must be positive")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 (as Llama does)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(config: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_seq_len, head_dim], angle(pos, i) = pos * theta^(-2i/head_dim)."""
    hd = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.arange(config.max_seq_len, dtype=torch.float32)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)  # "rotate half" layout: pairs (i, i + hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; cos/sin: [B, 1, T, hd]. Rotates each pair (x_i, x_{i+hd/2})."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Causal grouped-query attention: n_kv_heads key/value heads shared by n_heads queries."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads, config.n_kv_heads, config.head_dim)
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin, positions=None, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [B, H(kv), T, hd]
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            # The cache stores k, v at their absolute positions and returns keys 0..S-1.
            # Key j is visible to a query at position p iff j <= p: that is causal, and it
            # hides whatever a rolled-back sequence left beyond its length.
            k_all, v_all = cache.update(self.layer_idx, k, v, positions)  # [B, Hkv, S, hd]
            S = k_all.shape[2]
            mask = torch.arange(S, device=x.device) <= positions[:, :, None]  # [B, T, S]
            out = F.scaled_dot_product_attention(
                q, k_all, v_all, attn_mask=mask[:, None], enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


FFNFactory = Callable[[LlamaConfig, int], nn.Module]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then h + ffn(norm(h)). [B,T,D] -> [B,T,D].

    ``start_pos`` (int or int64 [B]) is each sequence's position of x[:, 0]; default 0.
    ``positions`` (int64 [B, T], from `positions_for`) replaces it: Llama computes them once
    for all its blocks. ``cache`` (a KVCache) makes attention see earlier positions too.
    """

    def __init__(self, config: LlamaConfig, layer_idx: int, ffn: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = ffn if ffn is not None else SwiGLU(config)
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, *, start_pos=None, cache=None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            positions = positions_for(x.shape[0], x.shape[1], start_pos, self.config, x.device)
        cos = self.rope_cos[positions].unsqueeze(1).to(x.dtype)  # [B, 1, T, hd]
        sin = self.rope_sin[positions].unsqueeze(1).to(x.dtype)
        h = x + self.attn(self.attn_norm(x), cos, sin, positions, cache)
        return h + self.ffn(self.ffn_norm(h))


def debug_checks() -> bool:
    """KC_DEBUG=1 (or true/yes/on): also run the checks that read device values back to the
    host (each one stalls the host until a GPU catches up). Read at each call, so a test or a
    notebook can switch it on for one run."""
    return os.environ.get("KC_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}


def positions_for(B: int, T: int, start_pos, config: LlamaConfig, device) -> torch.Tensor:
    """Absolute positions [B, T] = start_pos[:, None] + arange(T), checked against max_seq_len.

    An int start is checked on the host. A tensor start lives on the device (decoding passes
    the cache's lengths): reading it back would stall the host at every forward, so it is
    checked only under KC_DEBUG=1 (debug_checks); otherwise an out of
    range position fails in the rotary-table lookup."""
    start_pos = 0 if start_pos is None else start_pos
    if isinstance(start_pos, int):
        if start_pos < 0 or start_pos + T > config.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + T - 1} fall outside "
                             f"[0, max_seq_len={config.max_seq_len})")
        return torch.arange(start_pos, start_pos + T, device=device).expand(B, T)
    start = start_pos.to(device=device, dtype=torch.long).reshape(-1)
    if start.numel() not in (1, B):
        raise ValueError(f"start_pos must be an int or have shape [{B}], got {tuple(start.shape)}")
    positions = start.expand(B)[:, None] + torch.arange(T, device=device)
    if debug_checks() and (positions.min() < 0 or positions.max() >= config.max_seq_len):
        raise ValueError(
            f"positions {int(positions.min())}..{int(positions.max())} fall outside "
            f"[0, max_seq_len={config.max_seq_len})")
    return positions


class Llama(nn.Module):
    """tokens [B, T] -> logits [B, T, vocab]. ``ffn_factory(config, layer_idx)`` replaces SwiGLU."""

    def __init__(self, config: LlamaConfig, ffn_factory: FFNFactory | None = None):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(
            Block(config, i, ffn_factory(config, i) if ffn_factory else None)
            for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.apply(self._init)
        for block in self.layers:  # GPT-2 style: residual writes scaled by 1/sqrt(2 n_layers)
            for name, p in block.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    nn.init.normal_(p, std=0.02 / (2 * config.n_layers) ** 0.5)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, *, start_pos=None, cache=None,
                n_layers: int | None = None) -> torch.Tensor:
        """Logits [B, T, V]. With ``n_layers=k`` only the first k blocks run and the shared
        norm + lm_head read their output: the early exit LayerSkip drafts with.

        With a cache and no ``start_pos``, each sequence continues at ``cache.lengths``; the
        cache's lengths are not advanced here (the caller decides what to keep).
        """
        if tokens.ndim != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be int64 [B, T], got {tokens.dtype} "
                             f"{tuple(tokens.shape)}")
        k = self.config.n_layers if n_layers is None else n_layers
        if not 1 <= k <= self.config.n_layers:
            raise ValueError(f"n_layers must be in [1, {self.config.n_layers}], got {k}")
        if cache is not None and start_pos is None:
            start_pos = cache.lengths
        positions = positions_for(*tokens.shape, start_pos, self.config, tokens.device)
        h = self.embed(tokens)
        for block in self.layers[:k]:  # positions once for all blocks: no per-layer work
            h = block(h, cache=cache, positions=positions)
        return self.lm_head(self.norm(h))

    def forward_with_exit(self, tokens: torch.Tensor, exit_layer: int):
        """(logits of the full model, logits after `exit_layer` blocks), one pass: for training
        with LayerSkip's early-exit loss (Elhoushi et al. 2024)."""
        if not 1 <= exit_layer <= self.config.n_layers:
            raise ValueError(f"exit_layer must be in [1, {self.config.n_layers}]")
        h = self.embed(tokens)
        early = None
        for i, block in enumerate(self.layers):
            h = block(h)
            if i + 1 == exit_layer:
                early = self.lm_head(self.norm(h))
        return self.lm_head(self.norm(h)), early

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
