"""bench/profile_train.py's reading of a trace and of the compiled HLO, on a small jitted attention."""
import jax
import jax.numpy as jnp
import pytest

from bench import profile_train
from molmo_jax.layers import attention as layers


def test_profile_finds_each_op_its_function_and_its_matmul_flops(tmp_path):
    b, t, hq, hkv, hd = 2, 32, 4, 2, 8
    q = jnp.ones((b, t, hq, hd))
    k = v = jnp.ones((b, t, hkv, hd))
    f = jax.jit(lambda q, k, v: layers.attend(q, k, v) * 2.0)
    table = profile_train.op_table(f.lower(q, k, v).compile().as_text())
    f(q, k, v).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        f(q, k, v).block_until_ready()
    times = profile_train.trace_events(str(tmp_path))
    assert times and all(d >= 0 for ds in times.values() for d in ds)
    assert set(times) <= set(table), set(times) - set(table)     # every traced op is in the HLO
    # The two products of attention (scores, then probabilities x values), each 2 x b x hq x t x t x hd
    # FLOPs, are counted once among the ops that ran, wherever XLA fused them.
    assert sum(table[name][1] for name in times) == 2 * (2 * b * hq * t * t * hd)
    assert any(table[name][0].endswith(": attend") for name in times)


def test_no_ops_in_the_trace_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no XLA operations"):
        profile_train.trace_events(str(tmp_path))
