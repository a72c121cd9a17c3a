"""Low-rank adapters (LoRA) on the model's Dense layers, and merging them into the base kernels.

A targeted Dense computes x W + (alpha / r) (x A) B, with A [in..., r] drawn N(0, 1/in) and B
[r, out...] zero: a model with fresh adapters computes exactly what its base does. Adapters sit on
the Dense modules whose kernel path matches `lora.targets` (a regex over paths such as
`llm.blocks.attn.wq.kernel`), stacked like their kernel (a scanned stack of layers gets one adapter
per layer) and named with the kernel's logical axes plus `lora_rank` (replicated), so they are
sharded by the same rules table as the base.

qwix (Google's quantization and LoRA library for Flax) creates its adapters while it intercepts the
model's first call; this model runs its layer stacks under `lax.scan` over parameters split out of
the module, where parameters created during the call do not persist, so the adapters are attached
here, explicitly, before the model is used.
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

ADAPTERS = ("lora_a", "lora_b")
# The LLM's attention and MLP projections.
DEFAULT_TARGETS = r"^llm\.blocks\.(attn\.w[qkvo]|ffn\.w_(up|gate|down))\.kernel$"
BASE_WEIGHTS = ("keep", "bfloat16", "int8", "int4")


def lora_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(
        rank=0,                    # 0 = no adapters
        alpha=16.0,                # the adapters' output is scaled by alpha / rank
        targets=DEFAULT_TARGETS,   # regex over parameter paths of Dense kernels
        base_weights="keep",       # the frozen base: "keep" its dtype, store it "bfloat16", or "int8" / "int4" (QLoRA)
        group=128,                 # int4 base: one scale per this many inputs
        base="",                   # the checkpoint the adapters were trained on (set by the trainer)
    ))
    c.update(overrides)
    return c


def enabled(cfg) -> bool:
    """Whether the model config `cfg` asks for adapters."""
    lora = cfg.get("lora")
    return bool(lora is not None and lora.get("rank", 0))


def is_adapter(path) -> bool:
    return str(path[-1]) in ADAPTERS


def _dense_modules(model):
    from molmo_jax.layers.core import Dense

    for path, node in nnx.iter_graph(model):
        if isinstance(node, Dense):
            yield ".".join(str(p) for p in path), node


def check(lcfg, model) -> list:
    """The (kernel path, Dense) pairs `lcfg` targets; a clear error for settings that cannot work."""
    if int(lcfg.rank) < 0:
        raise ValueError(f"lora.rank={lcfg.rank} must be >= 0")
    if lcfg.base_weights not in BASE_WEIGHTS:
        raise ValueError(f"lora.base_weights={lcfg.base_weights!r}; choose one of {', '.join(BASE_WEIGHTS)}")
    try:
        pattern = re.compile(lcfg.targets)
    except re.error as e:
        raise ValueError(f"lora.targets={lcfg.targets!r} is not a regular expression ({e})") from None
    found = [(f"{path}.kernel", dense) for path, dense in _dense_modules(model) if pattern.search(f"{path}.kernel")]
    if not found:
        raise ValueError(f"lora.targets={lcfg.targets!r} matches no Dense kernel of the model "
                         "(paths look like llm.blocks.attn.wq.kernel)")
    for path, dense in found:
        smallest = min(math.prod(dense.in_shape), math.prod(dense.out_shape))
        if lcfg.rank > smallest:
            raise ValueError(f"lora.rank={lcfg.rank} is larger than {path}'s smaller side ({smallest}); "
                             f"the adapter would not be low-rank")
    return found


def add_adapters(model, lcfg, seed: int = 0):
    """Attach fresh adapters to the targeted Dense layers of `model` (in place) and return it."""
    for i, (path, dense) in enumerate(check(lcfg, model)):
        kernel = dense.kernel
        axes = tuple(kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim)
        n_in, n_out = len(dense.in_shape), len(dense.out_shape)
        stack = kernel.shape[:kernel.ndim - n_in - n_out]
        in_axes, out_axes = axes[len(stack):len(stack) + n_in], axes[len(stack) + n_in:]
        stack_axes = axes[:len(stack)]
        a_shape = stack + dense.in_shape + (lcfg.rank,)
        rng = np.random.default_rng([seed, i])
        a = rng.standard_normal(a_shape, np.float32) / math.sqrt(math.prod(dense.in_shape))
        dtype = jnp.float32 if jnp.issubdtype(kernel.dtype, jnp.integer) else kernel.dtype  # a quantized base
        # nnx.data: the attributes were None (static) until now
        dense.lora_a = nnx.data(nnx.Param(jnp.asarray(a, dtype), out_sharding=stack_axes + in_axes + ("lora_rank",),
                                          eager_sharding=False))
        dense.lora_b = nnx.data(nnx.Param(jnp.zeros(stack + (lcfg.rank,) + dense.out_shape, dtype),
                                          out_sharding=stack_axes + ("lora_rank",) + out_axes, eager_sharding=False))
        dense.lora_scale = float(lcfg.alpha) / float(lcfg.rank)
    return model


def cast_base(model, dtype):
    """Store every floating parameter of `model` except the adapters in `dtype` (in place), for
    `lora.base_weights="bfloat16"`: the frozen base takes half the memory; with a bfloat16 compute
    dtype its projections compute exactly what they did, since a Dense casts its kernel to the
    compute dtype anyway."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param) and not is_adapter(path) and jnp.issubdtype(node.dtype, jnp.floating):
            node.value = node.value.astype(dtype)
    return model


def frozen_base(flat: dict, cfg) -> dict:
    """Flat base parameters {path: array} in the form the adapted model `cfg` stores its frozen base:
    quantized (QLoRA, `cfg.quant`), cast to bfloat16, or as they are."""
    from molmo_jax.layers import quant
    from molmo_jax.models import abstract_model

    if quant.enabled(cfg):
        return quant.quantize_params(flat, abstract_model(cfg), cfg.quant)
    if cfg.lora.get("base_weights") == "bfloat16":
        return {p: (v.astype(jnp.bfloat16) if jnp.issubdtype(v.dtype, jnp.floating) else v) for p, v in flat.items()}
    return flat


def delta(a, b, n_stack: int):
    """A B contracted over the rank: [*stack, *in, r] x [*stack, r, *out] -> [*stack, *in, *out]."""
    stack = a.shape[:n_stack]
    a2 = a.reshape(stack + (-1, a.shape[-1]))
    b2 = b.reshape(stack + (b.shape[n_stack], -1))
    return (a2 @ b2).reshape(a.shape[:-1] + b.shape[n_stack + 1:])


def merge(flat: dict, cfg) -> dict:
    """Flat {path: array} of a model with adapters -> the same without them, each targeted kernel
    replaced by W + (alpha / r) A B (in float32, cast back to the kernel's dtype)."""
    scale = float(cfg.lora.alpha) / float(cfg.lora.rank)
    out = {p: v for p, v in flat.items() if not is_adapter(p)}
    for path in [p for p in flat if str(p[-1]) == "lora_a"]:
        base = path[:-1]
        a, b = (np.asarray(jax.device_get(flat[base + (n,)]), np.float32) for n in ADAPTERS)
        kernel = flat[base + ("kernel",)]
        n_stack = a.ndim + b.ndim - 2 - kernel.ndim  # A [*s, *in, r], B [*s, r, *out], W [*s, *in, *out]
        merged = np.asarray(jax.device_get(kernel), np.float32) + scale * delta(a, b, n_stack)
        out[base + ("kernel",)] = merged.astype(np.asarray(kernel).dtype)
    return out
