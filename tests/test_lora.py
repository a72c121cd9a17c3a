"""Low-rank adapters (layers.lora): fresh adapters leave the model unchanged, only they train, the
base stays bit-identical, checkpoints hold the adapters alone and resume bit for bit, merging gives
the same logits, and settings that cannot work are one clear error before anything is compiled."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny_sft
from molmo_jax import config as config_lib
from molmo_jax import weights
from molmo_jax.layers import lora
from molmo_jax.models import create_model
from molmo_jax.weights.params import model_from_flat, model_to_flat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 384, (2, 24)))


def with_lora(**kw):
    cfg = config_lib.tiny()
    cfg.lora = lora.lora_config(rank=4, **kw)
    return cfg


def test_fresh_adapters_leave_the_logits_unchanged_and_sit_on_the_targets():
    base, adapted = create_model(config_lib.tiny(), seed=0), create_model(with_lora(), seed=0)
    assert jnp.array_equal(base(IDS)["logits"], adapted(IDS)["logits"])  # B = 0
    flat = model_to_flat(adapted)
    names = sorted(".".join(p[:-1]) for p in flat if p[-1] == "lora_a")
    assert names == [f"llm.blocks.attn.w{x}" for x in "koqv"] + [f"llm.blocks.ffn.w_{x}" for x in ("down", "gate", "up")]
    a, b = flat[("llm", "blocks", "attn", "wq", "lora_a")], flat[("llm", "blocks", "attn", "wq", "lora_b")]
    assert a.shape == (2, 64, 4) and b.shape == (2, 4, 4, 16)  # stacked over the 2 layers like the kernel
    axes = nnx.state(adapted, nnx.Param)["llm"]["blocks"]["attn"]["wq"]["lora_b"].get_metadata()["out_sharding"]
    assert axes == ("layers", "lora_rank", "heads", "head_dim")


def test_merged_weights_give_the_same_logits():
    cfg = with_lora(targets=r"(wq|w_down|w1)\.kernel$")  # LLM and ViT layers
    flat = model_to_flat(create_model(cfg, seed=0))
    rng = np.random.default_rng(1)
    flat = {p: (0.1 * rng.standard_normal(v.shape).astype(np.float32) if p[-1] == "lora_b" else v)
            for p, v in flat.items()}
    unmerged = model_from_flat(cfg, flat)(IDS)["logits"]
    merged = model_from_flat(config_lib.tiny(), lora.merge(flat, cfg))(IDS)["logits"]
    assert float(jnp.abs(unmerged - create_model(config_lib.tiny(), seed=0)(IDS)["logits"]).max()) > 1e-2
    # float32 sums in another order: 2e-6 measured on logits of magnitude ~1
    np.testing.assert_allclose(merged, unmerged, atol=2e-5, rtol=0)


@pytest.mark.parametrize("change, message", [
    (dict(targets=r"no_such_layer"), "matches no Dense kernel"),
    (dict(targets=r"(unclosed"), "is not a regular expression"),
    (dict(rank=100), r"lora.rank=100 is larger than llm\.blocks\.\S+\.kernel's smaller side"),
    (dict(base_weights="int3"), "lora.base_weights='int3'"),
])
def test_settings_that_cannot_work_are_clear_errors(change, message):
    cfg = config_lib.tiny()
    cfg.lora = lora.lora_config(**{"rank": 4, **change})
    with pytest.raises(ValueError, match=message):
        create_model(cfg)


def _train(tmp_path, workdir, *extra):
    cmd = [sys.executable, "-m", "tools.train", "--config", "configs/tiny_sft.py", "--workdir", str(workdir),
           "--config.total_steps=4", "--config.checkpoint_every=2", "--config.log_every=1", "--config.seq_len=256",
           "--config.batch_size=2", "--config.data.kind=random", "--progress=false", "--config.lora.rank=4",
           f"--config.init_from={tmp_path / 'base'}", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    cfg = tiny_sft.get_config().model
    weights.save_model(tmp / "base", cfg, create_model(cfg, seed=1))
    full = _train(tmp, tmp / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    half = _train(tmp, tmp / "resumed", "--config.total_steps=2")
    assert half.returncode == 0, half.stderr[-3000:]
    resumed = _train(tmp, tmp / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    qlora = _train(tmp, tmp / "qlora", "--config.lora.base_weights=int4", "--config.lora.group=16")
    assert qlora.returncode == 0, qlora.stderr[-3000:]
    return tmp


def _losses(workdir):
    return {r["step"]: r["loss"] for r in map(json.loads, open(workdir / "metrics.jsonl"))}


def test_only_adapters_train_and_the_base_stays_bit_identical(runs):
    _, base = weights.load(runs / "base")
    cfg, trained = weights.load(runs / "full")  # the run: base from the pointer + its adapters
    assert cfg.lora.rank == 4 and cfg.lora.base == str(runs / "base")
    ours, theirs = model_to_flat(trained), model_to_flat(base)
    for path, value in theirs.items():
        np.testing.assert_array_equal(ours[path], value, err_msg=".".join(path))
    assert any(np.any(ours[p]) for p in ours if p[-1] == "lora_b")  # the adapters moved
    # The checkpoint holds the adapters alone.
    step = runs / "full" / "checkpoints" / "4" / "params"
    stored = weights.orbax_io.stored_params(step)
    assert stored and all(lora.is_adapter(p) for p in stored)


def test_adapter_run_resumes_bit_identically(runs):
    assert _losses(runs / "resumed") == _losses(runs / "full")


def test_adapters_need_a_base(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tools.train", "--config", "configs/tiny_sft.py", "--workdir",
                          str(tmp_path / "w"), "--config.lora.rank=4", "--config.data.kind=random"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 2 and "give it with --config.init_from" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "w").exists()


def test_export_merges_the_adapters_into_the_released_layout(runs):
    cfg, trained = weights.load(runs / "full")
    summary = weights.export_checkpoint(runs / "full", runs / "hf")
    assert "lora" not in weights.load_config(runs / "hf")
    _, exported = weights.load(runs / "hf")
    ids = IDS
    np.testing.assert_allclose(exported(ids)["logits"], trained(ids)["logits"], atol=2e-5, rtol=0)
    assert summary.n_params == sum(np.size(v) for p, v in model_to_flat(trained).items() if not lora.is_adapter(p))


def test_qlora_trains_adapters_on_an_int4_base(runs):
    """lora.base_weights=int4: the frozen base is stored quantized (int8 values in [-8, 7], one scale per
    16 inputs), the adapters in float32; only they change."""
    cfg, model = weights.load(runs / "qlora")
    assert cfg.quant.weights == "int4" and cfg.quant.group == 16
    flat = model_to_flat(model)
    kernel = flat[("llm", "blocks", "attn", "wq", "kernel")]
    assert kernel.dtype == np.int8 and kernel.min() >= -8 and kernel.max() <= 7
    assert flat[("llm", "blocks", "attn", "wq", "kernel_scale")].shape == (2, 4, 4, 16)  # 64 inputs / 16
    assert flat[("llm", "blocks", "attn", "wq", "lora_a")].dtype == np.float32
    assert any(np.any(flat[p]) for p in flat if p[-1] == "lora_b")
    losses = _losses(runs / "qlora")
    assert len(losses) == 4 and all(np.isfinite(list(losses.values())))


def test_int4_group_that_does_not_divide_is_a_clear_error(runs):
    out = _train(runs, runs / "bad_group", "--config.lora.base_weights=int4", "--config.lora.group=48")
    assert out.returncode == 2 and "int4 group size 48 does not divide" in out.stderr
    assert "Traceback" not in out.stderr


def _released_linears(tensors: dict, names):
    """A torch module tree with the released Molmo's Linear names (`model.transformer...`), holding
    `tensors` (released keys) for the Linears `names`."""
    import torch

    root = torch.nn.Module()
    for name in names:
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        w = tensors[name + ".weight"]
        bias = tensors.get(name + ".bias")
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(w)
            if bias is not None:
                linear.bias.copy_(bias)
        parent.add_module(leaf, linear)
    return root


def test_adapters_only_export_loads_in_peft_and_gives_the_merged_model(runs):
    """`export --adapters-only`: PEFT's LoRA (pinned in the test extras) on the base's released Linears
    gives the merged export's Linears: fused att_proj (q|k|v) and ff_proj (up|gate) as one adapter of
    rank 3r / 2r each, with alpha scaled to keep alpha / r."""
    import glob

    import peft
    import torch
    from safetensors.torch import load_file

    weights.export_adapters(runs / "full", runs / "peft")
    config = json.loads((runs / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16.0
    adapters = load_file(runs / "peft" / "adapter_model.safetensors")
    assert adapters["base_model.model.model.transformer.blocks.0.att_proj.lora_A.weight"].shape == (12, 64)
    assert adapters["base_model.model.model.transformer.blocks.0.ff_proj.lora_B.weight"].shape == (2 * 96, 8)
    weights.export_checkpoint(runs / "base", runs / "base_hf")
    weights.export_checkpoint(runs / "full", runs / "merged_hf")
    def read(d):
        return {k: v for f in glob.glob(str(d / "*.safetensors")) for k, v in load_file(f).items()}
    base, merged = read(runs / "base_hf"), read(runs / "merged_hf")
    names = [f"model.transformer.blocks.{i}.{m}" for i in range(2) for m in ("att_proj", "attn_out", "ff_proj", "ff_out")]
    names.append("model.transformer.ff_out")  # the head: not adapted, must stay as it is
    model = peft.PeftModel.from_pretrained(_released_linears(base, names), str(runs / "peft"))
    x = torch.randn(5, 96)
    for name in names:
        module = model.base_model.model.get_submodule(name)
        assert isinstance(module, peft.tuners.lora.Linear) == (name != "model.transformer.ff_out"), name
        ref = torch.nn.functional.linear(x[:, :module.in_features], merged[name + ".weight"], merged.get(name + ".bias"))
        # float32 in another order (PEFT adds x A^T B^T to x W^T): 3e-7 measured on outputs of ~0.1
        torch.testing.assert_close(module(x[:, :module.in_features]), ref, atol=2e-6, rtol=0)
    unloaded = model.merge_and_unload()
    for name in names:
        torch.testing.assert_close(unloaded.get_submodule(name).weight, merged[name + ".weight"], atol=2e-6, rtol=0)


def test_adapters_only_refuses_a_model_without_adapters(runs):
    out = subprocess.run([sys.executable, "-m", "tools.convert", "export", str(runs / "base"), str(runs / "nope"),
                          "--adapters-only", "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode != 0 and "has no adapters (lora.rank is 0)" in out.stderr and "Traceback" not in out.stderr
    assert not (runs / "nope").exists()
