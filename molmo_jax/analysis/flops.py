"""Analytic model FLOPs (multiply-add = 2 FLOPs), for MFU figures and ahead-of-time reports.

Counts matmuls only (norms, softmax, RoPE are negligible). Attention is counted over the full
T x T score matrix, as is usual for MFU (the causal half is not subtracted). A training step is
3x the forward (backward = 2x).
"""
from __future__ import annotations

from molmo_jax import config as config_lib


def vit_flops_per_crop(cfg) -> float:
    v = cfg.vit
    ph, pw = config_lib.patches_per_side(cfg)
    p = ph * pw
    n = p + (1 if v.get("class_token", True) else 0)
    inner = v.n_heads * v.head_dim
    layers_run = max(config_lib.resolved_vit_layers(cfg)) + 1  # later blocks are skipped
    per_layer = 2 * n * (4 * v.width * inner + 2 * v.width * v.mlp_dim) + 2 * 2 * n * n * inner
    return 2 * p * v.patch_size * v.patch_size * 3 * v.width + layers_run * per_layer


def adapter_flops_per_crop(cfg) -> float:
    """Molmo2's adapter: per pooled token (at most a pooling window's share of a crop's patches) a query
    from the mean, keys and values of the window's patches, attention over them, the output projection
    and the SwiGLU projector."""
    c = cfg.connector
    ph, pw = config_lib.patches_per_side(cfg)
    tokens = -(-ph // c.pool_h) * -(-pw // c.pool_w)
    window, feat = c.pool_h * c.pool_w, config_lib.vit_feature_dim(cfg)
    q, kv, f = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, config_lib.projector_dim(cfg)
    pool = 2 * (feat * q + 2 * window * feat * kv + 2 * window * q + q * c.width)
    return tokens * (pool + 2 * (2 * c.width * f + f * cfg.llm.d_model))


def connector_flops_per_crop(cfg) -> float:
    if cfg.get("family", "molmo") == "molmo2":
        return adapter_flops_per_crop(cfg)
    v, c = cfg.vit, cfg.connector
    tokens = config_lib.tokens_per_crop(cfg)
    feat = config_lib.vit_feature_dim(cfg)
    window = c.pool_h * c.pool_w
    inner = v.n_heads * v.head_dim
    f = config_lib.projector_dim(cfg)
    pool = 0.0
    proj_in = feat * window if c.pooling == "stack" else feat
    if c.pooling.startswith("attention"):
        pool = 2 * (feat * inner + 2 * window * feat * inner + 2 * window * inner + inner * v.width)
        proj_in = v.width
    proj = 2 * (2 * proj_in * f + f * cfg.llm.d_model) if c.projector == "mlp" else 2 * proj_in * cfg.llm.d_model
    return tokens * (pool + proj)


def llm_matmul_params(cfg, active: bool = True) -> int:
    """Parameters used in matmuls per token by one pass through the blocks (MoE: top-k experts)."""
    l = cfg.llm
    d, hd = l.d_model, l.head_dim
    attn = d * (l.n_heads + 2 * l.n_kv_heads) * hd + l.n_heads * hd * d
    if l.moe_num_experts:
        experts = l.moe_top_k if active else l.moe_num_experts
        ffn = d * l.moe_num_experts + experts * 3 * d * l.mlp_dim
    else:
        ffn = 3 * d * l.mlp_dim
    return l.n_layers * (attn + ffn)


def llm_flops(cfg, batch: int, seq_len: int, logit_positions: int | None = None) -> float:
    """Decoder forward over [batch, seq_len]; the head is applied at `logit_positions` per batch
    (default: every position)."""
    l = cfg.llm
    tokens = batch * seq_len
    blocks = 2 * tokens * llm_matmul_params(cfg)
    attention = 2 * 2 * batch * seq_len * seq_len * l.n_heads * l.head_dim * l.n_layers
    head_positions = batch * (seq_len if logit_positions is None else logit_positions)
    return blocks + attention + 2 * head_positions * l.d_model * l.embedding_size


def forward_flops(cfg, batch: int, seq_len: int, crops_per_example: int,
                  logit_positions: int | None = None) -> float:
    crops = batch * crops_per_example
    vision = crops * (vit_flops_per_crop(cfg) + connector_flops_per_crop(cfg))
    return vision + llm_flops(cfg, batch, seq_len, logit_positions)


def train_step_flops(cfg, batch: int, seq_len: int, crops_per_example: int,
                     logit_positions: int | None = None) -> float:
    return 3 * forward_flops(cfg, batch, seq_len, crops_per_example, logit_positions)


# Peak dense bf16 FLOP/s per chip (published figures), for MFU estimates.
PEAK_FLOPS = {
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v5": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12, "h100": 989e12, "h200": 989e12, "a100": 312e12,
}
# This project's CPU machines: jax's float32 2048^3 matmul rate on both cores (shared/ENV.md).
CPU_PEAK_FLOPS = 130e9


def default_peak_flops_per_device() -> float:
    """Best guess of one device's peak from its kind; 0 when unknown (MFU then not reported)."""
    import jax

    device = jax.devices()[0]
    kind = getattr(device, "device_kind", "").lower()
    if device.platform == "cpu":
        return CPU_PEAK_FLOPS / jax.local_device_count()  # simulated devices share the same cores
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak
    return 0.0
