"""Base decoder LLMs (`Qwen2ForCausalLM`, `Olmo2ForCausalLM`, `OlmoeForCausalLM`), as
`save_pretrained` writes them: config and names -> the decoder of a Molmo built from base models.

`llm.new_embedding` is not in a base checkpoint: the caller initialises it. Which HF norm feeds
which of ours depends on the block: pre-norm models norm the sublayer inputs, OLMo-2 (norm_after)
the sublayer outputs (docs/architecture.md#weight-conversion).
"""
from __future__ import annotations

import numpy as np

from molmo_jax.weights.errors import WeightsError, require
from molmo_jax.weights.rules import IDENTITY, StateDict, linear, map_state, reshape, rule, stack_linear, transposed_last2

SUPPORTED_LLMS = ("qwen2", "olmo2", "olmoe")


def ignore(key: str) -> bool:
    """Non-parameter buffers that older checkpoints carry."""
    return key.endswith("rotary_emb.inv_freq")


def _rope_theta(d: dict, what: str) -> float:
    """RoPE theta from either the transformers 5 `rope_parameters` or the older `rope_theta` /
    `rope_scaling` fields; any scaling is refused (our RoPE is the plain one)."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling")
    for name, value in (("rope_parameters", params), ("rope_scaling", scaling or {})):
        kind = value.get("rope_type", value.get("type", "default"))
        if kind != "default":
            raise WeightsError(f"{what} config: {name} of type {kind!r} is not supported "
                               "(only unscaled RoPE)")
    return float(params.get("rope_theta", d.get("rope_theta", 10000.0)))


def llm_config_from_hf(hf_config: dict) -> dict:
    """Values for `config.llm_config(...)` from a Qwen2 / OLMo-2 / OLMoE `config.json`.

    `vocab_size` and `embedding_size` are both set to the checkpoint's embedding rows; Molmo's
    image tokens sit at `vocab_size + 0..4`, so a caller whose tokenizer is smaller than the
    embedding (OLMoE: 50280 of 50304 rows) lowers `vocab_size`. `additional_vocab_size`,
    `max_sequence_length` and dropout are Molmo's choices and are not set here.
    """
    d = hf_config
    kind = d.get("model_type")
    if kind not in SUPPORTED_LLMS:
        raise WeightsError(f"HF config model_type={kind!r} is not supported "
                           f"(supported: {', '.join(SUPPORTED_LLMS)})")
    what = f"{kind} config"

    def refuse(field, value, why):
        raise WeightsError(f"{what}: {field}={value!r} is not supported ({why})")

    if d.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", d["hidden_act"], "the MLP is SwiGLU with silu")
    theta = _rope_theta(d, what)
    layer_types = d.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        refuse("layer_types", sorted(set(layer_types)), "only full attention")
    n_layers = require(d, "num_hidden_layers", what)
    if d.get("use_sliding_window") and d.get("sliding_window") and d.get("max_window_layers", 0) < n_layers:
        refuse("use_sliding_window", True, f"layers from max_window_layers={d.get('max_window_layers')} "
               "on would use a sliding window")
    if d.get("clip_qkv") is not None:
        # HF OLMoE clamps q and k after their norms, ours before: not the same function.
        refuse("clip_qkv", d["clip_qkv"], "HF clamps after QK-norm, molmo_jax before")
    if kind in ("olmo2", "olmoe") and d.get("attention_bias"):
        refuse("attention_bias", True, "no bias on the attention projections for OLMo models")
    if d.get("mlp_bias"):
        refuse("mlp_bias", True, "the MLP has no biases")

    hidden, heads = require(d, "hidden_size", what), require(d, "num_attention_heads", what)
    head_dim = d.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            refuse("hidden_size", hidden, f"not divisible by num_attention_heads={heads}")
        head_dim = hidden // heads
    kv_heads = d.get("num_key_value_heads") or heads
    if heads % kv_heads:
        refuse("num_key_value_heads", kv_heads, f"must divide num_attention_heads={heads}")
    vocab = require(d, "vocab_size", what)
    values = dict(
        d_model=hidden, n_layers=n_layers, n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim,
        mlp_dim=require(d, "intermediate_size", what), vocab_size=vocab, embedding_size=vocab,
        qkv_bias=kind == "qwen2", qk_norm=kind in ("olmo2", "olmoe"), norm_after=kind == "olmo2",
        norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta, clip_qkv=0.0,
        moe_num_experts=0, moe_top_k=0,
    )
    if kind == "olmoe":
        if d.get("norm_topk_prob"):
            refuse("norm_topk_prob", True, "OLMoE combines the un-renormalised top-k probabilities")
        values.update(moe_num_experts=require(d, "num_experts", what),
                      moe_top_k=require(d, "num_experts_per_tok", what))
    # Molmo uses the LLM's EOS as BOS too (docs/architecture.md#p12-eos-as-bos).
    eos = d.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    if isinstance(eos, int):
        values.update(bos_token_id=eos, eos_token_id=eos)
    return values


def _gate_up(e: int, f: int):
    """transformers 5's fused experts.gate_up_proj [E, 2F, d] (gate rows first) <-> our gate, up [E, d, F]."""
    def to_jax(xs):
        return [xs[0][:, :f].transpose(0, 2, 1), xs[0][:, f:].transpose(0, 2, 1)]

    def to_torch(xs):
        return [np.ascontiguousarray(np.concatenate([x.transpose(0, 2, 1) for x in xs], axis=1))]
    return to_jax, to_torch


def rules(cfg, keys=(), tie_word_embeddings: bool = False) -> list:
    """Decoder names -> our `llm.*` parameters. `keys` (the checkpoint's) decide between the
    per-expert and the fused expert layouts, and whether a tied head has its own `lm_head`."""
    l = cfg.llm
    d, hq, hkv, hd, e, n = l.d_model, l.n_heads, l.n_kv_heads, l.head_dim, l.moe_num_experts, l.n_layers
    keys = set(keys)
    head = "model.embed_tokens.weight" if tie_word_embeddings and "lm_head.weight" not in keys else "lm_head.weight"
    out = [
        rule("model.embed_tokens.weight", "llm.embedding", IDENTITY),
        rule("model.norm.weight", "llm.ln_f.weight", IDENTITY),
        rule(head, "llm.ff_out.kernel", linear()),
    ]
    b, a, k = "model.layers.{i}.", "model.layers.{i}.self_attn.", "llm.blocks."
    for ours, theirs, heads in (("wq", "q_proj", hq), ("wk", "k_proj", hkv), ("wv", "v_proj", hkv)):
        out.append(rule(f"{a}{theirs}.weight", f"{k}attn.{ours}.kernel", linear((heads, hd)), n))
        if l.qkv_bias:
            out.append(rule(f"{a}{theirs}.bias", f"{k}attn.{ours}.bias", reshape((heads, hd)), n))
    out.append(rule(a + "o_proj.weight", k + "attn.wo.kernel", linear((d,), (hq, hd)), n))
    if l.qk_norm:  # over the whole projected width, before the head split
        out.append(rule(a + "q_norm.weight", k + "attn.q_norm.weight", IDENTITY, n))
        out.append(rule(a + "k_norm.weight", k + "attn.k_norm.weight", IDENTITY, n))
    norms = ({"attn_norm": "post_attention_layernorm", "ff_norm": "post_feedforward_layernorm"}
             if l.norm_after else {"attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm"})
    for ours, theirs in norms.items():
        out.append(rule(f"{b}{theirs}.weight", f"{k}{ours}.weight", IDENTITY, n))
    m = b + "mlp."
    if not e:
        for ours, theirs in (("w_up", "up_proj"), ("w_gate", "gate_proj"), ("w_down", "down_proj")):
            out.append(rule(f"{m}{theirs}.weight", f"{k}ffn.{ours}.kernel", linear(), n))
        return out
    out.append(rule(m + "gate.weight", k + "ffn.router.kernel", linear(), n))
    if "model.layers.0.mlp.experts.gate_up_proj" in keys:  # transformers 5 in-memory layout
        out.append(rule(m + "experts.gate_up_proj", (k + "ffn.w_gate", k + "ffn.w_up"), _gate_up(e, l.mlp_dim), n))
        out.append(rule(m + "experts.down_proj", k + "ffn.w_down", transposed_last2(), n))
        return out
    for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
        expert_keys = [f"{m}experts.{j}.{theirs}.weight" for j in range(e)]
        out.append(rule(expert_keys, f"{k}ffn.{ours}", stack_linear(e), n))
    return out


def from_state(state: dict, cfg, tie_word_embeddings: bool = False) -> dict:
    """{our `llm.*` path: array} (all but `new_embedding`) from an in-memory state dict, checked like a file."""
    return map_state(rules(cfg, state.keys(), tie_word_embeddings), cfg, StateDict(state, "LLM state dict"), ignore)
