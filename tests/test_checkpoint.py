"""molmo_jax checkpoints: config JSON, save/load, sharded restore, telling checkpoint kinds apart."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import GOLDEN
from molmo_jax import config as config_lib
from molmo_jax import weights
from molmo_jax.models import create_model
from molmo_jax.weights import WeightsError


def flat_params(model):
    return weights.params.model_to_flat(model)


def assert_same_params(a, b):
    fa, fb = flat_params(a), flat_params(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=".".join(k))


@pytest.fixture(scope="module")
def tiny_model():
    return create_model(config_lib.tiny(), seed=3)


@pytest.mark.parametrize("preset", ["tiny", "molmoe_1b", "molmo_72b"])
def test_config_json_roundtrip_keeps_values_and_types(preset):
    cfg = config_lib.get_config(preset)
    back = weights.configs.config_from_dict(json.loads(weights.configs.config_to_json(cfg)))
    assert back.to_dict() == cfg.to_dict()
    for part in ("vit", "image", "llm", "connector"):
        for key, value in cfg[part].items():
            assert type(back[part][key]) is type(value), (part, key)
    assert isinstance(back.vit.image_size, tuple) and isinstance(back.image.mean, tuple)


def test_run_config_model_part_is_accepted():
    cfg = config_lib.tiny()
    run = {"model": json.loads(weights.configs.config_to_json(cfg)), "optimizer": {"lr": 1e-4}}
    assert weights.configs.config_from_dict(run).to_dict() == cfg.to_dict()
    with pytest.raises(WeightsError, match="no 'llm' section"):
        weights.configs.config_from_dict({"optimizer": {}})


@pytest.mark.parametrize("form", ["module", "state", "nested", "flat"])
def test_save_and_load_model(tmp_path, tiny_model, form):
    cfg = tiny_model.cfg
    params = {"module": tiny_model, "state": nnx.state(tiny_model, nnx.Param),
              "nested": nnx.state(tiny_model, nnx.Param).to_pure_dict(), "flat": flat_params(tiny_model)}[form]
    weights.save_model(tmp_path / "m", cfg, params)
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "params").is_dir()
    assert weights.find_checkpoint(tmp_path / "m").kind == "molmo_jax"
    cfg2, model = weights.load(tmp_path / "m")
    assert cfg2.to_dict() == cfg.to_dict()
    assert_same_params(model, tiny_model)
    assert not list(tmp_path.glob(".m.*")), "temporary directory left behind"


def test_model_directory_written_before_model_families_still_loads(tmp_path, tiny_model):
    """Configs saved before `family` existed have no such key: they are Molmo."""
    weights.save_model(tmp_path / "m", tiny_model.cfg, tiny_model)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config.pop("family") == "molmo"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    cfg, model = weights.load(tmp_path / "m")
    assert "family" not in cfg and type(model).__name__ == "Molmo"
    assert_same_params(model, tiny_model)
    config["family"] = "molmo3"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="config.json: model family 'molmo3' is not known; choose one of molmo"):
        weights.load(tmp_path / "m")


def test_bf16_params_are_stored_as_bf16_and_cast_on_load(tmp_path, tiny_model):
    flat = {k: v.astype(jnp.bfloat16) for k, v in flat_params(tiny_model).items()}
    weights.save_model(tmp_path / "m", tiny_model.cfg, flat)
    assert weights.load_config(tmp_path / "m").param_dtype == "bfloat16"
    cfg, model = weights.load(tmp_path / "m")
    assert cfg.param_dtype == "bfloat16"
    assert {a.dtype for a in flat_params(model).values()} == {np.dtype(jnp.bfloat16)}
    cfg, model = weights.load(tmp_path / "m", dtype="float32")
    assert cfg.param_dtype == "float32"
    got = flat_params(model)
    for k, v in flat.items():
        np.testing.assert_array_equal(got[k], np.asarray(v, np.float32))


def test_restore_straight_into_shardings(tmp_path, tiny_model):
    weights.save_model(tmp_path / "m", tiny_model.cfg, tiny_model)
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"))
    shapes = weights.params.param_paths(tiny_model.cfg)
    # Shard the layer-stacked LLM kernels' second axis over fsdp where it divides, replicate the rest.
    shardings = {p: NamedSharding(mesh, P(None, "fsdp") if len(s) == 3 and s[1] % 4 == 0 else P())
                 for p, s in shapes.items()}
    cfg, model = weights.load(tmp_path / "m", shardings=weights.params.nested(shardings))
    state = {tuple(str(k) for k in p): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    n_sharded = 0
    for path, array in state.items():
        assert array.sharding.is_equivalent_to(shardings[path], array.ndim), path
        n_sharded += shardings[path].spec == P(None, "fsdp")
    assert n_sharded >= 5
    assert_same_params(model, tiny_model)


def write_training_run(workdir, model, steps):
    """A training directory as the trainer writes it: CheckpointManager items params/opt_state/meta."""
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"model": model.cfg.to_dict(), "train": {"steps": 10}}))
    params = nnx.state(model, nnx.Param).to_pure_dict()
    with ocp.CheckpointManager(workdir / "checkpoints", item_names=("params", "opt_state", "meta")) as mgr:
        for step in steps:
            scaled = jax.tree.map(lambda x, s=step: x * s, params)
            mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(scaled),
                                                   opt_state=ocp.args.StandardSave({"count": jnp.int32(step)}),
                                                   meta=ocp.args.JsonSave({"step": step})))
        mgr.wait_until_finished()


def test_training_checkpoints(tmp_path, tiny_model, monkeypatch):
    work = tmp_path / "run"
    write_training_run(work, tiny_model, steps=(2, 5))
    (work / "checkpoints" / "9.orbax-checkpoint-tmp-123").mkdir()  # an unfinished save is skipped
    info = weights.find_checkpoint(work)
    assert (info.kind, info.step) == ("training", 5)
    _, model = weights.load(work)
    want = {k: v * 5 for k, v in flat_params(tiny_model).items()}
    for k, v in flat_params(model).items():
        np.testing.assert_allclose(v, want[k], rtol=1e-6, err_msg=".".join(k))
    info = weights.find_checkpoint(work / "checkpoints" / "2")
    assert (info.kind, info.step, info.config_path) == ("training", 2, work / "config.json")
    _, model2 = weights.load(work / "checkpoints" / "2")
    np.testing.assert_allclose(flat_params(model2)[("llm", "ln_f", "weight")],
                               2 * flat_params(tiny_model)[("llm", "ln_f", "weight")], rtol=1e-6)
    monkeypatch.chdir(tmp_path)  # a relative path (orbax gave no metadata for one: "runs/x" failed)
    _, model3 = weights.load("run", shardings=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    np.testing.assert_allclose(flat_params(model3)[("llm", "ln_f", "weight")],
                               5 * flat_params(tiny_model)[("llm", "ln_f", "weight")], rtol=1e-6)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    shutil.copy(work / "config.json", empty / "config.json")
    (empty / "checkpoints").mkdir()
    with pytest.raises(WeightsError, match="without any finished checkpoint"):
        weights.find_checkpoint(empty)


def test_find_checkpoint_kinds_and_errors(tmp_path):
    golden = GOLDEN / "models" / "qwen2_style"
    assert weights.find_checkpoint(golden).kind == "pytorch"
    assert weights.find_checkpoint(golden / "model.safetensors").kind == "pytorch"
    with pytest.raises(WeightsError, match="no such file or directory"):
        weights.find_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="not a checkpoint. Expected a molmo_jax model directory"):
        weights.find_checkpoint(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(WeightsError, match="not a checkpoint"):
        weights.find_checkpoint(tmp_path / "notes.txt")


def test_load_converts_pytorch_in_memory_as_import_does(tmp_path):
    golden = GOLDEN / "models" / "olmo_style"
    cfg, model = weights.load(golden)
    weights.import_checkpoint(golden, tmp_path / "imported")
    _, reference = weights.load(tmp_path / "imported")
    assert cfg.llm.norm_after and cfg.vit.n_layers == 9
    assert_same_params(model, reference)
    assert weights.load_config(golden).to_dict() == cfg.to_dict()


def test_save_model_checks_and_never_leaves_partial_output(tmp_path, tiny_model):
    flat = flat_params(tiny_model)
    bad = dict(flat)
    bad[("llm", "ln_f", "weight")] = np.ones(65, np.float32)
    with pytest.raises(WeightsError, match=r"llm.ln_f.weight has shape \(65,\) but the config expects \(64,\)"):
        weights.save_model(tmp_path / "m", tiny_model.cfg, bad)
    del bad[("llm", "ln_f", "weight")]
    with pytest.raises(WeightsError, match="missing parameters llm.ln_f.weight"):
        weights.save_model(tmp_path / "m", tiny_model.cfg, bad)
    # A failure after the parameters were written (tokenizer directory missing) removes everything.
    with pytest.raises(WeightsError, match="no_tok: no tokenizer files there"):
        weights.save_model(tmp_path / "m", tiny_model.cfg, flat, tokenizer_dir=tmp_path / "no_tok")
    assert list(tmp_path.iterdir()) == []
    weights.save_model(tmp_path / "m", tiny_model.cfg, flat)
    with pytest.raises(WeightsError, match="already exists"):
        weights.save_model(tmp_path / "m", tiny_model.cfg, flat)
    weights.save_model(tmp_path / "m", tiny_model.cfg, {k: v * 2 for k, v in flat.items()}, overwrite=True)
    _, model = weights.load(tmp_path / "m")
    np.testing.assert_array_equal(flat_params(model)[("llm", "ln_f", "weight")], 2 * flat[("llm", "ln_f", "weight")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
