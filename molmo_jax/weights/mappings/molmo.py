"""Molmo in PyTorch: the original training repo's and the released Hugging Face checkpoints.

Config formats understood:
  * the original repo's `ModelConfig` dict (`config.json` next to its `model.safetensors`);
  * the released Hugging Face `config.json` (MolmoForCausalLM remote code). It describes the decoder
    only; its vision side is fixed (CLIP ViT-L/14-336, 23 layers, released connector and
    preprocessing). Everything else a molmo_jax config holds goes into the extra key `"molmo_jax"`
    (sections `vit`, `connector`, `image`, `llm`, `top`), which the remote code ignores and
    `config_from_released` applies, so import(export(cfg)) == cfg.

Names: `rules(cfg)` lists every parameter of the original `Molmo` module (keys as in the released
checkpoints, without the `model.` prefix) with the parameter path(s) it becomes and the array
transforms both ways (docs/architecture.md#weight-conversion).
"""
from __future__ import annotations

import numpy as np

from molmo_jax import config as config_lib
from molmo_jax.weights.configs import tuples
from molmo_jax.weights.errors import WeightsError
from molmo_jax.weights.rules import IDENTITY, linear, reshape, rule, split_rows

PREFIX = "model."
NEEDS_REMOTE_CODE = True  # transformers loads the released layout with the release's modeling code


def _unsupported(field, value, allowed):
    raise WeightsError(f"config field {field}={value!r} is not supported by molmo_jax (supported: {allowed})")


def config_from_original(d: dict, name: str = "imported"):
    """molmo_jax config from the original repo's ModelConfig dict."""
    if d.get("layer_norm_type", "rms") != "rms":
        _unsupported("layer_norm_type", d.get("layer_norm_type"), "rms")
    if d.get("block_type", "sequential") not in ("sequential", "moe"):
        _unsupported("block_type", d.get("block_type"), "sequential, moe")
    if d.get("activation_type", "swiglu") != "swiglu":
        _unsupported("activation_type", d.get("activation_type"), "swiglu")
    if d.get("weight_tying"):
        _unsupported("weight_tying", True, "False")
    if d.get("include_bias"):
        _unsupported("include_bias", True, "False")
    if d.get("block_group_size", 1) != 1:
        _unsupported("block_group_size", d.get("block_group_size"), "1")
    vb = d.get("vision_backbone") or {}
    if vb.get("image_model_type", "openai") != "openai":
        _unsupported("vision_backbone.image_model_type", vb.get("image_model_type"), "openai")
    n_heads = d["n_heads"]
    moe = d.get("block_type") == "moe"
    llm = config_lib.llm_config(
        d_model=d["d_model"], n_layers=d["n_layers"], n_heads=n_heads,
        n_kv_heads=d.get("n_kv_heads") or n_heads,
        head_dim=d.get("head_dim") or d["d_model"] // n_heads,
        mlp_dim=(d.get("mlp_hidden_size") or d["mlp_ratio"] * d["d_model"]) // 2,
        vocab_size=d["vocab_size"], embedding_size=d.get("embedding_size") or d["vocab_size"],
        additional_vocab_size=d.get("additional_vocab_size") or 0,
        qkv_bias=bool(d.get("qkv_bias")), qk_norm=bool(d.get("attention_layer_norm")),
        norm_after=bool(d.get("norm_after")), norm_eps=d.get("layer_norm_eps") or 1e-5,
        rope_theta=float(d.get("rope_theta", 10000.0)), clip_qkv=float(d.get("clip_qkv") or 0.0),
        max_sequence_length=d.get("max_sequence_length", 4096),
        moe_num_experts=d.get("moe_num_experts", 0) if moe else 0,
        moe_top_k=d.get("moe_top_k", 0) if moe else 0,
        residual_dropout=d.get("residual_dropout", 0.0),
        response_residual_dropout=d.get("response_residual_dropout", 0.0),
        attention_dropout=d.get("attention_dropout", 0.0),
    )
    vit = config_lib.vit_config(
        image_size=tuple(vb.get("image_default_input_size", (336, 336))),
        patch_size=vb.get("image_patch_size", 14), width=vb.get("image_emb_dim", 1024),
        n_layers=vb.get("image_num_layers", 23), n_heads=vb.get("image_num_heads", 16),
        head_dim=vb.get("image_head_dim", 64), mlp_dim=vb.get("image_mlp_dim", 4096),
        norm_eps=vb.get("image_norm_eps", 1e-5), activation=vb.get("image_mlp_activations", "quick_gelu"),
        vit_layers=tuple(d.get("vit_layers", (-2, -9))),
    )
    connector = config_lib.connector_config(
        padding_embed=d.get("image_padding_embed") or "none",
        pooling=d.get("image_pooling_2d", "attention_meanq"),
        pool_h=d.get("image_pooling_h", 2), pool_w=d.get("image_pooling_w", 2),
        projector=d.get("image_projector", "mlp"),
        image_feature_dropout=d.get("image_feature_dropout", 0.0),
    )
    image = config_lib.image_config(
        crop_mode=d.get("crop_mode", "overlap-and-resize-c2"), max_crops=d.get("max_crops", 12),
        overlap_margins=tuple(d.get("overlap_margins", (4, 4))), use_col_tokens=d.get("use_col_tokens", True),
        pad_value=d.get("pad_value", 0.0), legacy_mask_shift=not d.get("fix_image_padding", False),
    )
    return config_lib.model_config(name, llm, vit=vit, connector=connector, image=image)


def config_from_released(d: dict, name: str = "imported"):
    """molmo_jax config from a released HF Molmo `config.json` (vision fixed as released), with the
    `"molmo_jax"` extras of our own exports applied."""
    if d.get("layer_norm_type", "rms") != "rms":
        _unsupported("layer_norm_type", d.get("layer_norm_type"), "rms")
    n_heads = d["num_attention_heads"]
    moe = bool(d.get("moe_num_experts"))
    llm = config_lib.llm_config(
        d_model=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=d.get("num_key_value_heads") or n_heads, head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
        mlp_dim=d["intermediate_size"] // 2, vocab_size=d["vocab_size"],
        embedding_size=d.get("embedding_size") or d["vocab_size"],
        additional_vocab_size=d.get("additional_vocab_size", 128),
        qkv_bias=bool(d.get("qkv_bias")), qk_norm=bool(d.get("attention_layer_norm")),
        norm_after=bool(d.get("norm_after")), norm_eps=d.get("layer_norm_eps", 1e-5),
        rope_theta=float(d.get("rope_theta", 10000.0)), clip_qkv=float(d.get("clip_qkv") or 0.0),
        max_sequence_length=d.get("max_position_embeddings") or 4096,
        moe_num_experts=d.get("moe_num_experts", 0) if moe else 0,
        moe_top_k=d.get("moe_top_k", 0) if moe else 0,
    )
    cfg = config_lib.model_config(name, llm)
    extra = d.get(EXTRA) or {}
    for part in ("vit", "connector", "image", "llm"):
        cfg[part].update(tuples(extra.get(part, {})))
    cfg.update(tuples(extra.get("top", {})))
    return cfg


def remote_code_problem(cfg) -> str | None:
    """Why the released remote code cannot run this model, or None. That code reads only the decoder
    from config.json: it builds the vision tower (CLIP ViT-L/14 at 336 px, two layers' features) and the
    connector with the released sizes, so a model with another tower (tiny, demo, custom) would not load."""
    released = config_lib.get_config("molmo_7b_d")
    for part in ("vit", "connector"):
        for key, want in released[part].items():
            have = cfg[part].get(key)
            if key != "image_feature_dropout" and tuples(have) != tuples(want):
                return f"{part}.{key} is {have!r} where the released code builds {want!r}"
    return None


EXTRA = "molmo_jax"
TOP_LEVEL = ("name", "family", "dtype", "param_dtype", "remat", "scan_unroll", "attention")


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


def llm_block_rules(cfg, b: str, attn: str = "", mlp: str = "") -> list:
    """One decoder block's names (`b` the block prefix with "{i}", `attn` / `mlp` the sub-module
    prefixes Molmo2 nests them under) -> our `llm.blocks.*`: fused q|k|v and up|gate, split here."""
    l = cfg.llm
    d, hq, hkv, hd, f, n = l.d_model, l.n_heads, l.n_kv_heads, l.head_dim, l.mlp_dim, l.n_layers
    j, a, m = "llm.blocks.", b + attn, b + mlp
    out = [rule(a + "att_proj.weight", (j + "attn.wq.kernel", j + "attn.wk.kernel", j + "attn.wv.kernel"),
                split_rows((hq * hd, hkv * hd, hkv * hd), ((d, hq, hd), (d, hkv, hd), (d, hkv, hd))), n)]
    if l.qkv_bias:
        out.append(rule(a + "att_proj.bias", (j + "attn.wq.bias", j + "attn.wk.bias", j + "attn.wv.bias"),
                        split_rows((hq * hd, hkv * hd, hkv * hd), ((hq, hd), (hkv, hd), (hkv, hd)), transpose=False),
                        n))
    out.append(rule(a + "attn_out.weight", j + "attn.wo.kernel", linear((d,), (hq, hd)), n))
    out.append(rule(b + "attn_norm.weight", j + "attn_norm.weight", IDENTITY, n))
    out.append(rule(b + "ff_norm.weight", j + "ff_norm.weight", IDENTITY, n))
    if l.qk_norm:
        out.append(rule(a + "q_norm.weight", j + "attn.q_norm.weight", IDENTITY, n))
        out.append(rule(a + "k_norm.weight", j + "attn.k_norm.weight", IDENTITY, n))
    if l.moe_num_experts:
        e = l.moe_num_experts
        out.append(rule(m + "ffn.router.layer.weight", j + "ffn.router.kernel", linear(), n))
        expert_in = ((lambda xs: [xs[0].reshape(e, f, d).transpose(0, 2, 1)]),
                     (lambda xs: [np.ascontiguousarray(xs[0].transpose(0, 2, 1)).reshape(e * f, d)]))
        out.append(rule(m + "ffn.experts.mlp.w1", j + "ffn.w_gate", expert_in, n))
        out.append(rule(m + "ffn.experts.mlp.v1", j + "ffn.w_up", expert_in, n))
        out.append(rule(m + "ffn.experts.mlp.w2", j + "ffn.w_down", reshape((e, f, d)), n))
    else:
        out.append(rule(m + "ff_proj.weight", (j + "ffn.w_up.kernel", j + "ffn.w_gate.kernel"),
                        split_rows((f, f), ((d, f), (d, f))), n))
        out.append(rule(m + "ff_out.weight", j + "ffn.w_down.kernel", linear(), n))
    return out


def vit_rules(cfg, p: str) -> list:
    """The ViT under prefix `p` -> our `vision.*` (class token, pre-norm and patch bias as the
    config has them; kv heads for grouped-query towers)."""
    v = cfg.vit
    vh, vhd, vd, n = v.n_heads, v.head_dim, v.width, v.n_layers
    heads = {"wq": vh, "wk": v.get("n_kv_heads", vh), "wv": v.get("n_kv_heads", vh)}
    out = []
    if v.get("class_token", True):
        out.append(rule(p + "class_embedding", "vision.class_embedding", IDENTITY))
    out.append(rule(p + "positional_embedding", "vision.positional_embedding", IDENTITY))
    out.append(rule(p + "patch_embedding.weight", "vision.patch_embedding.kernel", linear()))
    if v.get("patch_bias", False):
        out.append(rule(p + "patch_embedding.bias", "vision.patch_embedding.bias", IDENTITY))
    if v.get("pre_ln", True):
        out.append(rule(p + "pre_ln.weight", "vision.pre_ln.weight", IDENTITY))
        out.append(rule(p + "pre_ln.bias", "vision.pre_ln.bias", IDENTITY))
    r = p + "transformer.resblocks.{i}."
    out += attention_rules(r + "attention.", "vision.blocks.", heads, vhd, vd, n)
    for name in ("attention_norm", "ffn_norm"):
        out.append(rule(r + f"{name}.weight", f"vision.blocks.{name}.weight", IDENTITY, n))
        out.append(rule(r + f"{name}.bias", f"vision.blocks.{name}.bias", IDENTITY, n))
    for w in ("w1", "w2"):
        out.append(rule(r + f"feed_forward.{w}.weight", f"vision.blocks.{w}.kernel", linear(), n))
        out.append(rule(r + f"feed_forward.{w}.bias", f"vision.blocks.{w}.bias", IDENTITY, n))
    return out


def attention_rules(key: str, path: str, heads: dict, hd: int, width: int, n_layers=None) -> list:
    """Biased wq / wk / wv ({name: heads}) and wo of an attention (the ViT's, the pooling's)."""
    out = []
    for w, h in heads.items():
        out.append(rule(key + f"{w}.weight", path + f"{w}.kernel", linear((h, hd)), n_layers))
        out.append(rule(key + f"{w}.bias", path + f"{w}.bias", reshape((h, hd)), n_layers))
    out.append(rule(key + "wo.weight", path + "wo.kernel", linear((width,), (heads["wq"], hd)), n_layers))
    out.append(rule(key + "wo.bias", path + "wo.bias", IDENTITY, n_layers))
    return out


def projector_rules(key: str, ws=("w1", "w2", "w3")) -> list:
    """The SwiGLU projector (w1 gate, w3 up, w2 down) or, alone, a linear one."""
    return [rule(key + (f"{w}.weight" if len(ws) > 1 else "weight"), f"connector.{w}.kernel", linear()) for w in ws]


def rules(cfg, tensors=None) -> list:
    """Every parameter of a Molmo (`tensors`, the checkpoint's, changes nothing here)."""
    l, v, c = cfg.llm, cfg.vit, cfg.connector
    out = [rule("transformer.wte.embedding", "llm.embedding", IDENTITY)]
    if l.additional_vocab_size:
        out.append(rule("transformer.wte.new_embedding", "llm.new_embedding", IDENTITY))
    out.append(rule("transformer.ln_f.weight", "llm.ln_f.weight", IDENTITY))
    out.append(rule("transformer.ff_out.weight", "llm.ff_out.kernel", linear()))
    out += llm_block_rules(cfg, "transformer.blocks.{i}.")
    out += vit_rules(cfg, "vision_backbone.image_vit.")
    if c.padding_embed != "none":
        out.append(rule("vision_backbone.pad_embed", "connector.pad_embed", IDENTITY))
    if c.pooling.startswith("attention"):
        heads = {w: v.n_heads for w in ("wq", "wk", "wv")}
        out += attention_rules("vision_backbone.image_pooling_2d.", "connector.", heads, v.head_dim, v.width)
    ws = ("w1", "w2", "w3") if c.projector == "mlp" else ("w1",)
    return out + projector_rules("vision_backbone.image_projector.", ws)
