"""The mixture of experts through a grouped-matmul kernel, one shard at a time.

XLA's generic `ragged_dot` is exact, but on TPU its weight gradient (a ragged contraction over the
tokens) is lowered as a dense product of every expert with every routed token: 64 experts x top-8
made a MolmoE-1B step do ~8.6x its model FLOPs. Here the three expert projections run through
Pallas megablox `gmm` (forward and input gradient) and `tgmm` (weight gradient), which visit only the
row tiles of each expert's own tokens (docs/architecture.md#mixture-of-experts).

A Pallas call is not partitioned by the SPMD partitioner, so the whole block runs under
`jax.shard_map`: each device routes and sorts its own tokens (batch over the batch axes), holds the
hidden width of every expert split over `tensor` (partial outputs summed over `tensor`), and, with
an `expert` mesh axis, only its slice of the experts: the tokens of its `expert` group are gathered,
each device computes the rows routed to its experts (the kernel's `group_offset`; other rows are
neither computed nor read) and the combined outputs are reduce-scattered back to their devices.

On CPU the kernel runs in Pallas interpret mode (tests); `moe_impl="auto"` picks it on TPU only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from molmo_jax import sharding

TILE_M, TILE_K, TILE_N = 512, 1024, 1024  # megablox's usual tiles; smaller dims use the whole dim
LANE = 128  # a TPU block's last dimension is a multiple of this or the array's whole dimension


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """Row, contraction and output tiles. The kernels' gradients reuse one tiling with the roles of k
    and n exchanged, so where both are lane multiples one tile that divides both serves every call."""
    tm = min(TILE_M, _round_up(m, 8))
    t = next((t for t in (TILE_K, 512, 256, LANE) if k % t == 0 and n % t == 0), None)
    return (tm, t, t) if t else (tm, min(TILE_K, k), min(TILE_N, n))


def _experts_local(x, experts, weights, wg, wu, wd, *, n_experts, expert_axis, gather, tensor_axis,
                   interpret):
    """One device's share: x [n, d], experts/weights [n, k], wg/wu [e_local, d, f_local],
    wd [e_local, f_local, d] -> [n, d]."""
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox  # Pallas: imported on use

    if gather:  # expert parallelism: every device of the expert group sees the group's tokens
        x, experts, weights = (jax.lax.all_gather(a, expert_axis, axis=0, tiled=True)
                               for a in (x, experts, weights))
    f = wg.shape[2]
    if f % LANE:
        # A hidden width split below a lane multiple (MolmoE's 1024 over tensor=16: 64) cannot be a TPU
        # block: pad it with zero columns, which add silu(0) * 0 = 0 and get gradients sliced away.
        pad = _round_up(f, LANE) - f
        wg, wu = (jnp.pad(w, ((0, 0), (0, 0), (0, pad))) for w in (wg, wu))
        wd = jnp.pad(wd, ((0, 0), (0, pad), (0, 0)))
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    tiling = _tiling(n * k, x.shape[1], wg.shape[2])
    m = _round_up(n * k, tiling[0])
    xs = jnp.pad(x[order // k], ((0, m - n * k), (0, 0)))
    offset = None
    if expert_axis:
        # Rows routed to other devices' experts are neither computed nor written by the kernel: select
        # them away at the input (the gradients of x) and at the output (the combined result), so no
        # uninitialised value reaches a result. The padding rows need nothing: they are sliced off,
        # and the kernels read only the rows of their own groups.
        e_local = wg.shape[0]
        first = jax.lax.axis_index(expert_axis) * e_local
        ends = jnp.cumsum(sizes)
        lo = jax.lax.dynamic_index_in_dim(ends - sizes, first, keepdims=False)
        hi = jax.lax.dynamic_index_in_dim(ends, first + e_local - 1, keepdims=False)
        rows = jnp.arange(m)[:, None]
        valid = (rows >= lo) & (rows < hi)
        xs = jnp.where(valid, xs, jnp.zeros((), xs.dtype))
        offset = jnp.asarray(first, jnp.int32)

    def gmm(lhs, rhs):
        t = _tiling(m, lhs.shape[1], rhs.shape[2])
        return megablox.gmm(lhs, rhs, sizes, lhs.dtype, t, offset, None, False, interpret)

    h = jax.nn.silu(gmm(xs, wg)) * gmm(xs, wu)
    ys = gmm(h, wd)
    if expert_axis:
        ys = jnp.where(valid, ys, jnp.zeros((), ys.dtype))
    ys = ys[: n * k]
    y = ys[jnp.argsort(order)].reshape(n, k, -1)
    out = jnp.einsum("nkd,nk->nd", y, weights.astype(y.dtype))
    if gather:
        out = jax.lax.psum_scatter(out, expert_axis, scatter_dimension=0, tiled=True)
    elif expert_axis:
        out = jax.lax.psum(out, expert_axis)
    if tensor_axis:
        out = jax.lax.psum(out, tensor_axis)
    return out


def moe_gmm(x, experts, weights, wg, wu, wd, *, interpret: bool = False):
    """sum_j weights[:, j] * expert_{experts[:, j]}(x) for tokens x [N, d] with their top-k experts
    [N, k] and routing weights [N, k]; wg/wu [E, d, f], wd [E, f, d] (already in the compute dtype)."""
    n_experts = wg.shape[0]
    run = functools.partial(_experts_local, n_experts=n_experts, interpret=interpret)
    mesh = sharding.current_mesh()
    if mesh is None:
        return run(x, experts, weights, wg, wu, wd, expert_axis=None, gather=False, tensor_axis=None)
    tokens = sharding.spec_for(("batch",), (x.shape[0],), mesh)[0]
    token_axes = set((tokens,) if isinstance(tokens, str) else (tokens or ()))
    ep = mesh.shape.get("expert", 1)
    expert_axis = "expert" if ep > 1 and n_experts % ep == 0 else None
    tp = mesh.shape.get("tensor", 1)
    tensor_axis = "tensor" if tp > 1 and wg.shape[2] % tp == 0 else None
    gather = expert_axis is not None and expert_axis in token_axes
    w_in = P(expert_axis, None, tensor_axis)
    w_out = P(expert_axis, tensor_axis, None)
    tok = P(tokens, None)
    body = functools.partial(run, expert_axis=expert_axis, gather=gather, tensor_axis=tensor_axis)
    return jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, w_in, w_in, w_out), out_specs=tok,
                         check_vma=False)(x, experts, weights, wg, wu, wd)
