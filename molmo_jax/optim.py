"""The original's optimiser recipe (docs/architecture.md#optimiser), built from optax pieces.

Parameters fall into groups chosen by regex on their path ("llm/blocks/attn/wq/kernel"), big_vision
style; the first matching group wins. Each group has its own peak learning rate, warmup, cosine decay
to `min_lr_ratio` of the peak, AdamW hyper-parameters and gradient clipping by the group's own global
norm. Parameters matching `frozen` get no update (the base token embedding, by default).
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

# Groups of the original (docs/architecture.md#optimiser): the connector includes the new embedding rows.
DEFAULT_GROUPS = (
    ("connector", r"^(connector/|llm/new_embedding$)"),
    ("vit", r"^vision/"),
    ("llm", r"^llm/"),
)
DEFAULT_FROZEN = r"^llm/embedding$"
# Excluded from weight decay by name, as the original (moot with its weight decay of 0).
NO_DECAY = re.compile(r"(embedding|norm|pre_ln|ln_f|/bias$)")


def optimizer_config(**groups) -> ml_collections.ConfigDict:
    """Config block: `groups` maps a group name to dict(lr=..., warmup=...); other fields shared."""
    c = ml_collections.ConfigDict(dict(
        b1=0.9, b2=0.95, eps=1e-6, weight_decay=0.0, max_grad_norm=1.0, min_lr_ratio=0.1,
        frozen=DEFAULT_FROZEN,
        group_patterns=dict(DEFAULT_GROUPS),
        groups={name: dict(lr=1e-5, warmup=200) for name, _ in DEFAULT_GROUPS},
    ))
    for name, values in groups.items():
        c.groups[name].update(values)
    return c


def schedule(peak: float, warmup: int, total: int, min_ratio: float = 0.1):
    """Linear warmup from 0, cosine to min_ratio * peak at `total`, then flat (docs/architecture.md#optimiser).

    optax counts from 0 before the first update; the original's step s starts at 1.
    """
    lo = peak * min_ratio

    def lr(count):
        s = count + 1
        warm = peak * s / max(warmup, 1)
        frac = jnp.clip((s - warmup) / max(total - warmup, 1), 0.0, 1.0)
        cos = lo + (peak - lo) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
        return jnp.where(s < warmup, warm, jnp.where(s < total, cos, lo))
    return lr


class ClipState(NamedTuple):
    pass


def clip_by_group_norm(max_norm: float) -> optax.GradientTransformation:
    """Scale by min(1, max_norm / (norm + 1e-6)) with the norm of this group alone (docs/architecture.md#optimiser)."""
    def update(updates, state, params=None):
        norm = optax.global_norm(updates)
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: ClipState(), update)


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def group_labels(params, cfg) -> dict:
    """Tree of group names matching `params` ("frozen" for frozen parameters)."""
    patterns = [(name, re.compile(p)) for name, p in cfg.group_patterns.items()]
    frozen = re.compile(cfg.frozen) if cfg.frozen else None

    def label(path, _):
        s = path_str(path)
        if frozen is not None and frozen.search(s):
            return "frozen"
        for name, pattern in patterns:
            if pattern.search(s):
                return name
        raise ValueError(f"parameter {s} matches no optimizer group ({', '.join(cfg.group_patterns)})")
    return jax.tree_util.tree_map_with_path(label, params)


def _decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda p, x: not NO_DECAY.search(path_str(p)), params)


def make_optimizer(cfg, total_steps: int):
    """optax transformation over a pure parameter tree, and the per-group schedules (for logging)."""
    transforms, schedules = {"frozen": optax.set_to_zero()}, {}
    for name in cfg.group_patterns:
        g = cfg.groups[name]
        sched = schedule(g["lr"], g["warmup"], total_steps, cfg.min_lr_ratio)
        schedules[name] = sched
        transforms[name] = optax.chain(
            clip_by_group_norm(cfg.max_grad_norm),
            optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=_decay_mask, mu_dtype=jnp.float32),
        )
    return (lambda params: optax.multi_transform(transforms, group_labels(params, cfg))), schedules


def group_grad_norms(grads, labels) -> dict:
    leaves = jax.tree.leaves(jax.tree.map(lambda g, l: (l, g), grads, labels),
                             is_leaf=lambda x: isinstance(x, tuple))
    out = {}
    for name in sorted(set(l for l, _ in leaves) - {"frozen"}):
        out[name] = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for l, g in leaves if l == name))
    return out


def pure(state) -> dict:
    """nnx State -> plain nested dict of arrays (what optax and orbax see)."""
    return nnx.to_pure_dict(state)
