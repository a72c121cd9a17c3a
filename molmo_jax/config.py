"""Model configuration: one schema for every Molmo, and the released presets (Molmo2's in
`molmo_jax.config_molmo2`, reached through `get_config` and `PRESETS` here).

A model config is an `ml_collections.ConfigDict` with four parts that follow the data flow:
`image` (preprocessing), `vit` (the CLIP encoder), `connector` (pooling + projector) and `llm`
(the decoder), plus the dtypes and the model `family`. Numbers of the released models come from
their released `config.json` files (docs/architecture.md#presets).

Naming: `llm.mlp_dim` is the SwiGLU *inner* width F (the original's `mlp_hidden_size` and the HF
`intermediate_size` are the fused width 2F). For MoE blocks it is the width of one expert.
"""
from __future__ import annotations

import ml_collections

PRESETS = ("molmoe_1b", "molmo_7b_o", "molmo_7b_d", "molmo_72b", "tiny", "demo", "bench_s")
MOLMO2_PRESETS = ("molmo2_4b", "molmo2_8b", "molmo2_o_7b", "molmo2_tiny")  # in molmo_jax.config_molmo2
PRESETS += MOLMO2_PRESETS

# OpenAI CLIP normalisation (docs/architecture.md#letterbox).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_config(**overrides) -> ml_collections.ConfigDict:
    """Preprocessing settings of the released models (crop_mode overlap-and-resize-c2)."""
    c = ml_collections.ConfigDict(dict(
        crop_mode="overlap-and-resize-c2",
        max_crops=12,
        overlap_margins=(4, 4),
        use_col_tokens=True,
        pad_value=0.0,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        # Legacy behaviour baked into the released weights: image_masks shifted by one crop.
        legacy_mask_shift=True,
    ))
    c.update(overrides)
    return c


def vit_config(**overrides) -> ml_collections.ConfigDict:
    """CLIP ViT-L/14-336 with 23 of its 24 layers kept (docs/architecture.md#3-vision-encoder)."""
    c = ml_collections.ConfigDict(dict(
        image_size=(336, 336), patch_size=14,
        width=1024, n_layers=23, n_heads=16, head_dim=64, mlp_dim=4096,
        norm_eps=1e-5, activation="quick_gelu",
        vit_layers=(-2, -9),
        crop_chunk=0,  # crops encoded at a time (0: all at once); a frozen tower then holds one chunk's scores
    ))
    c.update(overrides)
    return c


def connector_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        padding_embed="pad_and_partial_pad",  # or "pad_embed", "regress", "none"
        pooling="attention_meanq",             # or "attention", "stack", "none"
        pool_h=2,
        pool_w=2,
        projector="mlp",                       # SwiGLU; or "linear"
        projector_dim=0,                       # 0 = the LLM's SwiGLU inner width (as released)
        image_feature_dropout=0.0,
    ))
    c.update(overrides)
    return c


def llm_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        d_model=3584,
        n_layers=28,
        n_heads=28,
        n_kv_heads=4,
        head_dim=128,
        mlp_dim=18944,
        vocab_size=152064,        # tokenizer size incl. filler tokens; image tokens at vocab_size+0..4
        embedding_size=152064,    # rows of wte.embedding and of the output head
        additional_vocab_size=128,
        qkv_bias=True,
        qk_norm=False,
        norm_after=False,
        norm_eps=1e-6,
        rope_theta=1_000_000.0,
        clip_qkv=0.0,             # 0 = off
        max_sequence_length=4096,
        # Mixture of experts (OLMoE block). 0 experts = dense SwiGLU block.
        moe_num_experts=0,
        moe_top_k=0,
        moe_impl="auto",          # "gmm" (Pallas grouped matmul, per shard), "ragged" (XLA's ragged dot),
                                  # "dense" (every expert); "auto": gmm on TPU, ragged elsewhere
        # Dropout (training only).
        residual_dropout=0.0,
        response_residual_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=151643,      # EOS used as BOS for Qwen2/OLMo tokenizers (docs/architecture.md#p12-eos-as-bos)
        eos_token_id=151643,
    ))
    c.update(overrides)
    return c


def model_config(name: str, llm, vit=None, connector=None, image=None, **top) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = name
    c.family = "molmo"    # which assembly of molmo_jax.models builds it
    c.image = image if image is not None else image_config()
    c.vit = vit if vit is not None else vit_config()
    c.connector = connector if connector is not None else connector_config()
    c.llm = llm
    c.dtype = "float32"        # compute dtype
    c.param_dtype = "float32"  # storage dtype of parameters
    c.remat = "none"           # "none", "full" (per block), "dots" (save matmul outputs), "offload" (them to host)
    c.attention = "auto"       # "dense", "fused" (a kernel that keeps the scores on chip), "auto": fused on TPU/GPU
    c.scan_unroll = 1          # layers per scan iteration; a small model on a CPU runs ~15% faster unrolled
    c.init = "normal"         # "normal" (N(0, 0.02), the original) or "fan_in" (training from scratch)
    c.update(top)
    return c


def molmo_7b_d():
    return model_config("molmo_7b_d", llm_config())


def molmo_72b():
    return model_config("molmo_72b", llm_config(
        d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, mlp_dim=29568, norm_eps=1e-5))


def molmo_7b_o():
    return model_config("molmo_7b_o", llm_config(
        d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_dim=11008,
        vocab_size=100278, embedding_size=100352, qkv_bias=False, qk_norm=True, norm_after=True,
        norm_eps=1e-6, rope_theta=500_000.0, bos_token_id=100257, eos_token_id=100257))


def molmoe_1b():
    return model_config("molmoe_1b", llm_config(
        d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, mlp_dim=1024,
        vocab_size=50280, embedding_size=50304, qkv_bias=False, qk_norm=True, norm_after=False,
        norm_eps=1e-5, rope_theta=10_000.0, moe_num_experts=64, moe_top_k=8,
        bos_token_id=50279, eos_token_id=50279))


def tiny():
    """A few-hundred-thousand-parameter Molmo with the real structure, for tests."""
    return model_config(
        "tiny",
        llm_config(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=96,
                   vocab_size=512, embedding_size=512, qkv_bias=True, norm_eps=1e-6,
                   max_sequence_length=1024, bos_token_id=384, eos_token_id=384),
        vit=vit_config(image_size=(112, 112), width=32, n_layers=3, n_heads=4, head_dim=8, mlp_dim=64,
                       vit_layers=(-1, -3)),
        image=image_config(max_crops=4, overlap_margins=(2, 2)),
    )


def demo():
    """The model `make demo` trains from scratch on the synthetic PixMo (see configs/demo_*.py)."""
    c = tiny()
    c.name = "demo"
    # vocab: the bundled demo tokenizer (801 whole-word tokens, molmo_jax/assets/demo_tokenizer), padded
    c.llm.update(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, mlp_dim=256,
                 vocab_size=1024, embedding_size=1024)
    c.vit.update(width=64, n_layers=4, n_heads=4, head_dim=16, mlp_dim=128, vit_layers=(-1, -3))
    return c


def bench_s():
    """The CPU benchmark configuration (bench/bench_s_config.json): the tiny structure at 336 px."""
    c = tiny()
    c.name = "bench_s"
    c.llm.update(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=64, mlp_dim=1408, vocab_size=32000,
                 embedding_size=32000)
    c.vit.update(image_size=(336, 336), width=256, n_layers=6, n_heads=4, head_dim=64, mlp_dim=1024,
                 vit_layers=(-2, -4))
    c.image.update(overlap_margins=(4, 4))
    return c


def get_config(name: str) -> ml_collections.ConfigDict:
    """Preset by name, e.g. `get_config("molmo_7b_d")`."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    if name in MOLMO2_PRESETS:
        from molmo_jax import config_molmo2  # it builds on this module

        return getattr(config_molmo2, name)()
    return globals()[name]()


# ----------------------------------------------------------------------------------------------
# Derived quantities (kept here so that model, preprocessing and tools agree on them).

def projector_dim(cfg) -> int:
    return cfg.connector.projector_dim or cfg.llm.mlp_dim


def vit_feature_dim(cfg) -> int:
    return cfg.vit.width * len(cfg.vit.vit_layers)


def patches_per_side(cfg) -> tuple[int, int]:
    h, w = cfg.vit.image_size
    return h // cfg.vit.patch_size, w // cfg.vit.patch_size


def tokens_per_crop(cfg) -> int:
    ph, pw = patches_per_side(cfg)
    th = -(-ph // cfg.connector.pool_h)
    tw = -(-pw // cfg.connector.pool_w)
    return th * tw


def resolved_vit_layers(cfg) -> tuple[int, ...]:
    """vit_layers as non-negative block indices, in concatenation order."""
    n = cfg.vit.n_layers
    out = []
    for i in cfg.vit.vit_layers:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise ValueError(f"vit.vit_layers entry {i} is out of range for {n} ViT layers")
        out.append(j)
    return tuple(out)


def image_token_ids(cfg) -> dict[str, int]:
    """The five Molmo special tokens sit at vocab_size + 0..4 (docs/architecture.md#tokenizer)."""
    v = cfg.llm.vocab_size
    return dict(im_start=v, im_end=v + 1, im_patch=v + 2, im_col=v + 3, image=v + 4)
