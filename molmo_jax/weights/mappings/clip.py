"""Base CLIP vision towers (`CLIPVisionModel`, or the `vision_model.` half of a `CLIPModel`), as
`save_pretrained` writes them: config and names -> the ViT of a Molmo built from base models.

Layers at or beyond the kept `n_layers`, `post_layernorm` and the text half of a full CLIPModel
are not used (docs/architecture.md#weight-conversion).
"""
from __future__ import annotations

import re

from molmo_jax.weights.errors import WeightsError, require
from molmo_jax.weights.rules import IDENTITY, StateDict, linear, map_state, reshape, rule

PREFIX = "vision_model."  # stripped when present (a full CLIPModel, older CLIPVisionModel files)

# HF activation name -> our ACTIVATIONS name (HF "gelu" is the exact erf form).
CLIP_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu_exact", "gelu_new": "gelu",
                    "gelu_pytorch_tanh": "gelu"}


def vit_config_from_clip(hf_vision_config: dict, n_layers_kept: int | None = None) -> dict:
    """Values for `config.vit_config(...)` from a CLIP vision config (or a full CLIPModel config,
    whose `vision_config` is used). By default all but the last layer are kept, as Molmo keeps 23
    of CLIP-L's 24 (docs/architecture.md#3-vision-encoder). `vit_layers` is left to the caller."""
    d = hf_vision_config.get("vision_config") or hf_vision_config
    what = "CLIP vision"
    act = d.get("hidden_act", "quick_gelu")
    if act not in CLIP_ACTIVATIONS:
        raise WeightsError(f"{what} config: hidden_act={act!r} is not supported "
                           f"(supported: {', '.join(CLIP_ACTIVATIONS)})")
    if d.get("num_channels", 3) != 3:
        raise WeightsError(f"{what} config: num_channels={d['num_channels']} is not supported (only 3)")
    width, heads = require(d, "hidden_size", what), require(d, "num_attention_heads", what)
    image_size, patch = require(d, "image_size", what), require(d, "patch_size", what)
    if width % heads:
        raise WeightsError(f"{what} config: hidden_size {width} is not divisible by {heads} heads")
    if image_size % patch:
        raise WeightsError(f"{what} config: image_size {image_size} is not a multiple of patch_size {patch}")
    n_total = require(d, "num_hidden_layers", what)
    kept = n_total - 1 if n_layers_kept is None else n_layers_kept
    if not 1 <= kept <= n_total:
        raise WeightsError(f"{what} config: cannot keep {kept} of its {n_total} layers")
    return dict(image_size=(image_size, image_size), patch_size=patch, width=width, n_layers=kept,
                n_heads=heads, head_dim=width // heads, mlp_dim=require(d, "intermediate_size", what),
                norm_eps=float(d.get("layer_norm_eps", 1e-5)), activation=CLIP_ACTIVATIONS[act])


_UNUSED = re.compile(r"^(text_model\.|visual_projection\.|text_projection\.|logit_scale$|post_layernorm\.)"
                     r"|position_ids$")
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")


def ignore(n_layers: int):
    """Which keys of a CLIP checkpoint a Molmo with `n_layers` ViT layers does not use."""
    def unused(key: str) -> bool:
        layer = _LAYER.match(key)
        return bool(_UNUSED.search(key)) or (layer is not None and int(layer.group(1)) >= n_layers)
    return unused


def _patch_embedding(d: int, p: int):
    """torch conv [D, rgb, dy, dx] <-> our kernel [(dy, dx, rgb), D]: patch vectors are (dy, dx, rgb)."""
    return ((lambda xs: [xs[0].transpose(0, 2, 3, 1).reshape(d, -1).T]),
            (lambda xs: [xs[0].T.reshape(d, p, p, 3).transpose(0, 3, 1, 2)]))


def rules(cfg) -> list:
    """CLIP vision names -> our `vision.*` parameters (cfg: a model config)."""
    v = cfg.vit
    d, h, hd, n = v.width, v.n_heads, v.head_dim, v.n_layers
    out = [
        rule("embeddings.patch_embedding.weight", "vision.patch_embedding.kernel", _patch_embedding(d, v.patch_size)),
        rule("embeddings.class_embedding", "vision.class_embedding", IDENTITY),
        rule("embeddings.position_embedding.weight", "vision.positional_embedding", IDENTITY),
        rule("pre_layrnorm.weight", "vision.pre_ln.weight", IDENTITY),
        rule("pre_layrnorm.bias", "vision.pre_ln.bias", IDENTITY),
    ]
    b, k = "encoder.layers.{i}.", "vision.blocks."
    for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj")):
        out.append(rule(f"{b}self_attn.{theirs}.weight", f"{k}{ours}.kernel", linear((h, hd)), n))
        out.append(rule(f"{b}self_attn.{theirs}.bias", f"{k}{ours}.bias", reshape((h, hd)), n))
    out.append(rule(b + "self_attn.out_proj.weight", k + "wo.kernel", linear((d,), (h, hd)), n))
    out.append(rule(b + "self_attn.out_proj.bias", k + "wo.bias", IDENTITY, n))
    for ours, theirs in (("w1", "fc1"), ("w2", "fc2")):
        out.append(rule(f"{b}mlp.{theirs}.weight", f"{k}{ours}.kernel", linear(), n))
        out.append(rule(f"{b}mlp.{theirs}.bias", f"{k}{ours}.bias", IDENTITY, n))
    for ours, theirs in (("attention_norm", "layer_norm1"), ("ffn_norm", "layer_norm2")):
        for part in ("weight", "bias"):
            out.append(rule(f"{b}{theirs}.{part}", f"{k}{ours}.{part}", IDENTITY, n))
    return out


def from_state(state: dict, cfg) -> dict:
    """{our `vision.*` path: array} from an in-memory CLIP state dict, checked like a file."""
    state = {k.removeprefix(PREFIX): v for k, v in state.items()}
    return map_state(rules(cfg), cfg, StateDict(state, "CLIP state dict"), ignore(cfg.vit.n_layers))
