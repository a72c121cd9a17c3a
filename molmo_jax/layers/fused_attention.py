"""Attention that never writes its T x T scores to memory: kernels from maintained libraries behind
the one attention core (`layers.attention.attend`, config `model.attention`).

  TPU   splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), one kernel per kv
        head (grouped-query heads as its multi-query form), blocks of 128-512 tokens. Sequences are
        padded to a multiple of 128 and the padding masked (the ViT's 577 tokens become 640).
        Masks: causal or full, with valid keys as segment ids; packed conversations
        (docs/architecture.md#packing) and bidirectional groups (the image tokens of a Molmo2
        prompt) as a dynamic mask of one boolean per query and key and example (not per head),
        built by `Mask.dense`, from which the kernel skips every fully masked block.
  GPU   cuDNN through `jax.nn.dot_product_attention` (bfloat16 / float16; float32 stays dense).
  CPU   the splash kernel in Pallas interpret mode, for tests only: "auto" is dense on CPUs.

Under a mesh the kernel runs per shard (`jax.shard_map`): batch over the batch axes, heads over
`tensor` when both the query and the kv heads divide it. Dropout is not fused: with attention
dropout the dense path runs.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from molmo_jax import sharding
from molmo_jax.layers.attention import Mask

BLOCK = 128  # sequences are padded to a multiple of this; blocks are 128, 256 or 512 tokens


def kernel_for(impl: str, dtype):
    """The fused kernel `impl` ("fused" or "auto") selects here, or None for the dense path."""
    where = sharding.platform()
    if where == "tpu" or (where == "cpu" and impl == "fused"):
        return functools.partial(splash, interpret=where == "cpu")
    if where == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return cudnn
    return None


# ------------------------------------------------------------------------------------------------
# TPU: splash attention

def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _block(n: int) -> int:
    return next(b for b in (512, 256, 128) if n % b == 0)


def _pad(x, length: int, axis: int, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def splash(q, k, v, mask, interpret: bool = False):
    """q [B, T, Hq, d], k / v [B, S, Hkv, d] -> [B, T, Hq, d] by splash attention under `mask`."""
    return _per_shard(functools.partial(_splash_local, causal=mask.causal, interpret=interpret),
                      q, k, v, mask.kv_valid, mask.segments, mask.groups)


def _splash_local(q, k, v, kv_valid, segments, groups, *, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    tp, sp = _round_up(t, BLOCK), _round_up(s, BLOCK)
    bq, bkv = _block(tp), _block(sp)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    # [B, Hkv, G, T, d] queries (scaled here: the kernel does not), [B, Hkv, S, d] keys and values
    q = _pad(q * (1.0 / math.sqrt(d)), tp, 1).reshape(b, tp, hkv, hq // hkv, d).transpose(0, 2, 3, 1, 4)
    k, v = (_pad(x, sp, 1).transpose(0, 2, 1, 3) for x in (k, v))
    kv_valid = _pad(jnp.ones((b, s), bool) if kv_valid is None else kv_valid, sp, 1, False)
    kwargs = dict(block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)

    if segments is not None or groups is not None:  # one boolean per (query, key) of each example, shared by heads
        segments, groups = (None if a is None else _pad(a, sp, 1, -1) for a in (segments, groups))

        def one_example(q, k, v, valid, seg, grp):
            one = lambda a: None if a is None else a[None]  # noqa: E731
            allowed = Mask(causal, valid[None], one(seg), one(grp)).dense(tp, sp)[0, 0, 0]
            kernel = sa.make_splash_mqa(allowed[None], **kwargs)
            # The kernel turns every MaskInfo field into an array, also the flag it branches on in
            # Python; under jit that flag is a tracer, so it is set back to the constant it is.
            kernel.fwd_mask_info = kernel.fwd_mask_info._replace(is_dynamic_mask=True)
            return jax.vmap(kernel)(q, k, v)
        out = jax.vmap(one_example)(q, k, v, kv_valid, segments, groups)
    else:
        static = (sa.CausalMask((tp, sp)) if causal else sa.FullMask((tp, sp)))
        kernel = sa.make_splash_mqa(sa.MultiHeadMask([static] * (hq // hkv)), **kwargs)
        # padded (and invalid) keys get segment 0, every query segment 1: they are never read
        q_seg = jnp.ones((b, tp), jnp.int32)
        kv_seg = kv_valid.astype(jnp.int32)

        def one_example(q, k, v, q_seg, kv_seg):
            ids = sa.SegmentIds(q_seg, kv_seg)
            return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)
        out = jax.vmap(one_example)(q, k, v, q_seg, kv_seg)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tp, hq, d)[:, :t]


# ------------------------------------------------------------------------------------------------
# GPU: cuDNN

def cudnn(q, k, v, mask):
    """jax.nn.dot_product_attention's cuDNN kernel (grouped-query heads natively)."""
    dense = mask.dense(q.shape[1], k.shape[1])
    return jax.nn.dot_product_attention(q, k, v, mask=None if dense is None else dense[:, 0],
                                        implementation="cudnn")


# ------------------------------------------------------------------------------------------------
# Sharding: the kernel sees one shard

def _per_shard(fn, q, k, v, kv_valid, segments, groups):
    mesh = sharding.current_mesh()
    if mesh is None:
        return fn(q, k, v, kv_valid, segments, groups)
    batch = sharding.spec_for(("batch",), (q.shape[0],), mesh)[0]
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and q.shape[2] % tensor == 0 and k.shape[2] % tensor == 0 else None
    qkv = P(batch, None, heads, None)
    vec = P(batch, None)
    args = (q, k, v, kv_valid, segments, groups)
    specs = (qkv, qkv, qkv, vec, vec, vec)
    present = [i for i, a in enumerate(args) if a is not None]

    def local(*present_args):
        full = [None] * len(args)
        for i, a in zip(present, present_args):
            full[i] = a
        return fn(*full)
    return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs[i] for i in present), out_specs=qkv,
                         check_vma=False)(*(args[i] for i in present))


def score_buffers(hlo_text: str, lengths) -> list[str]:
    """Floating-point shapes in compiled HLO text whose last two dimensions are both one of `lengths`
    (e.g. 2304 and 577): the T x T (or T x S) scores fused attention must not write. Boolean masks
    ("pred", one byte per query and key) are not scores and are not listed."""
    import re

    lengths = {int(n) for n in lengths}
    found = set()
    for dtype, dims in re.findall(r"\b(f32|bf16|f16|f64)\[([\d,]+)\]", hlo_text):
        shape = [int(x) for x in dims.split(",") if x]
        if len(shape) >= 2 and shape[-1] in lengths and shape[-2] in lengths:
            found.add(f"{dtype}[{dims}]")
    return sorted(found)
