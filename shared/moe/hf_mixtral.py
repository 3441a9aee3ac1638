"""The ecosystem's MoE block beside ours: Hugging Face transformers' MixtralSparseMoeBlock.

Built from a MixtralConfig (no download) and loaded with our layer's weights, it must give the
same output; then the two are timed on the same tokens. Mixtral's router is softmax top-k with
the k gates renormalised, i.e. our TopKRouter(renormalize=True). Weight layouts:
  gate.weight [E, D]             = router.weight
  experts.gate_up_proj [E, 2F, D] = w_gate_up [E, D, 2F] transposed (gate rows first, then up)
  experts.down_proj [E, D, F]    = w_down [E, F, D] transposed
`experts_implementation` picks transformers' expert loop: None/"eager" is the per-expert Python
loop a block built from a config runs; "grouped_mm" and "batched_mm" are its newer kernels.
"""

from __future__ import annotations

import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from shared.moe.layer import MoELayer
from shared.moe.routers import TopKRouter


def mixtral_block(layer: MoELayer, experts_implementation: str | None = None):
    """A MixtralSparseMoeBlock computing exactly what `layer` computes (eval mode)."""
    router = layer.router
    if not isinstance(router, TopKRouter) or not router.renormalize:
        raise ValueError("Mixtral's block equals a TopKRouter(renormalize=True) layer only")
    config = MixtralConfig(hidden_size=layer.dim, intermediate_size=layer.ffn_dim,
                           num_local_experts=layer.num_experts, num_experts_per_tok=router.k,
                           router_jitter_noise=0.0, hidden_act="silu")
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    block = MixtralSparseMoeBlock(config).to(layer.w_gate_up.dtype).eval()
    with torch.no_grad():
        block.gate.weight.copy_(router.weight)
        block.experts.gate_up_proj.copy_(layer.w_gate_up.transpose(1, 2))
        block.experts.down_proj.copy_(layer.w_down.transpose(1, 2))
    return block
