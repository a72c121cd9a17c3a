"""Base models from Hugging Face checkpoints -> molmo_jax parameters (spec 12.2), numpy only.

Molmo starts from a pre-trained CLIP vision tower and a pre-trained LLM; everything else (connector,
`new_embedding`) is freshly initialised by the caller. This module maps

  * a CLIP vision tower (`CLIPVisionModel`, or the `vision_model.` half of a `CLIPModel`), and
  * a Qwen2 / OLMo-2 / OLMoE causal LM (`*ForCausalLM`)

from their `save_pretrained` safetensors naming to our parameter paths (tuples of strings, as
`pretrained.param_paths`). Inputs are plain dicts {HF key: numpy array} plus the HF `config.json`
as a dict; transformers is never imported here.

Every HF tensor is checked against the shape the config implies before it is converted, every key
of the checkpoint must be used (or be one we deliberately drop), and failures raise `WeightsError`
naming the key and the shapes.
"""
from __future__ import annotations

import re

import numpy as np

from molmo_jax.torch_format import WeightsError

SUPPORTED_LLMS = ("qwen2", "olmo2", "olmoe")

# HF activation name -> our ACTIVATIONS name (HF "gelu" is the exact erf form).
CLIP_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu_exact", "gelu_new": "gelu",
                    "gelu_pytorch_tanh": "gelu"}

# Keys of a full CLIPModel that are not part of the vision tower, and non-parameter buffers that
# older checkpoints carry: accepted and dropped.
_CLIP_DROPPED = re.compile(r"^(text_model\.|visual_projection\.|text_projection\.|logit_scale$)"
                           r"|position_ids$|^post_layernorm\.")
_LLM_DROPPED = re.compile(r"rotary_emb\.inv_freq$")


class _Checkpoint:
    """A state dict being consumed: `take` checks presence and shape, `finish` reports leftovers."""

    def __init__(self, state: dict, what: str):
        self.state = state
        self.what = what
        self.used: set[str] = set()

    def __contains__(self, key):
        return key in self.state

    def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.state:
            raise WeightsError(f"{self.what}: missing key {key!r} (expected shape {tuple(shape)})")
        arr = np.asarray(self.state[key])
        if tuple(arr.shape) != tuple(shape):
            raise WeightsError(f"{self.what}: key {key!r} has shape {tuple(arr.shape)} but the config "
                               f"expects {tuple(shape)}")
        self.used.add(key)
        return arr

    def finish(self, dropped=lambda key: False):
        unexpected = sorted(k for k in self.state if k not in self.used and not dropped(k))
        if unexpected:
            shown = ", ".join(f"{k!r} {tuple(np.shape(self.state[k]))}" for k in unexpected[:5])
            more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
            raise WeightsError(f"{self.what}: unexpected keys for this config: {shown}{more}")


def _sub(cfg, name):
    """Accept either a whole model config or just its `vit` / `llm` part."""
    return cfg[name] if name in cfg else cfg


def _require(d: dict, key: str, what: str):
    if d.get(key) is None:
        raise WeightsError(f"{what} config has no {key!r}")
    return d[key]


# ------------------------------------------------------------------------------------------------
# CLIP vision tower

def vit_config_from_clip(hf_vision_config: dict, n_layers_kept: int | None = None) -> dict:
    """Values for `config.vit_config(...)` from a CLIP vision config (or a full CLIPModel config,
    whose `vision_config` is used). By default all but the last layer are kept, as Molmo keeps 23
    of CLIP-L's 24 (spec 8.2). `vit_layers` is left to the caller."""
    d = hf_vision_config.get("vision_config") or hf_vision_config
    what = "CLIP vision"
    act = d.get("hidden_act", "quick_gelu")
    if act not in CLIP_ACTIVATIONS:
        raise WeightsError(f"{what} config: hidden_act={act!r} is not supported "
                           f"(supported: {', '.join(CLIP_ACTIVATIONS)})")
    if d.get("num_channels", 3) != 3:
        raise WeightsError(f"{what} config: num_channels={d['num_channels']} is not supported (only 3)")
    width, heads = _require(d, "hidden_size", what), _require(d, "num_attention_heads", what)
    image_size, patch = _require(d, "image_size", what), _require(d, "patch_size", what)
    if width % heads:
        raise WeightsError(f"{what} config: hidden_size {width} is not divisible by {heads} heads")
    if image_size % patch:
        raise WeightsError(f"{what} config: image_size {image_size} is not a multiple of patch_size {patch}")
    n_total = _require(d, "num_hidden_layers", what)
    kept = n_total - 1 if n_layers_kept is None else n_layers_kept
    if not 1 <= kept <= n_total:
        raise WeightsError(f"{what} config: cannot keep {kept} of its {n_total} layers")
    return dict(image_size=(image_size, image_size), patch_size=patch, width=width, n_layers=kept,
                n_heads=heads, head_dim=width // heads, mlp_dim=_require(d, "intermediate_size", what),
                norm_eps=float(d.get("layer_norm_eps", 1e-5)), activation=CLIP_ACTIVATIONS[act])


def vit_from_clip(state: dict, cfg) -> dict[tuple[str, ...], np.ndarray]:
    """{our `vision.*` path: array} from a CLIP vision state dict; `cfg` is a model config (or its
    `vit` part). Layers at or beyond `n_layers` and `post_layernorm` are dropped."""
    v = _sub(cfg, "vit")
    d, h, hd, m, p = v.width, v.n_heads, v.head_dim, v.mlp_dim, v.patch_size
    n_pos = 1 + (v.image_size[0] // p) * (v.image_size[1] // p)
    # A full CLIPModel and older CLIPVisionModel checkpoints prefix the tower with `vision_model.`.
    state = {k.removeprefix("vision_model."): a for k, a in state.items()}
    ck = _Checkpoint(state, "CLIP checkpoint")
    out = {}

    def put(path, arr):
        out[tuple(path.split("."))] = arr

    conv = ck.take("embeddings.patch_embedding.weight", (d, 3, p, p))
    # [D, rgb, dy, dx] -> [D, dy, dx, rgb]: our patch vectors are flattened in (dy, dx, rgb) order.
    put("vision.patch_embedding.kernel", conv.transpose(0, 2, 3, 1).reshape(d, -1).T)
    put("vision.class_embedding", ck.take("embeddings.class_embedding", (d,)))
    put("vision.positional_embedding", ck.take("embeddings.position_embedding.weight", (n_pos, d)))
    put("vision.pre_ln.weight", ck.take("pre_layrnorm.weight", (d,)))
    put("vision.pre_ln.bias", ck.take("pre_layrnorm.bias", (d,)))

    def linear(key, n_out, n_in, out_shape=None, in_shape=None):
        """torch Linear [out, in] -> our kernel [*in_shape, *out_shape] and bias [*out_shape]."""
        w = ck.take(key + ".weight", (n_out, n_in)).T
        w = w.reshape(tuple(in_shape or (n_in,)) + tuple(out_shape or (n_out,)))
        return w, ck.take(key + ".bias", (n_out,)).reshape(tuple(out_shape or (n_out,)))

    layers = []
    for i in range(v.n_layers):
        b = f"encoder.layers.{i}."
        layer = {}
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj")):
            layer[ours + ".kernel"], layer[ours + ".bias"] = linear(b + "self_attn." + theirs, h * hd, d, (h, hd))
        layer["wo.kernel"], layer["wo.bias"] = linear(b + "self_attn.out_proj", d, h * hd, in_shape=(h, hd))
        layer["w1.kernel"], layer["w1.bias"] = linear(b + "mlp.fc1", m, d)
        layer["w2.kernel"], layer["w2.bias"] = linear(b + "mlp.fc2", d, m)
        for ours, theirs in (("attention_norm", "layer_norm1"), ("ffn_norm", "layer_norm2")):
            for part in ("weight", "bias"):
                layer[f"{ours}.{part}"] = ck.take(f"{b}{theirs}.{part}", (d,))
        layers.append(layer)
    for name in layers[0]:
        put("vision.blocks." + name, np.stack([layer[name] for layer in layers]))

    def dropped(key):
        match = re.match(r"encoder\.layers\.(\d+)\.", key)
        return bool(_CLIP_DROPPED.search(key)) or (match is not None and int(match.group(1)) >= v.n_layers)

    ck.finish(dropped)
    return out


# ------------------------------------------------------------------------------------------------
# LLMs

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
    n_layers = _require(d, "num_hidden_layers", what)
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

    hidden, heads = _require(d, "hidden_size", what), _require(d, "num_attention_heads", what)
    head_dim = d.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            refuse("hidden_size", hidden, f"not divisible by num_attention_heads={heads}")
        head_dim = hidden // heads
    kv_heads = d.get("num_key_value_heads") or heads
    if heads % kv_heads:
        refuse("num_key_value_heads", kv_heads, f"must divide num_attention_heads={heads}")
    vocab = _require(d, "vocab_size", what)
    values = dict(
        d_model=hidden, n_layers=n_layers, n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim,
        mlp_dim=_require(d, "intermediate_size", what), vocab_size=vocab, embedding_size=vocab,
        qkv_bias=kind == "qwen2", qk_norm=kind in ("olmo2", "olmoe"), norm_after=kind == "olmo2",
        norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta, clip_qkv=0.0,
        moe_num_experts=0, moe_top_k=0,
    )
    if kind == "olmoe":
        if d.get("norm_topk_prob"):
            refuse("norm_topk_prob", True, "OLMoE combines the un-renormalised top-k probabilities")
        values.update(moe_num_experts=_require(d, "num_experts", what),
                      moe_top_k=_require(d, "num_experts_per_tok", what))
    # Molmo uses the LLM's EOS as BOS too (spec 3.2).
    eos = d.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    if isinstance(eos, int):
        values.update(bos_token_id=eos, eos_token_id=eos)
    return values


def llm_from_hf(state: dict, cfg, *, tie_word_embeddings: bool = False) -> dict[tuple[str, ...], np.ndarray]:
    """{our `llm.*` path: array} from a Qwen2 / OLMo-2 / OLMoE `*ForCausalLM` state dict.

    `cfg` is a model config (or its `llm` part) as `llm_config_from_hf` describes; the layout
    follows from its flags (qkv_bias, qk_norm, norm_after, moe_num_experts). With
    `tie_word_embeddings` (the HF config field), the output head is a copy of the embedding.
    `llm.new_embedding` is not returned: the caller initialises it.
    """
    l = _sub(cfg, "llm")
    d, hq, hkv, hd, f, e = l.d_model, l.n_heads, l.n_kv_heads, l.head_dim, l.mlp_dim, l.moe_num_experts
    ck = _Checkpoint(state, "HF LLM checkpoint")
    out = {}

    def put(path, arr):
        out[tuple(path.split("."))] = arr

    embedding = ck.take("model.embed_tokens.weight", (l.embedding_size, d))
    put("llm.embedding", embedding)
    put("llm.ln_f.weight", ck.take("model.norm.weight", (d,)))
    if tie_word_embeddings and "lm_head.weight" not in ck:
        head = embedding
    else:
        head = ck.take("lm_head.weight", (l.embedding_size, d))
    put("llm.ff_out.kernel", np.ascontiguousarray(head.T))

    # Which HF norm feeds which of ours (spec 12.2): pre-norm models norm the sublayer inputs,
    # OLMo-2 (norm_after) the sublayer outputs.
    norms = ({"attn_norm": "post_attention_layernorm", "ff_norm": "post_feedforward_layernorm"}
             if l.norm_after else {"attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm"})

    layers = []
    for i in range(l.n_layers):
        b = f"model.layers.{i}."
        a = b + "self_attn."
        layer = {}
        for ours, theirs, n_heads in (("wq", "q_proj", hq), ("wk", "k_proj", hkv), ("wv", "v_proj", hkv)):
            layer[f"attn.{ours}.kernel"] = ck.take(f"{a}{theirs}.weight", (n_heads * hd, d)).T.reshape(d, n_heads, hd)
            if l.qkv_bias:
                layer[f"attn.{ours}.bias"] = ck.take(f"{a}{theirs}.bias", (n_heads * hd,)).reshape(n_heads, hd)
        layer["attn.wo.kernel"] = ck.take(a + "o_proj.weight", (d, hq * hd)).T.reshape(hq, hd, d)
        if l.qk_norm:  # over the whole projected width, before the head split
            layer["attn.q_norm.weight"] = ck.take(a + "q_norm.weight", (hq * hd,))
            layer["attn.k_norm.weight"] = ck.take(a + "k_norm.weight", (hkv * hd,))
        for ours, theirs in norms.items():
            layer[f"{ours}.weight"] = ck.take(f"{b}{theirs}.weight", (d,))
        if e:
            layer.update(_moe_layer(ck, b + "mlp.", e, d, f))
        else:
            for ours, theirs in (("w_up", "up_proj"), ("w_gate", "gate_proj")):
                layer[f"ffn.{ours}.kernel"] = ck.take(f"{b}mlp.{theirs}.weight", (f, d)).T
            layer["ffn.w_down.kernel"] = ck.take(b + "mlp.down_proj.weight", (d, f)).T
        layers.append(layer)
    for name in layers[0]:
        put("llm.blocks." + name, np.stack([layer[name] for layer in layers]))
    ck.finish(lambda key: bool(_LLM_DROPPED.search(key)))
    return out


def _moe_layer(ck: _Checkpoint, m: str, e: int, d: int, f: int) -> dict:
    """OLMoE experts -> our stacked [E, d, F] (gate, up) and [E, F, d] (down).

    `save_pretrained` writes one Linear per expert (`experts.{j}.gate_proj.weight` [F, d], ...),
    while transformers 5 holds them fused in memory (`experts.gate_up_proj` [E, 2F, d], gate rows
    first, and `experts.down_proj` [E, d, F]); both forms are accepted.
    """
    out = {"ffn.router.kernel": ck.take(m + "gate.weight", (e, d)).T}
    if m + "experts.gate_up_proj" in ck:
        gate_up = ck.take(m + "experts.gate_up_proj", (e, 2 * f, d))
        gate, up = gate_up[:, :f], gate_up[:, f:]
        down = ck.take(m + "experts.down_proj", (e, d, f))
    else:
        def stacked(name, shape):
            return np.stack([ck.take(f"{m}experts.{j}.{name}.weight", shape) for j in range(e)])
        gate, up, down = stacked("gate_proj", (f, d)), stacked("up_proj", (f, d)), stacked("down_proj", (d, f))
    out["ffn.w_gate"] = gate.transpose(0, 2, 1)
    out["ffn.w_up"] = up.transpose(0, 2, 1)
    out["ffn.w_down"] = down.transpose(0, 2, 1)
    return out
