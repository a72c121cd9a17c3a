"""Weight-only quantization of the LLM's kernels (layers.quant): close to the float model, saved and
loaded quantized without quantizing again, and bad settings as one clear error."""
import jax.numpy as jnp
import numpy as np
import pytest

from molmo_jax import config as config_lib
from molmo_jax import weights
from molmo_jax.layers import quant
from molmo_jax.models import create_model
from molmo_jax.weights.params import model_to_flat

IDS = jnp.asarray(np.random.default_rng(0).integers(0, 384, (2, 24)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    cfg = config_lib.tiny()
    weights.save_model(root / "float", cfg, create_model(cfg, seed=0))
    return root


@pytest.mark.parametrize("kind, atol", [("int8", 0.02), ("int4:16", 0.3)])
def test_quantized_logits_stay_close_to_float(saved, kind, atol):
    """Random tiny weights (std 0.02): int8 per-channel moves logits of magnitude ~1 by 6e-3, int4 in
    groups of 16 by 0.1 (measured); the bounds are 3x that."""
    _, model = weights.load(saved / "float")
    cfg, quantized = weights.load(saved / "float", quantize=kind)
    assert cfg.quant.weights == kind.split(":")[0]
    flat = model_to_flat(quantized)
    assert flat[("llm", "blocks", "ffn", "w_up", "kernel")].dtype == np.int8
    assert flat[("vision", "blocks", "w1", "kernel")].dtype == np.float32  # the ViT stays float
    assert float(jnp.abs(quantized(IDS)["logits"] - model(IDS)["logits"]).max()) <= atol


def test_quantize_save_load_equals_quantize(saved, tmp_path):
    cfg, quantized = weights.load(saved / "float", quantize="int4:16")
    weights.save_model(tmp_path / "q", cfg, quantized)
    cfg2, loaded = weights.load(tmp_path / "q")  # quantized already: no --weights needed
    assert cfg2.quant.to_dict() == cfg.quant.to_dict()
    a, b = model_to_flat(quantized), model_to_flat(loaded)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=".".join(path))
    assert jnp.array_equal(loaded(IDS)["logits"], quantized(IDS)["logits"])
    with pytest.raises(weights.WeightsError, match="already quantized"):
        weights.load(tmp_path / "q", quantize="int8")


@pytest.mark.parametrize("kind, message", [
    ("int3", "choose one of float, int8, int4"),
    ("int4:x", "group size must be a positive integer"),
    ("int4:48", "int4 group size 48 does not divide"),
    ("int8+tail", "the only suffix is \\+head"),
])
def test_bad_settings_are_one_line_errors(saved, kind, message):
    with pytest.raises(weights.WeightsError, match=message):
        weights.load(saved / "float", quantize=kind)


def test_quantized_array_round_trip():
    w = np.random.default_rng(0).standard_normal((3, 64, 8)).astype(np.float32)
    q, scale = quant.quantize_array(w, "int8", 1, 1, 128)
    assert q.dtype == np.int8 and scale.shape == (3, 1, 8)
    back = np.asarray(quant.dequantize(jnp.asarray(q), jnp.asarray(scale), jnp.float32))
    assert np.abs(back - w).max() <= np.abs(w).max(axis=1, keepdims=True).max() / 127


def test_output_head_stays_float_unless_asked(saved):
    """The head decides top-1 agreement and is the one large dequantized temporary of a decode step
    (layers.quant.quant_config): float by default, quantized with "+head"; a config saved before the
    choice existed (no `head` key) quantized it and still loads that way."""
    cfg, plain = weights.load(saved / "float", quantize="int8")
    assert cfg.quant.head is False
    flat = model_to_flat(plain)
    assert flat[("llm", "ff_out", "kernel")].dtype == np.float32 and ("llm", "ff_out", "kernel_scale") not in flat
    assert flat[("llm", "blocks", "attn", "wq", "kernel")].dtype == np.int8
    cfg, full = weights.load(saved / "float", quantize="int8+head")
    assert cfg.quant.head is True and model_to_flat(full)[("llm", "ff_out", "kernel")].dtype == np.int8
    old = quant.quant_config("int8")
    del old["head"]
    model = create_model(config_lib.tiny(), seed=0)
    assert "llm.ff_out" in [name for name, _ in quant.check(old, model)]
