"""bench.common's matmul ceiling: the bf16 rate the bench-s step is set against."""
import pytest

from bench import common


def test_jax_matmul_rate_in_both_dtypes():
    for dtype in common.MATMUL_DTYPES:
        assert common.matmul_gflops("jax", dtype) > 0.5  # GFLOP/s; any CPU of this decade does far more


@pytest.mark.parametrize("framework,dtype", [("torch", "bfloat16"), ("jax", "float16")])
def test_unmeasured_dtype_is_a_clear_error(framework, dtype):
    with pytest.raises(ValueError, match=f"no '{dtype}' rate for '{framework}'"):
        common.matmul_gflops(framework, dtype)
