"""molmo_jax's own checkpoint format: model directories and training checkpoints.

A model directory:
    config.json   the molmo_jax model config (the ConfigDict as JSON; JSON lists are read back as tuples,
                  the only sequence type model configs use)
    params/       an orbax PyTree checkpoint of the parameters, nested like nnx.state(model, nnx.Param)
    tokenizer/    optional: the tokenizer files
    mesh.json     optional (`convert import --mesh`): the mesh the arrays' chunks are aligned with

A training run (written by the trainer):
    WORKDIR/config.json                 the run's config: a model config, or a config with a `model` part
    WORKDIR/checkpoints/<step>/params/  orbax CheckpointManager item `params` (also `opt_state`, `meta`)

`find_checkpoint` tells these apart from PyTorch checkpoints; `load_any` loads any of them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import secrets
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from ml_collections import ConfigDict

from molmo_jax.models import abstract_model
from molmo_jax.pretrained import param_paths
from molmo_jax.torch_format import WeightsError

CONFIG = "config.json"
PARAMS = "params"
TOKENIZER = "tokenizer"
TORCH_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                      "pytorch_model.bin")
TORCH_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


# ------------------------------------------------------------------------------------------------
# Config as JSON

def config_to_json(cfg) -> str:
    try:
        return json.dumps(cfg.to_dict(), indent=1)
    except TypeError as e:
        raise WeightsError(f"config has a value JSON cannot hold: {e}") from None


def _tuples(value):
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def config_from_dict(d: dict, source="config") -> ConfigDict:
    """A model ConfigDict from its JSON form; a run config's `model` part is accepted too."""
    if "llm" not in d and isinstance(d.get("model"), dict) and "llm" in d["model"]:
        d = d["model"]
    if "llm" not in d:
        raise WeightsError(f"{source}: not a molmo_jax model config (no 'llm' section)")
    return ConfigDict(_tuples(d))


def _read_json(path) -> dict:
    try:
        return json.loads(pathlib.Path(path).read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None


# ------------------------------------------------------------------------------------------------
# Finding out what a path is

@dataclasses.dataclass
class CheckpointInfo:
    kind: str                            # "molmo_jax", "training" or "pytorch"
    path: pathlib.Path                   # what was asked for
    config_path: pathlib.Path | None     # None: a bare PyTorch state dict file
    params_dir: pathlib.Path | None = None
    step: int | None = None


def _is_molmo_config(path: pathlib.Path) -> bool:
    if not path.is_file():
        return False
    d = _read_json(path)
    return "llm" in d or (isinstance(d.get("model"), dict) and "llm" in d["model"])


def _latest_step(checkpoints: pathlib.Path) -> pathlib.Path | None:
    """The highest finished step: orbax renames a step directory to its number only once it is
    complete, so unfinished ones (`<step>.orbax-checkpoint-tmp-*`) are skipped."""
    steps = [p for p in checkpoints.iterdir() if p.name.isdigit() and (p / PARAMS).is_dir()]
    return max(steps, key=lambda p: int(p.name)) if steps else None


def find_checkpoint(path) -> CheckpointInfo:
    """What `path` is: a molmo_jax model directory, a training run (WORKDIR: its latest step) or one
    step directory of it, or a PyTorch checkpoint (original / HF directory, or a state dict file)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix in TORCH_FILE_SUFFIXES:
            config = path.parent / CONFIG
            return CheckpointInfo("pytorch", path, config if config.is_file() else None)
        raise WeightsError(f"{path}: not a checkpoint (a file should be a PyTorch state dict: "
                           f"{', '.join(TORCH_FILE_SUFFIXES)})")
    if (path / PARAMS).is_dir() and _is_molmo_config(path / CONFIG):
        return CheckpointInfo("molmo_jax", path, path / CONFIG, path / PARAMS)
    if (path / "checkpoints").is_dir() and _is_molmo_config(path / CONFIG):
        step = _latest_step(path / "checkpoints")
        if step is None:
            raise WeightsError(f"{path}: a training directory without any finished checkpoint "
                               f"in {path / 'checkpoints'}")
        return CheckpointInfo("training", path, path / CONFIG, step / PARAMS, int(step.name))
    if path.name.isdigit() and (path / PARAMS).is_dir():
        for config in (path / CONFIG, path.parent.parent / CONFIG):
            if _is_molmo_config(config):
                return CheckpointInfo("training", path, config, path / PARAMS, int(path.name))
        raise WeightsError(f"{path}: a training step directory, but no molmo_jax config.json was found "
                           f"in it or at {path.parent.parent / CONFIG}")
    if (path / CONFIG).is_file() and any((path / name).is_file() for name in TORCH_WEIGHT_FILES):
        return CheckpointInfo("pytorch", path, path / CONFIG)
    raise WeightsError(
        f"{path}: not a checkpoint. Expected a molmo_jax model directory ({CONFIG} + {PARAMS}/), a training "
        f"directory (config.json + checkpoints/<step>/params/) or one of its step directories, or a PyTorch "
        f"directory (config.json + one of {', '.join(TORCH_WEIGHT_FILES)})")


def load_config(path) -> ConfigDict:
    """The model config of any checkpoint `find_checkpoint` recognises."""
    info = find_checkpoint(path)
    if info.kind == "pytorch":
        from molmo_jax.convert import sources  # the PyTorch side; imported only when needed

        return sources.read_config(info)
    return config_from_dict(_read_json(info.config_path), str(info.config_path))


# ------------------------------------------------------------------------------------------------
# Writing

def check_destination(dst, overwrite=False) -> pathlib.Path:
    dst = pathlib.Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise WeightsError(f"{dst} already exists (use --overwrite / overwrite=True to replace it)")
    return dst


def _remove(path: pathlib.Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_output(dst, overwrite=False):
    """Yields a temporary sibling path to write `dst` into (a directory or a file); it becomes `dst`
    by a rename only when the block succeeds. On any failure, Ctrl-C included, the temporary is
    removed and `dst` is left as it was, so a failed run never leaves a `dst` that looks valid."""
    dst = check_destination(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(3)}"
    tmp = dst.parent / f".{dst.name}.partial-{tag}"
    try:
        yield tmp
        if dst.exists():  # --overwrite: move the old one aside so dst is never half old, half new
            old = dst.parent / f".{dst.name}.old-{tag}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            _remove(old)
        else:
            os.rename(tmp, dst)
    except BaseException:
        _remove(tmp)
        raise


def flatten_params(params) -> dict[tuple[str, ...], object]:
    """{path: array} from an nnx Module / State, a nested dict or a flat {path tuple: array} dict."""
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    if isinstance(params, nnx.State):
        params = params.to_pure_dict()
    if params and all(isinstance(k, tuple) for k in params):
        return {tuple(str(p) for p in k): v for k, v in params.items()}
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(prefix + (str(k),), v)
        else:
            flat[prefix] = node
    walk((), params)
    return flat


def nested(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def check_param_shapes(cfg, shapes: dict, source) -> None:
    """Every parameter of the model `cfg` describes is there with its shape, and nothing else."""
    expected = param_paths(cfg)
    missing = sorted(".".join(p) for p in expected.keys() - shapes.keys())
    unexpected = sorted(".".join(p) for p in shapes.keys() - expected.keys())
    if missing:
        raise WeightsError(f"{source}: missing parameters {', '.join(missing[:5])}"
                           + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if unexpected:
        raise WeightsError(f"{source}: parameters the config does not have: {', '.join(unexpected[:5])}"
                           + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    for path, shape in expected.items():
        if tuple(shapes[path]) != tuple(shape):
            raise WeightsError(f"{source}: parameter {'.'.join(path)} has shape {tuple(shapes[path])} but the "
                               f"config expects {tuple(shape)}")


def uniform_dtype(dtypes) -> str | None:
    names = {np.dtype(d).name for d in dtypes}
    return names.pop() if len(names) == 1 else None


def copy_tokenizer(src, dst: pathlib.Path):
    src = pathlib.Path(src)
    if not src.is_dir():
        raise WeightsError(f"{src}: tokenizer directory not found")
    shutil.copytree(src, dst, dirs_exist_ok=True)


def save_model(directory, cfg, params, tokenizer_dir=None, overwrite=False) -> pathlib.Path:
    """Write a model directory. `params`: an nnx Module or State, a nested dict or a flat {path: array}
    dict, matching `cfg`. The saved config's `param_dtype` is the parameters' dtype when they share one."""
    flat = flatten_params(params)
    check_param_shapes(cfg, {p: np.shape(v) for p, v in flat.items()}, "save_model")
    cfg = ConfigDict(cfg.to_dict())
    dtype = uniform_dtype(v.dtype for v in flat.values())
    if dtype:
        cfg.param_dtype = dtype
    with atomic_output(directory, overwrite) as tmp:
        tmp.mkdir()
        (tmp / CONFIG).write_text(config_to_json(cfg))
        ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).save(tmp / PARAMS, args=ocp.args.PyTreeSave(nested(flat)))
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp / TOKENIZER)
    return pathlib.Path(directory)


# ------------------------------------------------------------------------------------------------
# Reading

def stored_params(params_dir) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """{path: (shape, dtype)} of an orbax params checkpoint, from its metadata (no array is read)."""
    try:
        # Absolute: orbax returns no item metadata for a relative path to a training run's params
        # (runs/x/checkpoints/N/params), and the restore below would have nothing to go on.
        meta = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).metadata(
            pathlib.Path(params_dir).absolute()).item_metadata
    except Exception as e:  # orbax raises assorted errors for a damaged directory
        raise WeightsError(f"{params_dir}: not a readable orbax checkpoint ({e})") from None
    if meta is None:
        raise WeightsError(f"{params_dir}: orbax checkpoint without parameter metadata")
    return {path: (tuple(m.shape), np.dtype(m.dtype)) for path, m in flatten_params(dict(meta.tree)).items()}


def _shardings_by_path(shardings, paths):
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return {p: shardings for p in paths}
    flat = flatten_params(shardings)
    missing = sorted(".".join(p) for p in paths if p not in flat)
    if missing:
        raise WeightsError(f"shardings: no sharding for {', '.join(missing[:5])}")
    return flat


def load_model(directory, shardings=None, dtype=None):
    """(cfg, model) from a model directory, a training run (latest step) or a training step directory.

    `shardings`: optional pytree of `jax.sharding.Sharding` (nested like the parameters, an nnx State,
    a flat {path: sharding} dict, or one sharding for all); each array is read straight into its
    sharding, every device reading only its own part. `dtype` casts the parameters while reading.
    """
    info = find_checkpoint(directory)
    if info.kind == "pytorch":
        raise WeightsError(f"{directory}: a PyTorch checkpoint; use load_any, or convert it first "
                           f"(python -m tools.convert import SRC DST)")
    cfg = config_from_dict(_read_json(info.config_path), str(info.config_path))
    stored = stored_params(info.params_dir)
    check_param_shapes(cfg, {p: s for p, (s, _) in stored.items()}, info.params_dir)
    by_path = _shardings_by_path(shardings, stored)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore_args, abstract = {}, {}
    for path, (shape, stored_dtype) in stored.items():
        sharding = by_path[path] or default
        want = np.dtype(dtype) if dtype is not None else stored_dtype
        restore_args[path] = ocp.ArrayRestoreArgs(sharding=sharding, dtype=want, global_shape=shape)
        abstract[path] = jax.ShapeDtypeStruct(shape, want, sharding=sharding)
    try:
        restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
            pathlib.Path(info.params_dir).absolute(), args=ocp.args.PyTreeRestore(item=nested(abstract), restore_args=nested(restore_args)))
    except Exception as e:
        raise WeightsError(f"{info.params_dir}: cannot restore the parameters ({e})") from None
    flat = flatten_params(restored)
    cfg.param_dtype = uniform_dtype(a.dtype for a in flat.values()) or cfg.param_dtype
    return cfg, model_from_arrays(cfg, flat)


def model_from_arrays(cfg, flat: dict):
    """The model with these (already placed, already typed) arrays as its parameters."""
    graphdef, state = nnx.split(abstract_model(cfg))
    leaves = []
    for path, var in nnx.to_flat_state(state):
        key = tuple(str(k) for k in path)
        leaves.append((path, var.replace(flat[key])))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def load_any(path, shardings=None, dtype=None, config=None):
    """(cfg, model) from any checkpoint `find_checkpoint` recognises; PyTorch ones are converted in
    memory (for the largest models, convert once with `tools.convert import` instead). `config`
    (a config.json path or a preset name) is needed only for a bare state dict file."""
    info = find_checkpoint(path)
    if info.kind != "pytorch":
        return load_model(path, shardings=shardings, dtype=dtype)
    from molmo_jax.convert import sources

    cfg, flat = sources.read_pytorch(path, config=config, dtype=dtype)
    by_path = _shardings_by_path(shardings, flat)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placed = {p: jax.device_put(a, by_path[p] or default) for p, a in flat.items()}
    return cfg, model_from_arrays(cfg, placed)
