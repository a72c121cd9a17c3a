"""Generation with a KV cache (spec section 14): prefill once with the images, then one token a step.

Shapes are static: the cache holds `cache_len` slots (a bucket >= prompt + new tokens). Slot s of
the cache holds prompt token s for s < T (padding slots stay but are masked) and generated token
s - T after that. Position ids continue from each row's last *valid* prompt position, so right
padded prompts of different lengths decode together (spec 14.2-14.3, pitfall 35).

The decode loop runs inside one jitted `lax.while_loop` that exits as soon as every row has
produced EOS, so a step costs one small XLA call, not a Python round trip.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from molmo_jax.model import positions_from_mask

CACHE_BUCKET = 64  # cache lengths are rounded up to a multiple of this (bounded recompilation)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick the next token. temperature 0 = greedy (the reference's setting)."""
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0          # 0 = off
    top_p: float = 1.0      # 1 = off
    seed: int = 0


def cache_length(prompt_len: int, max_new_tokens: int, bucket: int = CACHE_BUCKET) -> int:
    n = prompt_len + max_new_tokens
    return -(-n // bucket) * bucket


def init_cache(cfg, batch: int, length: int):
    l = cfg.llm
    shape = (l.n_layers, batch, length, l.n_kv_heads, l.head_dim)
    return jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)


def prefill(model, input_ids, images, image_masks, image_input_idx, cache_len: int):
    """Run the prompt (with images) into a fresh cache. Returns (first-step logits [B, V] taken at
    each row's last valid token, cache, last valid position [B], slot validity [B, S])."""
    b, t = input_ids.shape
    valid = input_ids != -1
    positions = positions_from_mask(valid)
    slots_valid = jnp.zeros((b, cache_len), bool).at[:, :t].set(valid)
    causal = jnp.arange(cache_len)[None, :] <= jnp.arange(t)[:, None]
    mask = (causal[None] & slots_valid[:, None, :])[:, None, None]
    x = model.embed_inputs(input_ids, images, image_masks, image_input_idx)
    cache = init_cache(model.cfg, b, cache_len)
    h, _, cache = model.llm(x, positions, mask, cache=cache, cache_index=0)
    last = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0)
    logits = model.llm.logits(h[jnp.arange(b), last])
    return logits.astype(jnp.float32), cache, positions[jnp.arange(b), last], slots_valid


def decode_step(model, tokens, positions, cache, slots_valid, slot):
    """One new token per row at cache slot `slot` (same for every row). Returns (logits, cache,
    slots_valid)."""
    slots_valid = slots_valid.at[:, slot].set(True)
    mask = slots_valid[:, None, None, None, :]
    x = model.llm.embed(tokens[:, None])
    h, _, cache = model.llm(x, positions[:, None], mask, cache=cache, cache_index=slot)
    return model.llm.logits(h[:, 0]).astype(jnp.float32), cache, slots_valid


def choose(logits, sampling: Sampling, key):
    """Greedy, or temperature / top-k / top-p sampling (seeded)."""
    if sampling.temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        keep = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate_arrays(model, batch: dict, sampling: Sampling, eos_id: int, return_logits: bool = False):
    """Decode up to `sampling.max_new_tokens` tokens for a batch. Returns a dict with `tokens`
    [B, N] (-1 after a row's EOS... EOS itself is kept), `lengths` [B], and with
    `return_logits` the per-step logits [B, N, V]."""
    ids = batch["input_ids"]
    n = sampling.max_new_tokens
    b, t = ids.shape
    cache_len = cache_length(t, n)
    logits, cache, pos, slots_valid = prefill(model, ids, batch.get("images"), batch.get("image_masks"),
                                              batch.get("image_input_idx"), cache_len)
    vocab = logits.shape[-1]
    key = jax.random.key(sampling.seed)
    out_tokens = jnp.full((b, n), -1, jnp.int32)
    out_logits = jnp.zeros((b, n, vocab) if return_logits else (b, 0, vocab), jnp.float32)
    done = jnp.zeros((b,), bool)

    def cond(c):
        step, done = c[0], c[5]
        return (step < n) & ~jnp.all(done)

    def body(c):
        step, logits, cache, pos, slots_valid, done, out_tokens, out_logits, key = c
        key, sub = jax.random.split(key)
        tok = choose(logits, sampling, sub)
        tok = jnp.where(done, -1, tok)
        out_tokens = out_tokens.at[:, step].set(tok)
        if return_logits:
            out_logits = out_logits.at[:, step].set(logits)
        done = done | (tok == eos_id)
        pos = pos + 1
        logits, cache, slots_valid = decode_step(model, jnp.maximum(tok, 0), pos, cache, slots_valid, t + step)
        return step + 1, logits, cache, pos, slots_valid, done, out_tokens, out_logits, key

    carry = (jnp.int32(0), logits, cache, pos, slots_valid, done, out_tokens, out_logits, key)
    carry = jax.lax.while_loop(cond, body, carry)
    out_tokens = carry[6]
    result = {"tokens": out_tokens, "lengths": jnp.sum(out_tokens >= 0, axis=1)}
    if return_logits:
        result["step_logits"] = carry[7]
    return result


class Generator:
    """Jit-compiled generation for one model; compiled programs are cached per input shape."""

    def __init__(self, model, eos_id: int):
        self.graphdef, self.state = nnx.split(model)
        self.eos_id = eos_id

    @functools.partial(jax.jit, static_argnums=(0, 3, 4))
    def _run(self, state, batch, sampling, return_logits):
        model = nnx.merge(self.graphdef, state)
        return generate_arrays(model, batch, sampling, self.eos_id, return_logits)

    def __call__(self, batch: dict, sampling: Sampling = Sampling(), return_logits: bool = False) -> dict:
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "images", "image_masks", "image_input_idx")}
        out = self._run(self.state, batch, sampling, return_logits)
        return jax.tree.map(np.asarray, out)

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other
