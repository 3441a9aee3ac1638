"""The bridge to Hugging Face transformers: our Llama's weights in a ``LlamaForCausalLM``.

Built from a config, never downloaded. Module names and the RoPE layout match (llama.py), so the
state dict maps by adding the ``model.`` prefix; equal logits (tests/test_models.py) prove the
model is a real Llama, and let the lab compare our decoder with transformers' own.
"""

from __future__ import annotations

import torch

# transformers probes for Hugging Face's own `kernels` package by importing the top-level name
# `kernels`, which is ours: it must be imported (it picks Triton's mode) before triton is.
import kernels  # noqa: F401
from shared.models.llama import Llama, LlamaConfig

# our name -> transformers' name, within a block
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "ffn.gate_proj.weight": "mlp.gate_proj.weight",
    "ffn.up_proj.weight": "mlp.up_proj.weight",
    "ffn.down_proj.weight": "mlp.down_proj.weight",
}


def hf_config(config: LlamaConfig):
    from transformers import LlamaConfig as HFLlamaConfig

    return HFLlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim,
        intermediate_size=config.ffn_dim, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, hidden_act="silu",
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def hf_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": model.embed.weight,
           "model.norm.weight": model.norm.weight, "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.layers):
        for name, tensor in block.state_dict().items():
            if name not in _BLOCK_NAMES:
                raise ValueError(f"layer {i} has {name!r}, which LlamaForCausalLM does not have "
                                 "(a replaced FFN cannot be exported)")
            out[f"model.layers.{i}.{_BLOCK_NAMES[name]}"] = tensor
    return out


def to_hf(model: Llama, *, attn_implementation: str = "sdpa"):
    """A ``transformers.LlamaForCausalLM`` holding copies of `model`'s weights, in eval mode."""
    from transformers import LlamaForCausalLM

    cfg = hf_config(model.config)
    cfg._attn_implementation = attn_implementation
    weight = model.lm_head.weight
    hf = LlamaForCausalLM(cfg).to(device=weight.device, dtype=weight.dtype)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    return hf.eval()
