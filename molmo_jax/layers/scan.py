"""Running a stack of identical layers with `lax.scan`, with optional rematerialisation."""
from __future__ import annotations

import jax
from flax import nnx


def scan_layers(body, carry, stacked_module: nnx.Module, xs=None, remat: str = "none",
                start: int = 0, stop: int | None = None, unroll: int = 1):
    """Run `body(carry, layer_module, x) -> (carry, y)` over a stacked module with lax.scan.

    `start`/`stop` select a contiguous range of layers (used by the ViT to stop after the last layer
    whose output is needed). `unroll` layers run per loop iteration (config `scan_unroll`): unrolling
    trades compile time for less loop overhead, which matters only for small models.
    """
    if int(unroll) < 1:
        raise ValueError(f"scan_unroll={unroll!r} must be a positive number of layers")
    graphdef, state = nnx.split(stacked_module)
    if start != 0 or stop is not None:
        state = jax.tree.map(lambda a: a[start:stop], state)
        if xs is not None:
            xs = jax.tree.map(lambda a: a[start:stop], xs)

    def step(c, inputs):
        layer_state, x = inputs
        return body(c, nnx.merge(graphdef, layer_state), x)

    if remat != "none":
        if remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={remat!r}; choose 'none' or one of {', '.join(REMAT_POLICIES)}")
        policy = REMAT_POLICIES[remat]
        step = jax.checkpoint(step, policy=policy, prevent_cse=False)
    return jax.lax.scan(step, carry, (state, xs), unroll=int(unroll))


# "full" keeps only each block's input; "dots" keeps the outputs of the weight matmuls (dots without
# batch dimensions) and recomputes the rest, attention included; "offload" keeps the same outputs in
# host memory (TPU and GPU: the chip's pinned host memory) instead of HBM.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}
