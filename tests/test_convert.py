"""The converter: golden round trips, golden logits, import(export(x)) == x, dtypes, shards, meshes, CLI."""
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from conftest import GOLDEN
from molmo_jax import config as config_lib
from molmo_jax import weights
from molmo_jax.weights import export_checkpoint, import_checkpoint
from molmo_jax.weights.stream_orbax import ParamReader
from molmo_jax.models import create_model
from molmo_jax.weights.params import model_to_flat, param_paths
from molmo_jax.weights import WeightsError

MODELS = ["olmo_style", "qwen2_style"]


def stored_arrays(model_dir):
    reader = ParamReader(model_dir / "params")
    return {p: reader.read(p) for p in reader.leaves}


def exported_tensors(hf_dir):
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    tensors = {}
    for name in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(hf_dir / name))
    return index, tensors


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Each golden model imported once: {name: model directory}."""
    root = tmp_path_factory.mktemp("imported")
    for name in MODELS:
        import_checkpoint(GOLDEN / "models" / name, root / name)
    return {name: root / name for name in MODELS}


@pytest.mark.parametrize("name", MODELS)
def test_golden_round_trip_is_bit_exact(tmp_path, imported, name):
    src = GOLDEN / "models" / name
    shutil.copytree(imported[name], tmp_path / "a")
    summary = export_checkpoint(tmp_path / "a", tmp_path / "hf", shard_size="200KB")
    import_checkpoint(tmp_path / "hf", tmp_path / "b")

    a, b = stored_arrays(tmp_path / "a"), stored_arrays(tmp_path / "b")
    assert a.keys() == b.keys() == param_paths(weights.load_config(tmp_path / "a")).keys()
    for k in a:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k], b[k], err_msg=".".join(k))

    golden = load_file(src / "model.safetensors")
    index, exported = exported_tensors(tmp_path / "hf")
    assert exported.keys() == golden.keys()
    for k, v in golden.items():
        assert (exported[k].shape, exported[k].dtype) == (v.shape, v.dtype), k
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in golden.values())
    assert summary.files == len(set(index["weight_map"].values())) > 1
    assert weights.load_config(tmp_path / "b").to_dict() == weights.load_config(tmp_path / "a").to_dict()
    # The PyTorch-format loader (tools.forward) reads the export as it reads the released models.
    _, via_loader = weights.load(tmp_path / "hf")
    for k, v in model_to_flat(via_loader).items():
        np.testing.assert_array_equal(v, a[k], err_msg=".".join(k))


@pytest.mark.parametrize("name", MODELS)
def test_imported_golden_models_reproduce_golden_logits(imported, name):
    src = GOLDEN / "models" / name
    _, model = weights.load(imported[name])
    inp, exp = dict(np.load(src / "inputs.npz")), dict(np.load(src / "expected.npz"))
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, *batch):
        return nnx.merge(graphdef, state)(*batch)["logits"]

    logits = np.asarray(run(state, inp["input_ids"], inp["images"], inp["image_masks"], inp["image_input_idx"]))
    assert logits.shape == exp["logits"].shape
    assert float(np.max(np.abs(logits - exp["logits"]))) <= 1e-4


def variant_configs():
    tiny = config_lib.tiny()
    moe = config_lib.tiny()
    moe.name = "tiny_moe"
    moe.llm.update(moe_num_experts=4, moe_top_k=2, qkv_bias=False, qk_norm=True, mlp_dim=32, bos_token_id=7,
                   eos_token_id=8, additional_vocab_size=16, head_dim=8, clip_qkv=5.0)
    odd = config_lib.tiny()
    odd.name = "odd_vision"
    odd.vit.update(image_size=(84, 98), n_layers=2, activation="gelu_exact", vit_layers=(-1,), norm_eps=1e-6)
    odd.connector.update(padding_embed="pad_embed", projector="linear", pooling="attention")
    odd.image.update(max_crops=6, overlap_margins=(1, 3), legacy_mask_shift=False)
    odd.llm.update(norm_after=True, rope_theta=12345.0, max_sequence_length=333, residual_dropout=0.1)
    return [tiny, moe, odd]


@pytest.mark.parametrize("cfg", variant_configs(), ids=lambda c: c.name)
def test_import_of_export_is_identity(tmp_path, cfg):
    model = create_model(cfg, seed=1)
    weights.save_model(tmp_path / "x", cfg, model)
    export_checkpoint(tmp_path / "x", tmp_path / "hf")
    released = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert released["model_type"] == "molmo" and released["intermediate_size"] == 2 * cfg.llm.mlp_dim
    assert released["num_hidden_layers"] == cfg.llm.n_layers and "molmo_jax" in released
    import_checkpoint(tmp_path / "hf", tmp_path / "y")
    cfg_y, model_y = weights.load(tmp_path / "y")
    assert cfg_y.to_dict() == cfg.to_dict()
    want, got = model_to_flat(model), model_to_flat(model_y)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=".".join(k))


def test_bf16_checkpoint_exports_as_bf16_unless_asked(tmp_path):
    cfg = config_lib.tiny()
    flat = {k: v.astype(jnp.bfloat16) for k, v in model_to_flat(create_model(cfg)).items()}
    weights.save_model(tmp_path / "x", cfg, flat)
    export_checkpoint(tmp_path / "x", tmp_path / "bf16")
    export_checkpoint(tmp_path / "x", tmp_path / "f32", dtype="float32")
    for name, want in (("bf16", "BF16"), ("f32", "F32")):
        index = json.loads((tmp_path / name / "model.safetensors.index.json").read_text())
        header_dtypes = set()
        for shard in set(index["weight_map"].values()):
            with open(tmp_path / name / shard, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            header_dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        assert header_dtypes == {want}
        assert json.loads((tmp_path / name / "config.json").read_text())["torch_dtype"] == \
            {"BF16": "bfloat16", "F32": "float32"}[want]
    import_checkpoint(tmp_path / "bf16", tmp_path / "back")
    cfg_back, model = weights.load(tmp_path / "back")
    assert cfg_back.param_dtype == "bfloat16"
    for k, v in model_to_flat(model).items():
        assert v.dtype == jnp.bfloat16
        np.testing.assert_array_equal(v, np.asarray(flat[k]))


def test_state_dict_format_is_one_file_that_imports_without_a_config(tmp_path, imported):
    src = GOLDEN / "models" / "qwen2_style"
    shutil.copytree(imported["qwen2_style"], tmp_path / "a")
    export_checkpoint(tmp_path / "a", tmp_path / "model.safetensors", fmt="state_dict")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "model.safetensors"]
    np.testing.assert_array_equal(load_file(tmp_path / "model.safetensors")["model.transformer.ln_f.weight"],
                                  load_file(src / "model.safetensors")["model.transformer.ln_f.weight"])
    import_checkpoint(tmp_path / "model.safetensors", tmp_path / "b")
    a, b = stored_arrays(tmp_path / "a"), stored_arrays(tmp_path / "b")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(WeightsError, match="give it a .safetensors name"):
        export_checkpoint(tmp_path / "a", tmp_path / "out.bin", fmt="state_dict")


def test_shards_respect_the_size_limit(tmp_path):
    cfg = config_lib.tiny()
    weights.save_model(tmp_path / "x", cfg, create_model(cfg))
    limit = 100_000
    export_checkpoint(tmp_path / "x", tmp_path / "hf", shard_size=f"{limit}B")
    index, tensors = exported_tensors(tmp_path / "hf")
    names = sorted(set(index["weight_map"].values()))
    assert names == [f"model-{k:05d}-of-{len(names):05d}.safetensors" for k in range(1, len(names) + 1)]
    for name in names:
        with safe_open(tmp_path / "hf" / name, "numpy") as f:
            assert f.metadata() == {"format": "pt"}  # transformers refuses shards without it
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
        assert sum(sizes) <= limit or len(sizes) == 1, (name, sizes)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())


def test_mesh_aligned_import_restores_into_shardings(tmp_path):
    """--mesh: chunks follow one device's shard (and one layer) under the project's sharding rules,
    and a sharded restore on that mesh gives the same arrays."""
    from molmo_jax import sharding
    from molmo_jax.models import abstract_model

    src = GOLDEN / "models" / "qwen2_style"
    import_checkpoint(src, tmp_path / "m", mesh={"fsdp": 4, "tensor": 2})
    layout = json.loads((tmp_path / "m" / "mesh.json").read_text())
    assert layout["axes"] == {"fsdp": 4, "tensor": 2}
    wq = ("llm", "blocks", "attn", "wq", "kernel")  # [layers, d, heads, head_dim] = [2, 64, 4, 16]
    assert layout["partition_specs"]["llm.blocks.attn.wq.kernel"] == [None, "fsdp", "tensor", None]
    reader = ParamReader(tmp_path / "m" / "params")
    assert tuple(reader._store(wq).chunk_layout.read_chunk.shape) == (1, 16, 2, 16)

    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    cfg = weights.load_config(tmp_path / "m")
    shardings = sharding.param_shardings(nnx.state(abstract_model(cfg), nnx.Param), mesh)
    _, model = weights.load(tmp_path / "m", shardings=shardings)
    state = {tuple(str(k) for k in p): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert state[wq].sharding.spec == P(None, "fsdp", "tensor", None)
    _, reference = weights.load(src)
    for k, v in model_to_flat(reference).items():
        np.testing.assert_array_equal(np.asarray(state[k]), v)
    with pytest.raises(WeightsError, match="not divisible by 3"):
        import_checkpoint(src, tmp_path / "bad", mesh={"fsdp": 3}, partition_specs={wq: P(None, "fsdp")})
    with pytest.raises(WeightsError, match=r"--mesh: unknown axes \['model'\]"):
        import_checkpoint(src, tmp_path / "bad", mesh={"model": 2})
    assert not (tmp_path / "bad").exists()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tools.convert", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_command_line(tmp_path):
    src = GOLDEN / "models" / "olmo_style"
    proc = run_cli("import", src, tmp_path / "m", "--no-progress", "--mesh", "fsdp=2,tensor=2")
    assert proc.returncode == 0, proc.stderr
    assert "import:" in proc.stdout and "401,232 parameters" in proc.stdout and "peak RSS" in proc.stdout
    assert json.loads((tmp_path / "m" / "mesh.json").read_text())["axes"] == {"fsdp": 2, "tensor": 2}
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    proc = run_cli("export", tmp_path / "m", tmp_path / "hf", "--shard-size", "500KB", "--dtype", "bfloat16",
                   "--tokenizer", tmp_path / "tok")
    assert proc.returncode == 0, proc.stderr
    assert "export:" in proc.stdout and "bfloat16" in proc.stdout and "2 file(s)" in proc.stdout
    assert "100%" in proc.stderr  # the progress bar ran to the end
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    # An error found while streaming (a NaN, deep in orbax's writer thread) is one line, no traceback.
    tensors = load_file(src / "model.safetensors")
    tensors["model.transformer.blocks.2.ff_out.weight"][0, 0] = np.nan
    (tmp_path / "nan").mkdir()
    shutil.copy(src / "config.json", tmp_path / "nan" / "config.json")
    save_file(tensors, tmp_path / "nan" / "model.safetensors")
    proc = run_cli("import", tmp_path / "nan", tmp_path / "x", "--no-progress")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: " in proc.stderr
    assert "'model.transformer.blocks.2.ff_out.weight' (64, 80) has 1 NaN/Inf" in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, message", [
    (["export", "{m}", "{m}"], "already exists"),
    (["import", "{tmp}/nowhere", "{tmp}/x"], "no such file or directory"),
    (["import", "{golden}", "{tmp}/x", "--mesh", "fsdp=zero"], "size of 'fsdp' must be an integer"),
    (["export", "{m}", "{tmp}/x", "--shard-size", "lots"], "cannot read the size 'lots'"),
])
def test_command_line_errors_are_one_line(tmp_path, capsys, args, message):
    from tools.convert import main

    cfg = config_lib.tiny()
    weights.save_model(tmp_path / "m", cfg, create_model(cfg))
    names = dict(m=tmp_path / "m", tmp=tmp_path, golden=GOLDEN / "models" / "olmo_style")
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(**names) for a in args] + ["--no-progress"])
    assert str(exit_info.value).startswith("error: ") and message in str(exit_info.value)
    assert not (tmp_path / "x").exists()
