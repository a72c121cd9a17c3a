"""Generation with a KV cache (docs/architecture.md#7-generation): prefill once with the images, then
one token a step, through the model's own decoder blocks and attention (`layers.attention`).

Shapes are static: the cache holds `cache_len` slots (a bucket >= prompt + new tokens); slot s holds
prompt token s for s < T (padding slots stay but are masked), then generated token s - T. Position
ids continue from each row's last *valid* prompt position, so right padded prompts of different
lengths decode together.

Speed (a decode step is memory-bound: it reads all LLM weights once):
- Layers are unrolled over per-layer weight copies made once in `Generator.__init__` (a `lax.scan`
  over stacked weights slices, i.e. copies, every layer's weights at every step).
- The cache is one `KVCache` per layer, [rows, kv_heads, slots, head_dim]: the attention dots read
  it in place and the new slot is written in place.
- The loop is one jitted `lax.while_loop` that exits once every row is done; only with stop strings
  does the host look at the text, every `STOP_CHECK_EVERY` tokens (every token for beam search,
  so that a stopped beam's score holds no token after the stop).

Beam search keeps K beams per prompt; a finished beam stays and may only continue with EOS at
log-prob 0 (the original's AllenNLP-style search). Beams compete on summed token log-probs; the
final choice among the K divides that by length ** `length_penalty` (0 = plain sum, the original's).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from molmo_jax.layers.attention import KVCache, Mask, positions_from_mask
from molmo_jax.models.molmo import Molmo
from molmo_jax.sharding import batch_sharding, constrain, use_mesh

CACHE_BUCKET = 64      # cache lengths are rounded up to a multiple of this (bounded recompilation)
STOP_CHECK_EVERY = 16  # tokens decoded between two host-side stop-string checks
MODEL_INPUTS = Molmo.PROMPT_INPUTS  # a Molmo batch's prompt arrays (other families: their PROMPT_INPUTS)
CACHE_AXES = ("batch", "kv_heads", "seq", "head_dim")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick tokens. temperature 0 and beam_size 1 = greedy (the reference's setting)."""
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0                 # 0 = off
    top_p: float = 1.0             # 1 = off
    seed: int = 0
    beam_size: int = 1
    length_penalty: float = 0.0    # beam search: final score = sum log-prob / length ** this
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        stops = self.stop_strings
        object.__setattr__(self, "stop_strings", (stops,) if isinstance(stops, str) else tuple(stops))
        problems = [f"{name}={getattr(self, name)!r} {why}" for name, bad, why in (
            ("max_new_tokens", self.max_new_tokens < 1, "must be >= 1"),
            ("temperature", self.temperature < 0, "must be >= 0"),
            ("top_k", self.top_k < 0, "must be >= 0"),
            ("top_p", not 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("beam_size", self.beam_size < 1, "must be >= 1"),
            ("stop_strings", not all(isinstance(s, str) and s for s in self.stop_strings),
             "must be non-empty strings"),
            ("beam_size", self.beam_size > 1 and self.temperature > 0,
             "cannot be combined with sampling (temperature > 0)"))
            if bad]
        if problems:
            raise ValueError("Sampling: " + "; ".join(problems))

    def program(self) -> "Sampling":
        """The fields that shape the compiled program (seed, stop strings and length penalty are not)."""
        return dataclasses.replace(self, seed=0, stop_strings=(), length_penalty=0.0)


def cache_length(prompt_len: int, max_new_tokens: int, bucket: int = CACHE_BUCKET) -> int:
    n = prompt_len + max_new_tokens
    return -(-n // bucket) * bucket


# ------------------------------------------------------------------------------------------------
# The model's own blocks, one layer at a time, with a KV cache per layer (layers.attention.KVCache)

def _run_blocks(blocks, x, positions, mask, cache, index):
    """x through every block, each reading and updating its layer's cache at slot `index`."""
    new_cache = []
    for layer, (block, layer_cache) in enumerate(zip(blocks, cache)):
        x = constrain(x, ("batch", "seq", "act_embed"))
        x, layer_cache = block(x, positions, mask, cache=layer_cache, cache_index=index, layer=layer)
        new_cache.append(KVCache(*(constrain(a, CACHE_AXES) for a in layer_cache)))
    return x, new_cache


def decode_step(model, blocks, tokens, positions, cache, slots_valid, slot):
    """Logits [R, V] (float32) for one new token per row at cache slot `slot`; returns
    (logits, cache, slots_valid)."""
    slots_valid = slots_valid.at[:, slot].set(True)
    x = model.llm.embed(tokens[:, None])
    x, cache = _run_blocks(blocks, x, positions[:, None], Mask(kv_valid=slots_valid), cache, slot)
    logits = model.llm.logits(model.llm.ln_f(x)[:, 0]).astype(jnp.float32)
    return logits, cache, slots_valid


def prefill(model, blocks, batch, cache_len: int):
    """Run the prompt (with images) through the model's blocks, filling slots 0..T-1 of a fresh cache.
    The model family turns the batch (its `PROMPT_INPUTS`) into embeddings (`embed_batch`) and says
    which prompt tokens attend to each other both ways (`token_groups`, or None).
    Returns (first-step logits [B, V] at each row's last valid token, cache, last valid position
    [B], slot validity [B, S])."""
    ids = batch["input_ids"]
    b, t = ids.shape
    valid = ids != -1
    positions = positions_from_mask(valid)
    slots_valid = jnp.zeros((b, cache_len), bool).at[:, :t].set(valid)  # the slots after the prompt are empty
    x = model.embed_batch(batch)
    groups = model.token_groups(batch)
    if groups is not None:  # generated tokens are text: no group
        groups = jnp.pad(groups, ((0, 0), (0, cache_len - t)), constant_values=-1)
    l = model.cfg.llm
    empty = [KVCache.empty(b, l.n_kv_heads, cache_len, l.head_dim, x.dtype) for _ in blocks]
    x, cache = _run_blocks(blocks, x, positions, Mask(causal=True, kv_valid=slots_valid, groups=groups), empty, 0)
    last = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0)
    logits = model.llm.logits(model.llm.ln_f(x)[jnp.arange(b), last]).astype(jnp.float32)
    return logits, cache, positions[jnp.arange(b), last], slots_valid


# ------------------------------------------------------------------------------------------------
# Choosing tokens

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


def _sample_choice(c, sampling, eos_id):
    """Next token of every row (-1 once a row is done) and the log-prob it adds to the score."""
    key, sub = jax.random.split(c["key"]) if sampling.temperature > 0 else (c["key"], None)
    tok = jnp.where(c["done"], -1, choose(c["logits"], sampling, sub))
    picked = jnp.take_along_axis(c["logits"], jnp.maximum(tok, 0)[:, None], axis=1)[:, 0]
    logp = picked - jax.nn.logsumexp(c["logits"], axis=-1)
    return dict(c, key=key), tok, jnp.where(c["done"], 0.0, logp)


def _beam_choice(c, sampling, eos_id):
    """Best `beam_size` extensions of each prompt's beams; rows are [B * K] in beam-major order."""
    k = sampling.beam_size
    rows, vocab = c["logits"].shape
    logp = jax.nn.log_softmax(c["logits"])
    finished = jnp.where(jnp.arange(vocab) == eos_id, 0.0, -jnp.inf)  # a done beam may only add EOS
    logp = jnp.where(c["done"][:, None], finished[None], logp)
    cand = (c["scores"][:, None] + logp).reshape(rows // k, k * vocab)
    scores, flat = jax.lax.top_k(cand, k)
    parent = (flat // vocab + jnp.arange(rows // k)[:, None] * k).reshape(rows)
    tok = (flat % vocab).reshape(rows).astype(jnp.int32)
    was_done = c["done"][parent]
    tok = jnp.where(was_done, -1, tok)
    scores = scores.reshape(rows)
    logp = jnp.where(was_done, 0.0, scores - c["scores"][parent])
    c = dict(c, scores=scores, done=was_done, tokens=c["tokens"][parent], logps=c["logps"][parent],
             pos=c["pos"][parent], slots_valid=c["slots_valid"][parent],
             cache=jax.tree.map(lambda a: a[parent], c["cache"]))
    return c, tok, logp


def _decode_loop(model, blocks, c, limit, sampling: Sampling, eos_id: int, return_logits: bool):
    """Decode until `limit` tokens exist or every row is done (one lax.while_loop)."""
    n = sampling.max_new_tokens
    pick = _beam_choice if sampling.beam_size > 1 else _sample_choice

    def body(c):
        step = c["step"]
        if return_logits:
            c = dict(c, step_logits=c["step_logits"].at[:, step].set(c["logits"]))
        c, tok, logp = pick(c, sampling, eos_id)
        done = c["done"] | (tok == eos_id)
        c = dict(c, tokens=c["tokens"].at[:, step].set(tok), logps=c["logps"].at[:, step].set(logp), done=done,
                 pos=c["pos"] + 1, step=step + 1)

        def forward(c):
            logits, cache, slots_valid = decode_step(model, blocks, jnp.maximum(tok, 0), c["pos"], c["cache"],
                                                     c["slots_valid"], c["prompt_len"] + step)
            return dict(c, logits=logits, cache=cache, slots_valid=slots_valid)
        # The last token's logits are never used: skip that forward (and the one after all stopped).
        return jax.lax.cond((step + 1 < n) & ~jnp.all(done), forward, lambda c: c, c)

    return jax.lax.while_loop(lambda c: (c["step"] < limit) & ~jnp.all(c["done"]), body, c)


def _initial_carry(model, blocks, batch, key, sampling: Sampling, return_logits: bool):
    n, k = sampling.max_new_tokens, sampling.beam_size
    b, t = batch["input_ids"].shape
    logits, cache, pos, slots_valid = prefill(model, blocks, batch, cache_length(t, n))
    rows = b * k
    if k > 1:  # every beam starts from the prompt; only beam 0 is live, so the first step picks K tokens
        logits, cache, pos, slots_valid = jax.tree.map(lambda a: jnp.repeat(a, k, axis=0),
                                                       (logits, cache, pos, slots_valid))
        scores = jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf), b)
    else:
        scores = jnp.zeros((rows,), jnp.float32)
    return dict(step=jnp.int32(0), prompt_len=jnp.int32(t), logits=logits, cache=cache, pos=pos,
                slots_valid=slots_valid, done=jnp.zeros((rows,), bool), tokens=jnp.full((rows, n), -1, jnp.int32),
                logps=jnp.zeros((rows, n), jnp.float32), scores=scores, key=key,
                step_logits=jnp.zeros((rows, n if return_logits else 0, logits.shape[-1]), jnp.float32))


# ------------------------------------------------------------------------------------------------
# The user-facing generator

def _unstack(stacked_state, n_layers: int) -> list:
    """Per-layer copies of stacked block weights in their shardings (the layer axis is never split)."""
    def take(a, i):
        sharding = getattr(a, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
            return jax.jit(lambda x: x[i], out_shardings=out)(a)
        return a[i]
    return [jax.tree.map(lambda a: take(a, i), stacked_state) for i in range(n_layers)]


def check_fits(prompt_tokens: int, max_new_tokens: int, cfg):
    """ValueError when a prompt plus its new tokens does not fit the model's context."""
    limit = cfg.llm.max_sequence_length
    if prompt_tokens + max_new_tokens > limit:
        raise ValueError(f"a prompt of {prompt_tokens} tokens plus {max_new_tokens} new tokens exceeds the "
                         f"model's context of {limit} tokens (llm.max_sequence_length): shorten the prompt, "
                         "use fewer crops or ask for fewer new tokens")


class Generator:
    """Jit-compiled generation for one model; compiled programs are cached per input shape (the
    jitted methods take `self` as a static argument: hashed by identity).

    `detokenize(ids) -> str` is needed for stop strings. With `mesh`, batches are split over its
    batch axes and the cache is sharded like the activations (kv heads over `tensor`).
    The generator holds per-layer copies of the decoder blocks: drop the model to free the stacked
    ones."""

    def __init__(self, model, eos_id: int, detokenize: Callable[[Sequence[int]], str] | None = None,
                 mesh=None):
        self.cfg = model.cfg
        self.inputs = type(model).PROMPT_INPUTS
        self.eos_id = int(eos_id)
        self.detokenize = detokenize
        self.mesh = mesh
        is_block = lambda path, _: tuple(str(p) for p in path[:2]) == ("llm", "blocks")  # noqa: E731
        self.graphdef, blocks, self.rest = nnx.split(model, is_block, ...)
        self.abstract_blocks = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), blocks)
        self.block_graphdef, stacked = nnx.split(model.llm.blocks)
        self.layers = _unstack(stacked, self.cfg.llm.n_layers)

    def _modules(self, rest, layers):
        model = nnx.merge(self.graphdef, self.abstract_blocks, rest)  # blocks left abstract: never called
        return model, [nnx.merge(self.block_graphdef, layer) for layer in layers]

    @functools.partial(jax.jit, static_argnums=(0, 5, 6))
    def _prefill(self, rest, layers, batch, key, program, return_logits):
        model, blocks = self._modules(rest, layers)
        return _initial_carry(model, blocks, batch, key, program, return_logits)

    @functools.partial(jax.jit, static_argnums=(0, 5, 6), donate_argnums=(3,))
    def _decode(self, rest, layers, carry, limit, program, return_logits):
        model, blocks = self._modules(rest, layers)
        return _decode_loop(model, blocks, carry, limit, program, self.eos_id, return_logits)

    def __call__(self, batch: dict, sampling: Sampling = Sampling(), return_logits: bool = False,
                 timings: dict | None = None) -> dict:
        """Decode a batch (the Collator's layout; padding -1). Returns numpy arrays:
        tokens [B, N] (EOS kept, -1 after the end), lengths [B], scores [B] (sum of the chosen
        tokens' log-probs; for beams divided by length ** length_penalty), finish [B] ("eos",
        "stop" or "length"), with `return_logits` step_logits [B, N, V] (greedy/sampling only), and
        for beam search beam_tokens [B, K, N] / beam_scores [B, K] of every final beam.
        A `timings` dict gets prefill_s and decode_s (the prefill is then waited for on its own)."""
        batch = {k: np.asarray(v) for k, v in batch.items() if k in self.inputs and v is not None}
        vocab = self.cfg.llm.embedding_size
        shapes = {k: v.shape for k, v in batch.items()}
        for bad, why in (("input_ids" not in batch or batch["input_ids"].ndim != 2,
                          f"batch needs input_ids [B, T]; got {shapes}"),
                         (sampling.beam_size > 1 and return_logits, "return_logits needs beam_size 1"),
                         (sampling.stop_strings and self.detokenize is None,
                          "stop strings need a Generator made with detokenize=..."),
                         (max(sampling.top_k, sampling.beam_size) > vocab,
                          f"top_k / beam_size > vocabulary ({vocab})")):
            if bad:
                raise ValueError(why)
        check_fits(int((batch["input_ids"] != -1).sum(axis=1).max(initial=0)), sampling.max_new_tokens, self.cfg)
        program, key = sampling.program(), jax.random.key(sampling.seed)
        with use_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            if self.mesh is not None:
                batch = {k: jax.device_put(v, batch_sharding(self.mesh, v.ndim, v.shape[0])) for k, v in batch.items()}
            start = time.perf_counter()
            carry = self._prefill(self.rest, self.layers, batch, key, program, return_logits)
            if timings is not None:
                jax.block_until_ready(carry)
                timings["prefill_s"] = time.perf_counter() - start
                start = time.perf_counter()
            carry = jax.block_until_ready(self._run(carry, sampling, program, return_logits))
            if timings is not None:
                timings["decode_s"] = time.perf_counter() - start
        return self._outputs(carry, sampling, return_logits)

    def _run(self, carry, sampling, program, return_logits):
        """The decode loop; with stop strings in chunks, the host marking rows whose text holds one
        as done in between (their tokens are cut in `_outputs`)."""
        n = sampling.max_new_tokens
        if not sampling.stop_strings:
            return self._decode(self.rest, self.layers, carry, jnp.int32(n), program, return_logits)
        every = 1 if sampling.beam_size > 1 else STOP_CHECK_EVERY
        step = 0
        while True:
            carry = self._decode(self.rest, self.layers, carry, jnp.int32(min(n, step + every)), program,
                                 return_logits)
            step = int(carry["step"])
            done, tokens = np.array(carry["done"]), np.asarray(carry["tokens"])
            for row in np.flatnonzero(~done):
                if has_stop(tokens[row], sampling.stop_strings, self.detokenize):
                    done[row] = True
            if step >= n or done.all():
                return carry
            carry = dict(carry, done=jnp.asarray(done))

    def _outputs(self, carry, sampling, return_logits):
        tokens = np.array(carry["tokens"])
        finish = np.where((tokens == self.eos_id).any(axis=1), "eos", "length").astype(object)
        for row in range(len(tokens)) if sampling.stop_strings else ():
            kept = stop_position(tokens[row], sampling.stop_strings, self.detokenize)
            if kept is not None:
                tokens[row, kept:] = -1
                finish[row] = "stop"
        lengths = (tokens >= 0).sum(axis=1)
        # sum of the kept tokens' log-probs (tokens after a stop string are not counted)
        scores = np.where(tokens >= 0, np.asarray(carry["logps"], np.float64), 0.0).sum(axis=1)
        out = {}
        if sampling.beam_size > 1:
            k = sampling.beam_size
            if sampling.length_penalty:
                scores = scores / np.maximum(lengths, 1) ** sampling.length_penalty
            b = tokens.shape[0] // k
            beam_tokens, beam_scores = tokens.reshape(b, k, -1), scores.reshape(b, k)
            best = np.argmax(beam_scores, axis=1) + np.arange(b) * k
            out.update(beam_tokens=beam_tokens, beam_scores=beam_scores)
            tokens, scores, lengths, finish = tokens[best], scores[best], lengths[best], finish[best]
        out.update(tokens=tokens, lengths=lengths, scores=scores, finish=finish.astype(str))
        if return_logits:
            out["step_logits"] = np.asarray(carry["step_logits"])
        return out


def has_stop(tokens, stop_strings, detokenize) -> bool:
    text = detokenize([int(t) for t in tokens if t >= 0])
    return any(s in text for s in stop_strings)


def stop_position(tokens, stop_strings, detokenize) -> int | None:
    """The number of leading tokens whose text first contains a stop string (None: no stop string).
    `tokens` may hold -1 (nothing) entries. Binary search: a longer prefix's text extends a shorter's."""
    ids = [int(t) for t in tokens if t >= 0]
    if not has_stop(ids, stop_strings, detokenize):
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if has_stop(ids[:mid], stop_strings, detokenize):
            hi = mid
        else:
            lo = mid + 1
    return lo


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)
