"""Loading PyTorch-format Molmo directories through molmo_jax.weights: both layouts, and clear errors."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import GOLDEN
from molmo_jax import weights
from molmo_jax.weights.mappings import molmo as molmo_mapping
from molmo_jax.weights import WeightsError
from molmo_jax.weights.rules import to_flat, to_torch

SRC = GOLDEN / "models" / "qwen2_style"


def copy_model(tmp_path, tensors=None, config=None):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(SRC / "config.json", d / "config.json")
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    save_file(tensors if tensors is not None else load_file(SRC / "model.safetensors"), d / "model.safetensors")
    return d


def test_roundtrip_torch_naming_is_exact():
    cfg = weights.load_config(SRC)
    tensors = load_file(SRC / "model.safetensors")
    rules = molmo_mapping.rules(cfg)
    flat = to_flat(rules, lambda k: tensors["model." + k])
    assert flat.keys() == weights.params.param_paths(cfg).keys()
    back = to_torch(rules, flat, prefix="model.")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_sharded_hf_layout_loads_the_same(tmp_path):
    """Shards + index, as the released checkpoints are stored."""
    tensors = load_file(SRC / "model.safetensors")
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(SRC / "config.json", d / "config.json")
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, ks in halves.items():
        save_file({k: tensors[k] for k in ks}, d / name)
        weight_map.update({k: name for k in ks})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (_, a), (_, b) = weights.read_pytorch(SRC), weights.read_pytorch(d)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # A shard missing from the directory is named.
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="model-00002-of-00002.safetensors"):
        weights.read_pytorch(d)


def test_missing_key_is_named(tmp_path):
    tensors = load_file(SRC / "model.safetensors")
    del tensors["model.transformer.blocks.1.ff_out.weight"]
    with pytest.raises(WeightsError, match=r"missing keys.*'model.transformer.blocks.1.ff_out.weight'"):
        weights.load(copy_model(tmp_path, tensors))


def test_unexpected_key_is_named(tmp_path):
    tensors = load_file(SRC / "model.safetensors")
    tensors["model.transformer.blocks.0.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(WeightsError, match="unexpected keys.*blocks.0.extra.weight"):
        weights.load(copy_model(tmp_path, tensors))


def test_misshaped_key_names_key_and_both_shapes(tmp_path):
    tensors = load_file(SRC / "model.safetensors")
    tensors["model.transformer.ln_f.weight"] = np.ones(65, np.float32)
    with pytest.raises(WeightsError, match=r"transformer.ln_f.weight.*\(65,\).*\(64,\)"):
        weights.load(copy_model(tmp_path, tensors))


def test_config_that_does_not_match_weights(tmp_path):
    config = json.loads((SRC / "config.json").read_text())
    config["n_layers"] = 3  # the weights have 2 blocks
    with pytest.raises(WeightsError, match="missing keys.*'model.transformer.blocks.2"):
        weights.load(copy_model(tmp_path, config=config))


def test_truncated_safetensors(tmp_path):
    d = copy_model(tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="model.safetensors"):
        weights.load(d)


def test_unsupported_config_field(tmp_path):
    config = json.loads((SRC / "config.json").read_text())
    config["vision_backbone"]["image_model_type"] = "siglip"
    with pytest.raises(WeightsError, match="image_model_type='siglip'"):
        weights.load(copy_model(tmp_path, config=config))


# The original's gradients (grads.npz) against ours through the trainer's loss path. Measured worst
# case on both golden models: 6e-7 absolute (float32 sums in another order through ~20 layers and
# the backward pass; the original's own float32 noise is about 1e-7), against gradients of up to 0.5;
# a swapped or transposed mapping moves them by 1e-2 or more. 5e-6 keeps an 8x margin.
GRAD_ATOL = 5e-6


def assert_grads_match(got: dict, golden) -> None:
    """Every gradient of the original is there and close; ours has the same names plus the ViT blocks
    after the deepest used layer, whose gradient is exactly zero (the original gives them none)."""
    theirs = {k for k in golden if k.startswith("grad/")}
    ours = {k for k in got if k.startswith("grad/")}
    assert theirs <= ours, sorted(theirs - ours)[:5]
    for key in theirs:
        assert got[key].shape == golden[key].shape, key
        np.testing.assert_allclose(got[key], golden[key], atol=GRAD_ATOL, rtol=0, err_msg=key)
    for key in ours - theirs:
        assert "image_vit.transformer.resblocks" in key and not np.any(got[key]), key


def test_loss_gradients_match_the_original():
    """The second golden model (qwen2-style: GQA, qkv biases), in process."""
    from tools.forward import loss_gradients, read_inputs

    src = GOLDEN / "models" / "qwen2_style"
    cfg, model = weights.load(src)
    assert_grads_match(loss_gradients(cfg, model, read_inputs(src / "inputs.npz")), np.load(src / "grads.npz"))


def test_forward_command_writes_golden_names(tmp_path):
    out = tmp_path / "out.npz"
    src = GOLDEN / "models" / "olmo_style"
    proc = subprocess.run([sys.executable, "-m", "tools.forward", str(src), "--inputs", str(src / "inputs.npz"),
                           "--out", str(out), "--grads"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "loss" in proc.stdout and len(proc.stdout.strip().splitlines()) == 1
    got, exp = np.load(out), np.load(src / "expected.npz")
    assert_grads_match(dict(got), np.load(src / "grads.npz"))
    np.testing.assert_allclose(got["logits"], exp["logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["connector_output"], exp["connector_output"], atol=2e-4, rtol=0)
    valid = np.load(src / "inputs.npz")["batch2_input_ids"] != -1
    assert np.max(np.abs(got["batch2_logits"] - exp["batch2_logits"])[valid]) <= 1e-4
    assert abs(float(got["loss"]) - float(exp["loss"])) <= 1e-5


def test_forward_command_bad_inputs(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, input_ids=np.zeros((1, 4), np.int64))
    proc = subprocess.run([sys.executable, "-m", "tools.forward", str(GOLDEN / "models" / "olmo_style"),
                           "--inputs", str(bad), "--out", str(tmp_path / "o.npz")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "missing arrays images, image_masks, image_input_idx" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o.npz").exists()
    src = GOLDEN / "models" / "olmo_style"
    no_loss = tmp_path / "no_loss.npz"
    np.savez(no_loss, **{k: v for k, v in np.load(src / "inputs.npz").items() if not k.startswith("loss_")})
    proc = subprocess.run([sys.executable, "-m", "tools.forward", str(src), "--inputs", str(no_loss),
                           "--out", str(tmp_path / "o.npz"), "--grads"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--grads needs the training example" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o.npz").exists()
