"""Batch-1 matrix-vector products on this CPU, float32 against int8 weights: what XLA runs for a
decode step's projections.

    .venv/bin/python -m bench.bench_matvec [--runs 30]

Shapes: the bench-s LLM's (512 -> 32000 head, 512 -> 2816 up|gate, 1408 -> 512 down) and a 7B-sized
2048 -> 8192. Variants of y = x W with W int8 [K, N] and one float32 scale per output column:

  f32                    x @ W in float32 (the baseline)
  bf16                   x and W in bfloat16
  int8 dequantize        x @ (int8 -> f32 * scale): what layers.core.Dense does
  int8 preferred f32     dot_general(x, W_int8, preferred_element_type=f32), scale after the dot
  int8 x int8 -> int32   x quantized per token (dynamic range, as qwix does), integer dot
  int8 row reduction     sum(x * W^T) over K with W stored [N, K]: convert, multiply, add in one loop
  int8 tiled             a loop over 256-column tiles: each tile dequantized into a cache-sized buffer
                         and multiplied there, so memory sees the int8 weights once

Reported per variant: milliseconds (median), GB/s of weights read (at their stored width), GFLOP/s,
and the largest difference from float32. The page faults per call are reported too: XLA takes a fresh
buffer for every temporary each call, and one above glibc's 32 MB mmap limit (the dequantized
32000-column head is 64 MB) is page-faulted in again on every call.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402

SHAPES = ((512, 32000), (512, 2816), (1408, 512), (2048, 8192))
TILE = 256


def _tiled(x, q, s):
    n = q.shape[1]

    def body(i, y):
        tile = jax.lax.dynamic_slice_in_dim(q, i * TILE, TILE, axis=1).astype(jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(y, x @ tile, i * TILE, axis=1)
    return jax.lax.fori_loop(0, n // TILE, body, jnp.zeros((1, n), jnp.float32)) * s


def _dynamic_int8(x, q, s):
    sx = jnp.max(jnp.abs(x)) / 127
    xq = jnp.round(x / sx).astype(jnp.int8)
    y = jax.lax.dot_general(xq, q, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return y.astype(jnp.float32) * sx * s


VARIANTS = {
    "f32": (lambda x, w, q, qt, s: x @ w, 4),
    "bf16": (lambda x, w, q, qt, s: (x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)).astype(jnp.float32), 2),
    "int8 dequantize": (lambda x, w, q, qt, s: x @ (q.astype(jnp.float32) * s), 1),
    "int8 preferred f32": (lambda x, w, q, qt, s: jax.lax.dot_general(
        x, q, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32) * s, 1),
    "int8 x int8 -> int32": (lambda x, w, q, qt, s: _dynamic_int8(x, q, s), 1),
    "int8 row reduction": (lambda x, w, q, qt, s: jnp.sum(x * qt.astype(jnp.float32), axis=1)[None] * s, 1),
    "int8 tiled": (lambda x, w, q, qt, s: _tiled(x, q, s), 1),
}


def measure(fn, args, runs: int):
    f = jax.jit(fn)
    out = f(*args).block_until_ready()
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f(*args).block_until_ready()
        times.append(time.perf_counter() - t)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / runs
    return statistics.median(times), faults, out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = {}
    for k, n in SHAPES:
        x = jnp.asarray(rng.standard_normal((1, k)), jnp.float32)
        w = jnp.asarray(0.02 * rng.standard_normal((k, n)), jnp.float32)
        s = jnp.max(jnp.abs(w), axis=0, keepdims=True) / 127
        q = jnp.round(w / s).astype(jnp.int8)
        qt = jnp.asarray(np.ascontiguousarray(np.asarray(q).T))
        ref = np.asarray(x @ w)
        row = {}
        for name, (fn, width) in VARIANTS.items():
            if name == "int8 tiled" and n % TILE:
                continue
            t, faults, out = measure(fn, (x, w, q, qt, s), args.runs)
            row[name] = dict(ms=1e3 * t, weight_gb_per_s=k * n * width / t / 1e9, gflops=2 * k * n / t / 1e9,
                             faults_per_call=faults, max_abs_diff=float(np.abs(np.asarray(out) - ref).max()))
        for name in row:
            row[name]["vs_f32"] = row["f32"]["ms"] / row[name]["ms"]
        results[f"{k}x{n}"] = row
    common.report("matvec", dict(shapes=results, jax_devices=str(jax.devices()),
                                 loadavg=open("/proc/loadavg").read().split()[:3]))


if __name__ == "__main__":
    main()
