"""Helpers shared by the benchmarks: timing, memory, and this CPU's matmul ceiling."""
from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

MATMUL_N = 2048

_JAX_MATMUL = f"""
import sys, time, jax, jax.numpy as jnp
n, dtype = {MATMUL_N}, sys.argv[1]
a = jax.random.normal(jax.random.key(0), (n, n), dtype); b = jax.random.normal(jax.random.key(1), (n, n), dtype)
f = jax.jit(lambda a, b: a @ b); f(a, b).block_until_ready()
ts = []
for _ in range(10):
    t = time.perf_counter(); f(a, b).block_until_ready(); ts.append(time.perf_counter() - t)
ts.sort(); print(2 * n ** 3 / ts[len(ts) // 2] / 1e9)
"""

_TORCH_MATMUL = f"""
import time, torch
n = {MATMUL_N}
a = torch.randn(n, n); b = torch.randn(n, n); a @ b
ts = []
for _ in range(10):
    t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)
ts.sort(); print(2 * n ** 3 / ts[len(ts) // 2] / 1e9)
"""


MATMUL_DTYPES = ("float32", "bfloat16")


def matmul_gflops(framework: str, dtype: str = "float32") -> float:
    """Median MATMUL_N^3 matmul rate, measured in a subprocess (keeps this process's RSS clean).
    `dtype` float32 or, for jax only, bfloat16 (measured 2026-12-03 on an AVX512_BF16 EPYC: no faster than f32)."""
    if dtype not in MATMUL_DTYPES or (framework != "jax" and dtype != "float32"):
        raise ValueError(f"matmul_gflops: no {dtype!r} rate for {framework!r} (jax: {MATMUL_DTYPES}, torch: float32)")
    code = _JAX_MATMUL if framework == "jax" else _TORCH_MATMUL
    out = subprocess.run([sys.executable, "-c", code, dtype], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def time_runs(fn, runs: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def summary(times):
    return dict(median=statistics.median(times), min=min(times), max=max(times), runs=len(times))


def peak_rss_gb() -> float:
    """The process's peak resident memory since it started or since `reset_peak_rss`."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Restart the peak count from the current resident memory (Linux: /proc/self/clear_refs "5"),
    so that a later `peak_rss_gb` covers only what ran since; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def compiled_memory(compiled) -> dict:
    """XLA's buffer sizes of a compiled program, GB: arguments, outputs not aliased to arguments,
    temporaries (their peak, after buffer sharing)."""
    ma = compiled.memory_analysis()
    return dict(arguments_gb=ma.argument_size_in_bytes / 1e9,
                outputs_gb=(ma.output_size_in_bytes - ma.alias_size_in_bytes) / 1e9,
                temporaries_gb=ma.temp_size_in_bytes / 1e9)


def report(name: str, result: dict):
    print(json.dumps({"bench": name, **result}, indent=1))
