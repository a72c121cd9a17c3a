"""The released Hugging Face Molmo `config.json`, written by export and read back by import.

The released format describes the decoder only; its vision side is fixed (CLIP ViT-L/14-336, 23
layers, released connector and preprocessing). Everything else a molmo_jax config holds goes into
the extra key `"molmo_jax"` (sections `vit`, `connector`, `image`, `llm`, `top`), which the released
remote code ignores and `config_from_released` applies, so import(export(cfg)) == cfg.
"""
from __future__ import annotations

from ml_collections import ConfigDict

from molmo_jax import torch_format

EXTRA = "molmo_jax"
TOP_LEVEL = ("name", "dtype", "param_dtype", "remat", "scan_unroll")


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def to_released(cfg, torch_dtype: str) -> dict:
    """The released config fields for the decoder, plus the molmo_jax extras."""
    l = cfg.llm
    out = {
        "architectures": ["MolmoForCausalLM"],
        "auto_map": {"AutoConfig": "config_molmo.MolmoConfig",
                     "AutoModelForCausalLM": "modeling_molmo.MolmoForCausalLM"},
        "attention_layer_norm": bool(l.qk_norm),
        "clip_qkv": float(l.clip_qkv) if l.clip_qkv else None,
        "embedding_size": l.embedding_size,
        "hidden_size": l.d_model,
        "intermediate_size": 2 * l.mlp_dim,  # the fused up|gate width
        "layer_norm_eps": l.norm_eps,
        "layer_norm_type": "rms",
        "max_position_embeddings": l.max_sequence_length,
        "model_type": "molmo",
        "norm_after": bool(l.norm_after),
        "num_attention_heads": l.n_heads,
        "num_hidden_layers": l.n_layers,
        "num_key_value_heads": l.n_kv_heads,
        "qkv_bias": bool(l.qkv_bias),
        "rope_theta": float(l.rope_theta),
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "use_position_ids": True,
        "vocab_size": l.vocab_size,
        "weight_tying": False,
    }
    if l.head_dim != l.d_model // l.n_heads:
        out["head_dim"] = l.head_dim
    if l.additional_vocab_size != 128:
        out["additional_vocab_size"] = l.additional_vocab_size
    if l.moe_num_experts:
        out.update(block_type="moe", moe_num_experts=l.moe_num_experts, moe_top_k=l.moe_top_k)
    out[EXTRA] = {
        "vit": _jsonable(cfg.vit.to_dict()),
        "connector": _jsonable(cfg.connector.to_dict()),
        "image": _jsonable(cfg.image.to_dict()),
        "llm": _jsonable(l.to_dict()),
        "top": {k: cfg[k] for k in TOP_LEVEL if k in cfg},
    }
    return out


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def config_from_released(d: dict, name: str = "imported") -> ConfigDict:
    """molmo_jax config from a released config.json: torch_format reads the decoder fields and the
    `vit`/`connector`/`image` extras; the `llm` and `top` extras of our own exports are applied here."""
    cfg = torch_format.config_from_hf(d, name)
    extra = d.get(EXTRA) or {}
    cfg.llm.update(_tuples(extra.get("llm", {})))
    cfg.update(_tuples(extra.get("top", {})))
    return cfg
