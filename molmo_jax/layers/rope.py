"""Rotary position embeddings: the rotation, and the inverse frequencies of scaled variants.

`rope` rotates pairs (i, i + hd/2) ("rotate half", docs/architecture.md#p9-rope-rotate-half) in
float32. Without `inv_freq` it uses the plain frequencies theta^(-2i/hd). Scaled RoPE
(`llm.rope_scaling`, the `rope_parameters` of a transformers config) changes the frequencies and may
multiply cos and sin by an attention factor; `scaled_frequencies` computes both on the host with
transformers' formulas for the types listed in `ROPE_TYPES`. Types whose frequencies depend on the
sequence length (dynamic NTK, LongRoPE) are not supported.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def default_frequencies(head_dim: int, theta: float):
    """theta^(-2i/hd), i < hd/2, in float32 (jnp, as every unscaled layer computes it)."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rope(x, positions, theta: float, inv_freq=None, scale=None):
    """Rotate-half RoPE in float32. x: [B, T, H, hd]; positions: [B, T] integer; `inv_freq` [hd/2]
    replaces the plain frequencies and `scale` multiplies cos and sin (scaled variants)."""
    hd = x.shape[-1]
    if inv_freq is None:
        inv_freq = default_frequencies(hd, theta)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq            # [B, T, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]      # [B, T, 1, hd]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if scale is not None:
        cos, sin = cos * scale, sin * scale
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : hd // 2], xf[..., hd // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def check_scaling(params: dict, where: str = "llm.rope_scaling") -> str:
    """The rope type of a scaling dict, refused with one line naming the field if unsupported."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"{where}.rope_type={kind!r} is not supported; choose one of {', '.join(ROPE_TYPES)}")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{where}.partial_rotary_factor={params['partial_rotary_factor']!r} is not supported "
                         "(RoPE over the whole head)")
    return kind


def scaled_frequencies(head_dim: int, theta: float, params: dict, max_positions: int) -> tuple[np.ndarray, float]:
    """(inverse frequencies [hd/2] float32, attention factor) of the scaled RoPE `params`
    (transformers' `rope_parameters` fields), computed in float32 as transformers does."""
    kind = check_scaling(params)
    f32 = np.float32
    base = np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim))
    inv = (f32(1.0) / base).astype(f32)
    if kind == "default":
        return inv, 1.0
    factor = params.get("factor")
    if kind == "linear":
        return (inv / f32(factor)).astype(f32), 1.0
    if kind == "llama3":
        old = params["original_max_position_embeddings"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        wavelen = (2 * math.pi / inv).astype(f32)
        scaled = np.where(wavelen > old / low, inv / f32(factor), inv).astype(f32)
        smooth = ((old / wavelen - low) / (high - low)).astype(f32)
        smoothed = ((1 - smooth) * scaled / f32(factor) + smooth * scaled).astype(f32)
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return np.where(medium, smoothed, scaled).astype(f32), 1.0
    # yarn (https://huggingface.co/papers/2309.00071), as transformers' _compute_yarn_parameters
    original = params["original_max_position_embeddings"]
    if factor is None:
        factor = max_positions / original
    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all
                     else _yarn_mscale(factor))
    fast, slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations):
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = correction_dim(fast), correction_dim(slow)
    if params.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    if lo == hi:
        hi += 0.001  # as transformers: no division by zero
    ramp = np.clip((np.arange(head_dim // 2, dtype=f32) - f32(lo)) / f32(hi - lo), 0, 1).astype(f32)
    extrapolation = (f32(1) - ramp).astype(f32)
    interpolation = (f32(1.0) / (f32(factor) * base)).astype(f32)
    inv = interpolation * (1 - extrapolation) + inv * extrapolation
    return inv.astype(f32), float(attention)


def _yarn_mscale(scale, mscale=1):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
