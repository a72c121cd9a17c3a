"""The original's (PyTorch) formats: its config dicts and its parameter naming.

Two directions, one table. `RULES` lists every parameter of the original `Molmo` module (keys as in
the released checkpoints without the `model.` prefix, spec section 11) with the molmo_jax parameter
path(s) it becomes and the array transforms both ways. Nothing here imports torch: arrays are numpy.

Config formats understood:
  * the original training repo's `ModelConfig` dict (the `config.json` of `../golden/models/*`);
  * the released Hugging Face `config.json` (MolmoForCausalLM remote code), whose vision settings are
    fixed to CLIP ViT-L/14-336 with 23 layers.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable

import numpy as np

from molmo_jax import config as config_lib

PREFIX = "model."


class WeightsError(ValueError):
    """A checkpoint that does not match the model: names the file, the key and the shapes."""


# ------------------------------------------------------------------------------------------------
# Config conversion

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


def config_from_hf(d: dict, name: str = "imported"):
    """molmo_jax config from a released HF Molmo `config.json` (vision fixed as released)."""
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
    # Settings molmo_jax writes on export that the released format cannot express (see convert).
    extra = d.get("molmo_jax")
    if extra:
        for part in ("vit", "connector", "image", "llm"):
            cfg[part].update(_tuples(extra.get(part, {})))
        cfg.update(_tuples(extra.get("top", {})))
    return cfg


def _tuples(d):
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def config_from_json(d: dict, name: str = "imported"):
    """Either format, recognised by its keys."""
    if "d_model" in d:
        return config_from_original(d, name)
    if "hidden_size" in d:
        return config_from_hf(d, name)
    raise WeightsError("config.json is neither an original ModelConfig (no 'd_model') nor a released "
                       "HF Molmo config (no 'hidden_size')")


# ------------------------------------------------------------------------------------------------
# Parameter naming

@dataclasses.dataclass(frozen=True)
class Rule:
    torch_keys: tuple[str, ...]          # "{i}" is the layer index for per-layer rules
    paths: tuple[tuple[str, ...], ...]   # molmo_jax parameter paths (stacked over layers if per-layer)
    to_jax: Callable                     # list of torch-layout arrays -> list of jax-layout arrays
    to_torch: Callable                   # inverse
    per_layer: str | None = None         # "llm" or "vit"


def _same(xs):
    return list(xs)


def _linear(out_shape=None, in_shape=None):
    """torch [out, in] <-> jax [*in_shape, *out_shape]."""
    def to_jax(xs):
        w = xs[0].T
        return [w.reshape(tuple(in_shape or w.shape[:1]) + tuple(out_shape or w.shape[1:]))]

    def to_torch(xs):
        w = xs[0]
        n_in = len(in_shape) if in_shape else 1
        w = w.reshape(int(np.prod(w.shape[:n_in])), -1)
        return [np.ascontiguousarray(w.T)]
    return to_jax, to_torch


def _reshape(shape):
    return (lambda xs: [xs[0].reshape(shape)]), (lambda xs: [xs[0].reshape(-1)])


def _split_rows(sizes, shapes, transpose=True):
    """One fused torch tensor (rows concatenated) <-> several jax tensors."""
    def to_jax(xs):
        parts = np.split(xs[0], np.cumsum(sizes)[:-1], axis=0)
        return [(p.T if transpose and p.ndim == 2 else p).reshape(s) for p, s in zip(parts, shapes)]

    def to_torch(xs):
        flat = []
        for x in xs:
            if transpose and x.ndim >= 2:
                flat.append(x.reshape(x.shape[0], -1).T)
            else:
                flat.append(x.reshape(-1))
        return [np.ascontiguousarray(np.concatenate(flat, axis=0))]
    return to_jax, to_torch


def rules(cfg) -> list[Rule]:
    l, v = cfg.llm, cfg.vit
    d, hq, hkv, hd, f = l.d_model, l.n_heads, l.n_kv_heads, l.head_dim, l.mlp_dim
    out: list[Rule] = []

    def add(keys, paths, fns, per_layer=None):
        keys = (keys,) if isinstance(keys, str) else tuple(keys)
        paths = tuple(tuple(p.split(".")) for p in ((paths,) if isinstance(paths, str) else paths))
        out.append(Rule(keys, paths, fns[0], fns[1], per_layer))

    ident = (_same, _same)
    # LLM
    add("transformer.wte.embedding", "llm.embedding", ident)
    if l.additional_vocab_size:
        add("transformer.wte.new_embedding", "llm.new_embedding", ident)
    add("transformer.ln_f.weight", "llm.ln_f.weight", ident)
    add("transformer.ff_out.weight", "llm.ff_out.kernel", _linear())
    b = "transformer.blocks.{i}."
    j = "llm.blocks."
    add(b + "att_proj.weight", (j + "attn.wq.kernel", j + "attn.wk.kernel", j + "attn.wv.kernel"),
        _split_rows((hq * hd, hkv * hd, hkv * hd), ((d, hq, hd), (d, hkv, hd), (d, hkv, hd))), "llm")
    if l.qkv_bias:
        add(b + "att_proj.bias", (j + "attn.wq.bias", j + "attn.wk.bias", j + "attn.wv.bias"),
            _split_rows((hq * hd, hkv * hd, hkv * hd), ((hq, hd), (hkv, hd), (hkv, hd)), transpose=False), "llm")
    add(b + "attn_out.weight", j + "attn.wo.kernel", _linear((d,), (hq, hd)), "llm")
    add(b + "attn_norm.weight", j + "attn_norm.weight", ident, "llm")
    add(b + "ff_norm.weight", j + "ff_norm.weight", ident, "llm")
    if l.qk_norm:
        add(b + "q_norm.weight", j + "attn.q_norm.weight", ident, "llm")
        add(b + "k_norm.weight", j + "attn.k_norm.weight", ident, "llm")
    if l.moe_num_experts:
        e = l.moe_num_experts
        add(b + "ffn.router.layer.weight", j + "ffn.router.kernel", _linear(), "llm")
        expert_in = ((lambda xs: [xs[0].reshape(e, f, d).transpose(0, 2, 1)]),
                     (lambda xs: [np.ascontiguousarray(xs[0].transpose(0, 2, 1)).reshape(e * f, d)]))
        add(b + "ffn.experts.mlp.w1", j + "ffn.w_gate", expert_in, "llm")
        add(b + "ffn.experts.mlp.v1", j + "ffn.w_up", expert_in, "llm")
        add(b + "ffn.experts.mlp.w2", j + "ffn.w_down", _reshape((e, f, d)), "llm")
    else:
        add(b + "ff_proj.weight", (j + "ffn.w_up.kernel", j + "ffn.w_gate.kernel"),
            _split_rows((f, f), ((d, f), (d, f))), "llm")
        add(b + "ff_out.weight", j + "ffn.w_down.kernel", _linear(), "llm")
    # ViT
    vh, vhd, vd = v.n_heads, v.head_dim, v.width
    p = "vision_backbone.image_vit."
    add(p + "class_embedding", "vision.class_embedding", ident)
    add(p + "positional_embedding", "vision.positional_embedding", ident)
    add(p + "patch_embedding.weight", "vision.patch_embedding.kernel", _linear())
    add(p + "pre_ln.weight", "vision.pre_ln.weight", ident)
    add(p + "pre_ln.bias", "vision.pre_ln.bias", ident)
    r = p + "transformer.resblocks.{i}."
    k = "vision.blocks."
    for w in ("wq", "wk", "wv"):
        add(r + f"attention.{w}.weight", k + f"{w}.kernel", _linear((vh, vhd)), "vit")
        add(r + f"attention.{w}.bias", k + f"{w}.bias", _reshape((vh, vhd)), "vit")
    add(r + "attention.wo.weight", k + "wo.kernel", _linear((vd,), (vh, vhd)), "vit")
    add(r + "attention.wo.bias", k + "wo.bias", ident, "vit")
    for n in ("attention_norm", "ffn_norm"):
        add(r + f"{n}.weight", k + f"{n}.weight", ident, "vit")
        add(r + f"{n}.bias", k + f"{n}.bias", ident, "vit")
    for w in ("w1", "w2"):
        add(r + f"feed_forward.{w}.weight", k + f"{w}.kernel", _linear(), "vit")
        add(r + f"feed_forward.{w}.bias", k + f"{w}.bias", ident, "vit")
    # Connector
    c = cfg.connector
    if c.padding_embed != "none":
        add("vision_backbone.pad_embed", "connector.pad_embed", ident)
    if c.pooling.startswith("attention"):
        q = "vision_backbone.image_pooling_2d."
        for w in ("wq", "wk", "wv"):
            add(q + f"{w}.weight", f"connector.{w}.kernel", _linear((vh, vhd)))
            add(q + f"{w}.bias", f"connector.{w}.bias", _reshape((vh, vhd)))
        add(q + "wo.weight", "connector.wo.kernel", _linear((vd,), (vh, vhd)))
        add(q + "wo.bias", "connector.wo.bias", ident)
    ws = ("w1", "w2", "w3") if c.projector == "mlp" else ("w1",)
    for w in ws:
        proj_key = "image_projector." + (f"{w}.weight" if c.projector == "mlp" else "weight")
        add("vision_backbone." + proj_key, f"connector.{w}.kernel", _linear())
    return out


def n_layers_of(cfg, which):
    return cfg.llm.n_layers if which == "llm" else cfg.vit.n_layers


def expected_torch_keys(cfg) -> list[str]:
    keys = []
    for rule in rules(cfg):
        for key in rule.torch_keys:
            if rule.per_layer:
                keys += [key.format(i=i) for i in range(n_layers_of(cfg, rule.per_layer))]
            else:
                keys.append(key)
    return keys


def torch_to_flat(cfg, get: Callable[[str], np.ndarray], expected_shapes: dict, source: str = "checkpoint"):
    """Build {jax path: array} from a torch-keyed getter, checking every shape against
    `expected_shapes` ({path: shape}). `get(key)` raises KeyError for a missing key."""
    flat = {}
    for rule in rules(cfg):
        n = n_layers_of(cfg, rule.per_layer) if rule.per_layer else 1
        per_layer = []
        for i in range(n):
            keys = [k.format(i=i) for k in rule.torch_keys]
            arrays = []
            for key in keys:
                try:
                    arrays.append(np.asarray(get(key)))
                except KeyError:
                    raise WeightsError(f"{source}: missing key {PREFIX + key!r}") from None
            try:
                converted = rule.to_jax(arrays)
            except ValueError as e:
                shapes = ", ".join(f"{PREFIX + k!r} {tuple(a.shape)}" for k, a in zip(keys, arrays))
                raise WeightsError(f"{source}: cannot convert {shapes}: {e}") from None
            per_layer.append(converted)
        for j, path in enumerate(rule.paths):
            arr = np.stack([pl[j] for pl in per_layer]) if rule.per_layer else per_layer[0][j]
            want = tuple(expected_shapes[path])
            if tuple(arr.shape) != want:
                key = rule.torch_keys[min(j, len(rule.torch_keys) - 1)].format(i=0)
                raise WeightsError(
                    f"{source}: key {PREFIX + key!r} gives shape {tuple(arr.shape)} for "
                    f"{'.'.join(path)} but the config expects {want}")
            flat[path] = arr
    return flat


def flat_to_torch(cfg, flat: dict) -> dict[str, np.ndarray]:
    """Inverse of torch_to_flat: {jax path: array} -> {"model." + torch key: array}."""
    out = {}
    for rule in rules(cfg):
        arrays = [np.asarray(flat[p]) for p in rule.paths]
        if rule.per_layer:
            for i in range(n_layers_of(cfg, rule.per_layer)):
                for key, a in zip(rule.torch_keys, rule.to_torch([x[i] for x in arrays])):
                    out[PREFIX + key.format(i=i)] = a
        else:
            for key, a in zip(rule.torch_keys, rule.to_torch(arrays)):
                out[PREFIX + key] = a
    return out


def load_json(path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
