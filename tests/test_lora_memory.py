"""What makes a LoRA step leaner: the loss head run in chunks of positions gives the same loss and
gradients, a bfloat16 base stores everything but the adapters in bfloat16 (and computes what the
float32 base computes under a bfloat16 compute dtype), and the trainer hands freed host memory back."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molmo_jax import config as config_lib
from molmo_jax import losses
from molmo_jax.layers import lora
from molmo_jax.models import create_model
from molmo_jax.weights.params import model_to_flat

IDS = jnp.asarray(np.random.default_rng(0).integers(0, 384, (2, 24)))


@pytest.mark.parametrize("chunk", [7, 30, 64])
def test_loss_head_in_chunks_gives_the_same_loss_and_gradients(chunk):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((3, 40, 16)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((16, 50)), jnp.float32)
    labels = jnp.asarray(rng.integers(-1, 50, (3, 40)))
    masks = jnp.asarray(rng.random((3, 40)) > 0.3, jnp.float32)

    def objective(w, h, chunk_tokens):
        loss, z, weight, dropped = losses.sparse_loss(lambda x: x @ w, h, labels, masks, 90,
                                                      chunk_tokens=chunk_tokens)
        return loss + z, (weight, dropped)

    grad = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
    (ref, (w_ref, d_ref)), g_ref = grad(head, hidden, 0)
    (out, (w_out, d_out)), g_out = grad(head, hidden, chunk)
    assert d_ref > 0 and float(w_out) == float(w_ref) and int(d_out) == int(d_ref)  # same positions kept
    # the same float32 terms summed in another order: 2e-7 relative measured
    np.testing.assert_allclose(out, ref, rtol=2e-6)
    for a, b in zip(g_out, g_ref):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


def test_bfloat16_base_stores_all_but_the_adapters_in_bfloat16():
    cfg = config_lib.tiny()
    cfg.dtype = "bfloat16"  # the released recipes' compute dtype
    cfg.lora = lora.lora_config(rank=4)
    keep = create_model(cfg, seed=0)
    cfg.lora.base_weights = "bfloat16"
    half = create_model(cfg, seed=0)
    flat = model_to_flat(half)
    assert {v.dtype for p, v in flat.items() if lora.is_adapter(p)} == {np.dtype(np.float32)}
    assert {v.dtype for p, v in flat.items() if not lora.is_adapter(p)} == {np.dtype(jnp.bfloat16)}
    # Every base parameter is used at the compute dtype (kernels cast by Dense, embeddings after the
    # lookup) or is exact in bfloat16 (norm scales initialised to 1): the logits are identical.
    assert jnp.array_equal(half(IDS)["logits"], keep(IDS)["logits"])
    base = {p: v for p, v in model_to_flat(keep).items() if not lora.is_adapter(p)}
    stored = lora.frozen_base(base, cfg)
    assert {v.dtype for v in stored.values()} == {np.dtype(jnp.bfloat16)}


def test_freed_host_memory_is_handed_back():
    code = """
import numpy as np
from molmo_jax.trainer import release_host_memory
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
arrays = [np.ones(100_000 // 8) for _ in range(3000)]   # 300 MB of heap (each below the mmap threshold)
pinned = arrays[::50]                                   # a few survivors keep the heap from shrinking itself
del arrays
before = rss(); release_host_memory(); after = rss()
print(before - after)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert int(out.stdout.split()[-1]) > 200e6  # 290 MB measured


def test_vision_tower_in_chunks_of_crops_gives_the_same_features_and_holds_fewer_scores():
    cfg, in_chunks = config_lib.tiny(), config_lib.tiny()
    for c in (cfg, in_chunks):  # the released crop size: 576 patches + CLS, so the scores dominate
        c.vit.image_size = (336, 336)
    in_chunks.vit.crop_chunk = 3  # 8 crops: two full chunks and a padded third
    whole, chunked = create_model(cfg, seed=0).vision, create_model(in_chunks, seed=0).vision
    patches = jnp.asarray(np.random.default_rng(1).standard_normal((8, 576, 588)), jnp.float32)
    # Each crop goes through the same ops alone or in a chunk.
    np.testing.assert_allclose(chunked(patches), whole(patches), rtol=1e-5, atol=1e-6)
    g_whole, g_chunked = (jax.grad(lambda p, t=tower: jnp.sum(jnp.sin(t(p))))(patches) for tower in (whole, chunked))
    np.testing.assert_allclose(g_chunked, g_whole, rtol=1e-4, atol=1e-6)

    def temporaries(tower):  # a frozen tower's forward, as under LoRA: nothing kept for a backward pass
        return jax.jit(lambda p: tower(p)).lower(patches).compile().memory_analysis().temp_size_in_bytes
    scores = 8 * cfg.vit.n_heads * 577 * 577 * 4  # f32 [crops, heads, 1+P, 1+P]
    assert temporaries(whole) - temporaries(chunked) > scores / 2, (temporaries(whole), temporaries(chunked))
