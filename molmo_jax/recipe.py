"""Checks of a training recipe at the edge of the tools that take one (`tools.train`, `tools.aot`).

Two kinds of mistakes are caught here, before anything is loaded, compiled or written:
- an override `--config.a.b=V` naming a key the recipe does not have: ml_collections would raise an
  AttributeError deep in flag parsing; `check_overrides` names the key and suggests the close ones;
- values no run can use (zero or negative sizes, a micro-batch count that does not divide the batch, a
  mesh this run's devices cannot form): `validate` returns every problem at once, each naming its key.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import sys

# Keys that must be positive integers, and those that must be >= 0 (0 meaning "off").
POSITIVE = ("batch_size", "seq_len", "total_steps", "grad_accum_steps", "log_every", "checkpoint_every", "data.max_crops",
            "data.max_images", "data.pack_records", "keep_checkpoints")
NON_NEGATIVE = ("max_loss_tokens", "loss_chunk_tokens", "keep_every", "max_bad_steps", "eval_every",
                "eval_batches", "eval_examples", "seed", "lora.rank",
                "data.max_frames")


class RecipeError(ValueError):
    """A recipe or override that cannot be used; the message is one line naming the key."""


def _config_file(argv, flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{flag}="):
            return arg.split("=", 1)[1]
        if arg == f"--{flag}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_recipe(spec: str):
    """The ConfigDict of `path.py[:arg]`, as ml_collections' config flag builds it."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise RecipeError(f"--config {path}: no such file")
    module_spec = importlib.util.spec_from_file_location("_recipe", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise RecipeError(f"--config {path}: defines no get_config()")
    return module.get_config(arg) if arg else module.get_config()


def _keys(node) -> list[str]:
    try:
        return list(node.keys())
    except AttributeError:
        return []


def check_overrides(argv=None, flag: str = "config") -> None:
    """RecipeError for the first `--config.KEY=...` whose KEY the recipe lacks (with close suggestions)."""
    argv = sys.argv[1:] if argv is None else argv
    spec = _config_file(argv, flag)
    overrides = [a[len(flag) + 3:].split("=", 1)[0] for a in argv if a.startswith(f"--{flag}.")]
    if spec is None or not overrides:
        return
    config = load_recipe(spec)
    for dotted in overrides:
        node, seen = config, []
        for part in dotted.split("."):
            keys = _keys(node)
            if part not in keys:
                where = f" under {'.'.join(seen)}" if seen else ""
                close = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
                hint = (f"; did you mean {' or '.join('.'.join(seen + [c]) for c in close)}?" if close
                        else f"; its keys: {', '.join(sorted(keys))}" if keys else f" ({'.'.join(seen)} is a value)")
                raise RecipeError(f"--{flag}.{dotted}: the recipe {spec} has no key {part!r}{where}{hint}")
            node, seen = node[part], seen + [part]


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if part not in _keys(node):
            return None
        node = node[part]
    return node


def validate(config, n_devices: int | None = None) -> list[str]:
    """Every problem of a training recipe, each as 'key: what is wrong' (empty when it can run).
    With `n_devices` (the devices this run sees), the mesh is also resolved against that count."""
    problems = []
    for keys, smallest in ((POSITIVE, 1), (NON_NEGATIVE, 0)):
        for key in keys:
            value = _get(config, key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{key}: must be an integer, got {value!r}")
            elif value < smallest:
                problems.append(f"{key}: must be {'>= 1' if smallest else '>= 0'}, got {value}")
    batch, accum = _get(config, "batch_size"), _get(config, "grad_accum_steps")
    if isinstance(batch, int) and isinstance(accum, int) and batch > 0 and accum > 0 and batch % accum:
        problems.append(f"grad_accum_steps: {accum} micro-batches do not divide batch_size {batch}")
    family = _get(config, "model.family") or "molmo"
    for key, default in (("data.max_images", 1), ("data.max_frames", 0), ("data.pack_records", 1)):
        value = _get(config, key)
        if family != "molmo2" and isinstance(value, int) and value != default:
            problems.append(f"{key}: {value} is for a Molmo2 (several images, videos, packed records); a Molmo "
                            f"takes {default}")
    mesh = _get(config, "mesh")
    for axis in _keys(mesh):
        size = mesh[axis]
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            problems.append(f"mesh.{axis}: must be a positive size or -1 (the remaining devices), got {size!r}")
    if n_devices is not None and mesh is not None and not any(p.startswith("mesh.") for p in problems):
        from molmo_jax import sharding  # imports jax: only when a device count is given

        try:
            sharding.mesh_shape(dict(mesh), n_devices)
        except sharding.MeshError as e:
            problems.append(str(e))  # "mesh {...}: what is wrong"
    return problems
