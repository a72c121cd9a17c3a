"""Corrupt and hostile inputs: each gives a clear error naming the problem, and DST never appears."""
import json
import pickle
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import GOLDEN
from molmo_jax import weights
from molmo_jax import config as config_lib
from molmo_jax.weights import export_checkpoint, import_checkpoint
from molmo_jax.models import create_model
from molmo_jax.weights import WeightsError

SRC = GOLDEN / "models" / "qwen2_style"


def copy_model(tmp_path, tensors=None, name="src"):
    d = tmp_path / name
    d.mkdir()
    shutil.copy(SRC / "config.json", d / "config.json")
    save_file(tensors if tensors is not None else load_file(SRC / "model.safetensors"), d / "model.safetensors")
    return d


def assert_nothing_written(tmp_path, dst_name="dst"):
    assert not (tmp_path / dst_name).exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{dst_name}.")]
    assert leftovers == [], leftovers


def fails(tmp_path, src, match, **kw):
    with pytest.raises(WeightsError, match=match):
        import_checkpoint(src, tmp_path / "dst", **kw)
    assert_nothing_written(tmp_path)


def test_truncated_safetensors(tmp_path):
    d = copy_model(tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) - 1000])
    fails(tmp_path, d, r"model.safetensors: not a readable safetensors file \(.*incomplete metadata")
    (d / "model.safetensors").write_bytes(data[:100])
    fails(tmp_path, d, r"model.safetensors: not a readable safetensors file")


class WouldRunCode:
    """Unpickling this calls open(marker, 'w'): a file appears if the pickle is ever executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "weights.pt"])
def test_malicious_pickle_is_refused_not_run(tmp_path, name):
    marker = tmp_path / "pwned"
    d = tmp_path / "src"
    d.mkdir()
    shutil.copy(SRC / "config.json", d / "config.json")
    with open(d / name, "wb") as f:
        pickle.dump({"model.transformer.ln_f.weight": WouldRunCode(str(marker))}, f, protocol=2)
    src = d if name == "pytorch_model.bin" else d / name
    fails(tmp_path, src, rf"{name}: refused: not a plain tensor state dict .*weights_only=True")
    assert not marker.exists(), "the pickle was executed"


def test_torch_bin_state_dict_imports_like_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    tensors = load_file(SRC / "model.safetensors")
    d = tmp_path / "src"
    d.mkdir()
    shutil.copy(SRC / "config.json", d / "config.json")
    state = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tensors.items()}
    torch.save(state, d / "pytorch_model.bin")
    import_checkpoint(d, tmp_path / "dst")
    cfg, model = weights.load(tmp_path / "dst")
    assert cfg.param_dtype == "bfloat16"
    got = np.asarray(model.llm.ln_f.weight[...], np.float32)
    want = state["model.transformer.ln_f.weight"].float().numpy()
    np.testing.assert_array_equal(got, want)


def test_shard_missing_from_index(tmp_path):
    tensors = load_file(SRC / "model.safetensors")
    d = tmp_path / "src"
    d.mkdir()
    shutil.copy(SRC / "config.json", d / "config.json")
    keys = sorted(tensors)
    weight_map = {}
    for k, part in enumerate((keys[:20], keys[20:])):
        name = f"model-0000{k + 1}-of-00002.safetensors"
        save_file({key: tensors[key] for key in part}, d / name)
        weight_map.update({key: name for key in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    import_checkpoint(d, tmp_path / "ok")  # complete: imports
    (d / "model-00002-of-00002.safetensors").unlink()
    fails(tmp_path, d, r"shard model-00002-of-00002.safetensors \(holding '.*'\) is missing")


def test_shape_mismatch_names_file_key_and_shapes(tmp_path):
    tensors = load_file(SRC / "model.safetensors")
    tensors["model.transformer.blocks.1.attn_out.weight"] = np.zeros((64, 60), np.float32)
    d = copy_model(tmp_path, tensors)
    fails(tmp_path, d, r"src/model.safetensors: key 'model.transformer.blocks.1.attn_out.weight' has shape "
                       r"\(64, 60\) but the config expects \(64, 64\)")


def test_config_that_does_not_match_the_weights(tmp_path):
    d = copy_model(tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["n_layers"] = 3
    (d / "config.json").write_text(json.dumps(config))
    fails(tmp_path, d, r"missing keys for this config: 'model.transformer.blocks.2.att_proj.bias' \(128,\)")


def test_missing_unexpected_and_integer_tensors(tmp_path):
    tensors = load_file(SRC / "model.safetensors")
    extra = dict(tensors, **{"model.transformer.blocks.0.extra": np.zeros(3, np.float32)})
    fails(tmp_path, copy_model(tmp_path, extra, "a"),
          r"unexpected keys for this config: 'model.transformer.blocks.0.extra' \(3,\) \(model.safetensors\)")
    ints = dict(tensors, **{"model.transformer.ln_f.weight": np.ones(64, np.int32)})
    fails(tmp_path, copy_model(tmp_path, ints, "b"), r"'model.transformer.ln_f.weight' \(64,\) has dtype int32")


def test_nan_tensor(tmp_path):
    tensors = load_file(SRC / "model.safetensors")
    bad = tensors["model.transformer.blocks.1.ff_out.weight"].copy()
    bad[3, 5] = np.nan
    bad[7, 1] = np.inf
    tensors["model.transformer.blocks.1.ff_out.weight"] = bad
    fails(tmp_path, copy_model(tmp_path, tensors), r"src/model.safetensors: tensor "
          r"'model.transformer.blocks.1.ff_out.weight' \(64, 96\) has 2 NaN/Inf values \(first at index \(3, 5\)\)")


def test_bare_state_dict_needs_a_config(tmp_path):
    f = tmp_path / "weights.safetensors"
    shutil.copy(SRC / "model.safetensors", f)
    fails(tmp_path, f, "a bare state dict has no config")
    import_checkpoint(f, tmp_path / "dst", config=SRC / "config.json")
    assert weights.load_config(tmp_path / "dst").llm.n_layers == 2


def test_existing_destination_is_refused_before_any_work(tmp_path):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    with pytest.raises(WeightsError, match="already exists"):
        import_checkpoint(SRC, tmp_path / "dst")
    assert (tmp_path / "dst" / "keep.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "m"
    cfg = config_lib.tiny()
    weights.save_model(d, cfg, create_model(cfg))
    return d


def test_export_of_nan_checkpoint(tmp_path, saved_tiny):
    cfg, model = weights.load(saved_tiny)
    flat = {k: np.array(v) for k, v in weights.params.flatten_params(model).items()}
    flat[("vision", "blocks", "w1", "kernel")][1, 0, 0] = np.nan
    weights.save_model(tmp_path / "nan", cfg, flat)
    with pytest.raises(WeightsError, match=r"parameter vision.blocks.w1.kernel\[1\] \(32, 64\) has 1 NaN/Inf"):
        export_checkpoint(tmp_path / "nan", tmp_path / "dst")
    assert_nothing_written(tmp_path)


def test_interrupted_runs_leave_nothing(tmp_path, saved_tiny):
    """Ctrl-C in the middle of writing (raised from the progress callback) removes the partial output."""
    calls = []

    def interrupt(n, total):
        calls.append(n)
        if len(calls) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(saved_tiny, tmp_path / "dst", progress=interrupt)
    assert_nothing_written(tmp_path)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        import_checkpoint(SRC, tmp_path / "dst", progress=interrupt)
    assert_nothing_written(tmp_path)


def test_export_refuses_wrong_sources(tmp_path, saved_tiny):
    with pytest.raises(WeightsError, match="already a PyTorch checkpoint"):
        export_checkpoint(SRC, tmp_path / "dst")
    with pytest.raises(WeightsError, match="cannot read the size '5 parsecs'"):
        export_checkpoint(saved_tiny, tmp_path / "dst", shard_size="5 parsecs")
    # A config that does not match the stored parameters.
    broken = tmp_path / "broken"
    shutil.copytree(saved_tiny, broken)
    config = json.loads((broken / "config.json").read_text())
    config["llm"]["d_model"] = 72
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"broken/params: parameter connector.w2.kernel has shape \(96, 64\) "
                                           r"but the config expects \(96, 72\)"):
        export_checkpoint(broken, tmp_path / "dst")
    assert_nothing_written(tmp_path)


@pytest.mark.slow
def test_ctrl_c_stops_the_command_and_leaves_nothing(tmp_path):
    """A real SIGINT to `tools.convert import` on a ~700 MB checkpoint: it stops within seconds,
    says so in one line, and leaves neither DST nor its temporary sibling."""
    import signal
    import subprocess
    import sys
    import time

    from bench.bench_convert import synthetic_config, write_source

    write_source(synthetic_config(1024, 4, 4096), tmp_path / "src")
    proc = subprocess.Popen([sys.executable, "-m", "tools.convert", "import", str(tmp_path / "src"),
                             str(tmp_path / "dst"), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".dst.partial-*/params*")) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # well inside the writing
    proc.send_signal(signal.SIGINT)
    sent = time.time()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "interrupted:" in err and "Traceback" not in err, err
    assert time.time() - sent < 30
    assert_nothing_written(tmp_path)


def test_remote_code_export_of_a_tower_the_release_cannot_build(tmp_path, saved_tiny):
    """The released remote code builds the CLIP ViT-L/14-336 tower whatever config.json says, so
    --remote-code with the tiny model's tower is refused before anything is written; without it, the
    summary says where the export loads instead of pointing at --remote-code."""
    code = tmp_path / "released"
    code.mkdir()
    (code / "modeling_molmo.py").write_text("# the release's modeling code\n")
    with pytest.raises(WeightsError, match=r"--remote-code: the released code cannot load .*\(vit\.\w+ is .* where "
                                           r"the released code builds .*\); export without --remote-code"):
        export_checkpoint(saved_tiny, tmp_path / "dst", remote_code=code)
    assert_nothing_written(tmp_path)
    summary = export_checkpoint(saved_tiny, tmp_path / "dst")
    notes = " ".join(summary.notes)
    assert "not loadable by the released remote code" in notes and "--remote-code DIR" not in notes
    assert weights.mappings.for_config(config_lib.get_config("molmo_7b_d")).remote_code_problem(
        config_lib.get_config("molmo_72b")) is None
