"""Building blocks shared by every model family (`molmo_jax.models`): parameters and dense layers
(`core`), norms, attention with its KV cache, feed-forward blocks (`mlp`: SwiGLU and MoE), the
decoder stack, the ViT, attention pooling and the layer scan."""
