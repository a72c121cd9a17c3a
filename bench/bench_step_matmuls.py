"""The matmuls of one bench-s training step, each alone, against this CPU's 2048^3 f32 matmul rate.

    .venv/bin/python -m bench.bench_step_matmuls [--runs 5]

Every dense product of the step (bench-s workload: 4 x 768 tokens, 20 ViT crops of 577 patches;
forward X.W, backward dX = dY.W^T and dW = X^T.dY) is timed as a lone jitted f32 jnp.dot /
batched einsum at its real shape. The FLOP-weighted rate of these alone is a ceiling for the whole
step's model-FLOP rate: the step also does softmax, norms, activations, AdamW and remat on top.
If this ceiling is below the issue's 70% of the 2048^3 rate, no schedule of the same matmuls meets it.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from bench import common

B, T, CROPS, PATCHES = 4, 768, 20, 577
D, HEADS, KV, HD, MLP, VOCAB, LOSS_ROWS = 512, 8, 4, 64, 1408, 32000, 752
VD, VHEADS, VHD, VMLP = 256, 4, 64, 1024
POOLED = CROPS * 144


def products():
    """(name, count per step, lhs shape, rhs shape) of forward products; backward added below."""
    llm, vit = 8, 5  # LLM blocks; ViT blocks that run (features from layers -2 and -4 of 6)
    m, mv = B * T, CROPS * PATCHES
    dense = [("llm q+o", 2 * llm, (m, D), (D, HEADS * HD)), ("llm k+v", 2 * llm, (m, D), (D, KV * HD)),
             ("llm up+gate", 2 * llm, (m, D), (D, MLP)), ("llm down", llm, (m, MLP), (MLP, D)),
             ("lm head (loss rows)", 1, (LOSS_ROWS, D), (D, VOCAB)),
             ("vit qkvo", 4 * vit, (mv, VD), (VD, VD)), ("vit fc1", vit, (mv, VD), (VD, VMLP)),
             ("vit fc2", vit, (mv, VMLP), (VMLP, VD)), ("patch embed", 1, (mv, 588), (588, VD)),
             ("projector up+gate", 2, (POOLED, 2 * VD), (2 * VD, MLP)), ("projector down", 1, (POOLED, MLP), (MLP, D))]
    batched = [("llm attention (QK, PV)", 2 * llm, (B * HEADS, T, HD), (B * HEADS, HD, T)),
               ("vit attention (QK, PV)", 2 * vit, (CROPS * VHEADS, PATCHES, VHD), (CROPS * VHEADS, VHD, PATCHES))]
    return dense, batched


def timed(lhs, rhs, runs):
    a = jax.random.normal(jax.random.key(0), lhs)
    b = jax.random.normal(jax.random.key(1), rhs)
    f = jax.jit(lambda a, b: jnp.matmul(a, b))
    times = common.time_runs(lambda: f(a, b).block_until_ready(), runs, warmup=2)
    flops = 2 * a.size * rhs[-1]
    return common.summary(times)["median"], flops


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    n = common.MATMUL_N
    square = lambda: 2 * n ** 3 / timed((n, n), (n, n), args.runs)[0] / 1e9  # noqa: E731
    before = square()
    dense, batched = products()
    total_t = total_f = attention_t = 0.0
    print(f"{'product':28s} {'count':>5s} {'GFLOP/s fwd / dX / dW':>24s}")
    for name, count, lhs, rhs in dense + batched:
        batch = lhs[:-2]
        (m, k), cols = lhs[-2:], rhs[-1]
        shapes = [(lhs, rhs), (batch + (m, cols), batch + (cols, k)),  # forward, dX = dY W^T
                  (batch + (k, m), batch + (m, cols))]           # dW = X^T dY (per batch for attention)
        rates = []
        for left, right in shapes:
            t, f = timed(left, right, args.runs)
            total_t, total_f = total_t + count * t, total_f + count * f
            attention_t += count * t if "attention" in name else 0.0
            rates.append(f / t / 1e9)
        print(f"{name:28s} {count:5d} {' / '.join(f'{r:.0f}' for r in rates):>24s}")
    peak = (before + square()) / 2  # this machine's rate drifts: the mean of before and after
    print(f"\njax f32 {n}^3 matmul: {peak:.0f} GFLOP/s (before {before:.0f})")
    print(f"attention products: {attention_t:.2f} s of {total_t:.2f} s")
    rate = total_f / total_t / 1e9
    print(f"all products of the step: {total_f / 1e12:.2f} TFLOP in {total_t:.2f} s = {rate:.0f} GFLOP/s "
          f"= {rate / peak:.0%} of the {common.MATMUL_N}^3 rate (the ceiling for the step's model-FLOP rate)")


if __name__ == "__main__":
    main()
