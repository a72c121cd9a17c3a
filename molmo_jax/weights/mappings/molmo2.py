"""Molmo2 in transformers' form (`Molmo2ForConditionalGeneration`): its config.json <-> ours, and its
state-dict names and layouts <-> our parameter paths.

Names: what `save_pretrained` writes (and the released checkpoints hold): the original layout under
`model.` (`transformer.blocks.{i}.self_attn.att_proj` = [q | k | v], `mlp.ff_proj` = [up | gate],
`vision_backbone.image_vit...`, `vision_backbone.image_pooling_2d...`, `image_projector.w1/w2/w3`)
plus `lm_head.weight`; transformers fuses and splits them on loading. The token table is
`wte.embedding` followed by `wte.new_embedding`: the released files split it at `vocab_size`,
`save_pretrained` halves it, so both are read as one table and split at `vocab_size` here; export
writes the released split.

Config: transformers 5's form (`text_config` / `vision_config` / `adapter_config`, `rope_parameters`)
and the released remote-code form (`vit_config`, `qkv_bias`, `layer_norm_eps`, `rope_theta` +
`rope_scaling`, `vit_layers` counted from a 27-layer tower of which 25 are stored) are both read.
Export writes the first, plus the extra key `"molmo_jax"` (our sections), so that
import(export(cfg)) == cfg; transformers keeps unknown keys as attributes and ignores them.
"""
from __future__ import annotations

import numpy as np

from molmo_jax import config_molmo2
from molmo_jax.layers.rope import check_scaling
from molmo_jax.weights.configs import tuples
from molmo_jax.weights.errors import WeightsError, require
from molmo_jax.weights.mappings.clip import CLIP_ACTIVATIONS
from molmo_jax.weights.mappings.molmo import (EXTRA, TOP_LEVEL, attention_rules, llm_block_rules, projector_rules,
                                              vit_rules)
from molmo_jax.weights.rules import IDENTITY, linear, rule

PREFIX = ""             # keys are used whole: most start with "model.", the head is "lm_head.weight"
NEEDS_REMOTE_CODE = False
EMBEDDING, NEW_EMBEDDING = "model.transformer.wte.embedding", "model.transformer.wte.new_embedding"
TOKEN_FIELDS = dict(image_start="image_start_token_id", low_res_image_start="low_res_image_start_token_id",
                    image_end="image_end_token_id", image_patch="image_patch_id",
                    frame_start="frame_start_token_id", frame_end="frame_end_token_id")
EXTRA_SECTIONS = ("vit", "connector", "image", "llm", "tokens")


def _refuse(field, value, why):
    raise WeightsError(f"Molmo2 config: {field}={value!r} is not supported ({why})")


def _rope(text: dict) -> tuple[float, dict]:
    """(theta, scaling dict without theta) from `rope_parameters` or `rope_theta` + `rope_scaling`."""
    params = dict(text.get("rope_parameters") or {})
    theta = params.pop("rope_theta", text.get("rope_theta", 10000.0))
    if not params and text.get("rope_scaling"):
        params = dict(text["rope_scaling"])
    params = {k: v for k, v in params.items() if v is not None}
    params.setdefault("rope_type", params.pop("type", "default"))
    try:
        check_scaling(params, "text_config.rope_parameters")
    except ValueError as e:
        raise WeightsError(f"Molmo2 config: {e}") from None
    return float(theta), params


def config_from_hf(d: dict, name: str = "imported"):
    """molmo_jax config from a transformers Molmo2 `config.json` (either form, see the docstring)."""
    text = require(d, "text_config", "Molmo2")
    legacy = "vit_config" in d and "vision_config" not in d
    vision = d.get("vision_config") or d.get("vit_config") or {}
    adapter = d.get("adapter_config") or {}
    for field, value, ok, why in (
            ("tie_word_embeddings", d.get("tie_word_embeddings"), not d.get("tie_word_embeddings"), "untied head"),
            ("text_config.tie_word_embeddings", text.get("tie_word_embeddings"), not text.get("tie_word_embeddings"),
             "untied head"),
            ("text_config.hidden_act", text.get("hidden_act", "silu"), text.get("hidden_act", "silu") == "silu",
             "the MLP is SwiGLU with silu"),
            ("text_config.qk_norm_type", text.get("qk_norm_type", "qwen3"),
             text.get("qk_norm_type", "qwen3") in ("qwen3", "olmo"), "qwen3 or olmo"),
            ("text_config.use_qk_norm", text.get("use_qk_norm"), text.get("use_qk_norm", True), "qk-norm always on"),
            ("text_config.additional_vocab_size", text.get("additional_vocab_size"),
             text.get("additional_vocab_size", 128) > 0, "the image tokens need rows"),
            ("vision_config.hidden_act", vision.get("hidden_act"),
             vision.get("hidden_act", "gelu_pytorch_tanh") in CLIP_ACTIVATIONS, ", ".join(CLIP_ACTIVATIONS)),
            ("vision_config.num_channels", vision.get("num_channels"), vision.get("num_channels", 3) == 3, "RGB"),
            ("vision_config.attention_bias", vision.get("attention_bias"), vision.get("attention_bias", True),
             "biased attention"),
            ("adapter_config.attention_bias", adapter.get("attention_bias"), adapter.get("attention_bias", True),
             "biased attention"),
            ("adapter_config.hidden_act", adapter.get("hidden_act"), adapter.get("hidden_act", "silu") == "silu",
             "the projector is SwiGLU with silu"),
            ("adapter_config.mlp_bias", adapter.get("mlp_bias"), not adapter.get("mlp_bias"), "no projector biases")):
        if not ok:
            _refuse(field, value, why)
    theta, scaling = _rope(text)
    n_layers = require(text, "num_hidden_layers", "Molmo2 text")
    image_size = vision.get("image_size") or vision.get("image_default_input_size") or (378, 378)
    patch = vision.get("patch_size") or vision.get("image_patch_size") or 14
    grid = (image_size[0] // patch) * (image_size[1] // patch)
    n_pos = vision.get("num_position_embeddings") or vision.get("image_num_pos") or grid
    if n_pos != grid:
        _refuse("vision_config.num_position_embeddings", n_pos,
                f"one per patch of the {tuple(image_size)} crop: {grid}")
    vit_layers = list(adapter.get("vision_feature_layer") or adapter.get("vit_layers") or (24, 18))
    vit_n = vision.get("num_hidden_layers", 25)
    if legacy:  # the released tower stores only the layers up to the deepest one the features read
        vit_layers = [i % vit_n for i in vit_layers]
        vit_n = max(vit_layers) + 1
    heads = vision.get("num_attention_heads", 16)
    vit = config_molmo2.vit_config(
        image_size=tuple(image_size), patch_size=patch, width=vision.get("hidden_size", 1152), n_layers=vit_n,
        n_heads=heads, n_kv_heads=vision.get("num_key_value_heads") or heads, head_dim=vision.get("head_dim", 72),
        mlp_dim=vision.get("intermediate_size", 4304), norm_eps=float(vision.get("layer_norm_eps", 1e-6)),
        activation=CLIP_ACTIVATIONS[vision.get("hidden_act", "gelu_pytorch_tanh")], vit_layers=tuple(vit_layers))
    a_heads = adapter.get("num_attention_heads", 16)
    connector = config_molmo2.adapter_config(
        n_heads=a_heads, n_kv_heads=adapter.get("num_key_value_heads") or a_heads,
        head_dim=adapter.get("head_dim", 72), width=adapter.get("hidden_size", 1152),
        projector_dim=require(adapter, "intermediate_size", "Molmo2 adapter"))
    vocab = require(text, "vocab_size", "Molmo2 text")
    t_heads = require(text, "num_attention_heads", "Molmo2 text")
    llm = config_molmo2.llm_config(
        d_model=require(text, "hidden_size", "Molmo2 text"), n_layers=n_layers, n_heads=t_heads,
        n_kv_heads=text.get("num_key_value_heads") or t_heads, head_dim=text.get("head_dim") or 128,
        mlp_dim=require(text, "intermediate_size", "Molmo2 text"), vocab_size=vocab, embedding_size=vocab,
        additional_vocab_size=text.get("additional_vocab_size", 128),
        qkv_bias=bool(text.get("attention_bias", text.get("qkv_bias", False))),
        qk_norm_type=text.get("qk_norm_type", "qwen3"), norm_after=bool(text.get("norm_after", False)),
        norm_eps=float(text.get("rms_norm_eps", text.get("layer_norm_eps", 1e-6))), rope_theta=theta,
        rope_scaling=scaling, max_sequence_length=text.get("max_position_embeddings") or 36864,
        rope_scaling_layers=(None if text.get("rope_scaling_layers") is None
                             or sorted(text["rope_scaling_layers"]) == list(range(n_layers))
                             else tuple(text["rope_scaling_layers"])))
    tokens = config_molmo2.token_ids(vocab)
    tokens.update({ours: d[theirs] for ours, theirs in TOKEN_FIELDS.items() if d.get(theirs) is not None})
    cfg = config_molmo2.model_config(name, llm, vit=vit, connector=connector, tokens=tokens)
    extra = d.get(EXTRA) or {}
    for part in EXTRA_SECTIONS:
        cfg[part].update(tuples(extra.get(part, {})))
    cfg.update(tuples(extra.get("top", {})))
    return cfg


def to_released(cfg, torch_dtype: str) -> dict:
    """transformers 5's Molmo2 config.json for `cfg`, plus the molmo_jax extras."""
    l, v, c = cfg.llm, cfg.vit, cfg.connector
    scaling = dict(l.rope_scaling.to_dict() if hasattr(l.rope_scaling, "to_dict") else l.rope_scaling or {})
    layers = l.rope_scaling_layers
    out = {
        "architectures": ["Molmo2ForConditionalGeneration"],
        "model_type": "molmo2",
        "dtype": torch_dtype,
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "molmo2_text", "hidden_size": l.d_model, "num_hidden_layers": l.n_layers,
            "num_attention_heads": l.n_heads, "num_key_value_heads": l.n_kv_heads, "head_dim": l.head_dim,
            "intermediate_size": l.mlp_dim, "vocab_size": l.vocab_size,
            "additional_vocab_size": l.additional_vocab_size, "attention_bias": bool(l.qkv_bias),
            "qk_norm_type": l.qk_norm_type, "norm_after": bool(l.norm_after), "rms_norm_eps": l.norm_eps,
            "hidden_act": "silu", "max_position_embeddings": l.max_sequence_length,
            "rope_parameters": {"rope_theta": float(l.rope_theta), **scaling},
            "rope_scaling_layers": list(range(l.n_layers)) if layers is None else list(layers),
            "tie_word_embeddings": False, "use_cache": True,
        },
        "vision_config": {
            "model_type": "molmo2_vision", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
            "num_hidden_layers": v.n_layers, "num_attention_heads": v.n_heads,
            "num_key_value_heads": v.get("n_kv_heads", v.n_heads), "head_dim": v.head_dim,
            "hidden_act": {"gelu": "gelu_pytorch_tanh"}.get(v.activation, v.activation),
            "layer_norm_eps": v.norm_eps, "image_size": list(v.image_size), "patch_size": v.patch_size,
            "num_position_embeddings": config_molmo2.patches_per_crop(cfg), "attention_bias": True,
        },
        "adapter_config": {
            "model_type": "molmo2_adapter", "vision_feature_layer": list(v.vit_layers), "hidden_size": c.width,
            "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
            "intermediate_size": c.projector_dim or l.mlp_dim, "text_hidden_size": l.d_model,
            "hidden_act": "silu", "attention_bias": True, "mlp_bias": False,
        },
        **{theirs: cfg.tokens[ours] for ours, theirs in TOKEN_FIELDS.items()},
    }
    out[EXTRA] = {part: _jsonable(cfg[part].to_dict()) for part in EXTRA_SECTIONS}
    out[EXTRA]["top"] = {k: cfg[k] for k in TOP_LEVEL if k in cfg}
    return out


def processor_files(cfg) -> dict[str, dict]:
    """The processor configuration files of transformers' Molmo2Processor (image and video processors and
    the processor's own options) for the preprocessing `cfg` implies (`inference_molmo2.processor_for`)."""
    v, c, im = cfg.vit, cfg.connector, cfg.image
    view = {"size": {"height": int(v.image_size[0]), "width": int(v.image_size[1])}, "patch_size": int(v.patch_size),
            "image_mean": list(im.mean), "image_std": list(im.std), "do_convert_rgb": True, "do_rescale": True,
            "do_normalize": True,
            "processor_class": "Molmo2Processor"}
    return {
        "preprocessor_config.json": {"image_processor_type": "Molmo2ImageProcessor", **view,
                                     "pooling_size": [int(c.pool_h), int(c.pool_w)], "max_crops": int(im.max_crops),
                                     "overlap_margins": [int(m) for m in im.overlap_margins]},
        "video_preprocessor_config.json": {"video_processor_type": "Molmo2VideoProcessor", **view,
                                           "pooling_size": [int(c.video_pool_h), int(c.video_pool_w)],
                                           "num_frames": int(im.video_max_frames), "max_fps": float(im.video_max_fps),
                                           "do_sample_frames": True},
        "processor_config.json": {"processor_class": "Molmo2Processor",
                                  "image_use_col_tokens": bool(im.use_col_tokens),
                                  "video_use_col_tokens": bool(im.video_use_col_tokens)},
    }


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(x) for k, x in value.items()}
    return list(value) if isinstance(value, tuple) else value


def _embedding(vocab: int, first_rows: int):
    """The token table stored as two pieces, the first `first_rows` long, <-> our embedding
    [vocab] and new_embedding [additional]."""
    def split(xs, at):
        table = np.concatenate(xs, axis=0)
        return [table[:at], table[at:]]
    return (lambda xs: split(xs, vocab)), (lambda xs: split(xs, first_rows))


def rules(cfg, tensors=None) -> list:
    """Every parameter of a Molmo2. `tensors` (a checkpoint's) tells where its token table is split;
    without it, at `vocab_size` (the released files')."""
    l, c = cfg.llm, cfg.connector
    first = tensors.info(EMBEDDING).shape[0] if tensors is not None and EMBEDDING in tensors else l.vocab_size
    out = [rule((EMBEDDING, NEW_EMBEDDING), ("llm.embedding", "llm.new_embedding"), _embedding(l.vocab_size, first)),
           rule("model.transformer.ln_f.weight", "llm.ln_f.weight", IDENTITY),
           rule("lm_head.weight", "llm.ff_out.kernel", linear())]
    out += llm_block_rules(cfg, "model.transformer.blocks.{i}.", attn="self_attn.", mlp="mlp.")
    out += vit_rules(cfg, "model.vision_backbone.image_vit.")
    heads = {"wq": c.n_heads, "wk": c.n_kv_heads, "wv": c.n_kv_heads}
    out += attention_rules("model.vision_backbone.image_pooling_2d.", "connector.", heads, c.head_dim, c.width)
    return out + projector_rules("model.vision_backbone.image_projector.")
