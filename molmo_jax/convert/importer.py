"""`import`: a PyTorch Molmo checkpoint -> a molmo_jax model directory, streamed.

The whole checkpoint is validated from its headers first (keys, shapes, dtypes against the config).
Then every conversion rule of `torch_format` runs layer by layer: the few PyTorch tensors of one
layer are read, checked for NaN/Inf, converted and written into their slice of the stacked orbax
leaves, so memory holds about one layer's tensors (or the largest unstacked tensor, the embedding),
never the model. All of it goes to a temporary sibling of DST that is renamed at the end.
"""
from __future__ import annotations

import json
import math
import pathlib

import numpy as np

from molmo_jax import torch_format
from molmo_jax.checkpoint import CONFIG, PARAMS, TOKENIZER, atomic_output, check_destination, config_to_json
from molmo_jax.convert import common, sources, validate
from molmo_jax.convert.stream_orbax import Group, StreamedLeaf, write_params
from molmo_jax.pretrained import param_paths
from molmo_jax.torch_format import PREFIX, WeightsError

MESH_FILE = "mesh.json"


def parse_mesh(text: str) -> dict[str, int]:
    """'data=1,fsdp=4,tensor=2' -> {'data': 1, 'fsdp': 4, 'tensor': 2}."""
    axes = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, _, size = part.partition("=")
        if not name or not size.isdigit() or int(size) < 1:
            raise WeightsError(f"--mesh {text!r}: expected axis=size pairs such as data=1,fsdp=4,tensor=2")
        axes[name.strip()] = int(size)
    if not axes:
        raise WeightsError(f"--mesh {text!r}: no axes")
    return axes


def shard_shape(shape, spec, axes: dict[str, int], what="") -> tuple[int, ...]:
    """One device's block of an array of `shape` laid out by PartitionSpec-like `spec` on a mesh."""
    spec = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
    out = []
    for dim, entry in zip(shape, spec):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        unknown = [n for n in names if n not in axes]
        if unknown:
            raise WeightsError(f"{what}: partition spec {spec} names mesh axes {unknown} not in {axes}")
        ways = math.prod(axes[n] for n in names)
        if dim % ways:
            raise WeightsError(f"{what}: dimension {dim} of shape {tuple(shape)} is not divisible by {ways} "
                               f"(partition spec {spec}, mesh {axes})")
        out.append(dim // ways)
    return tuple(out)


def mesh_partition_specs(cfg, axes: dict[str, int]) -> dict:
    """{path: PartitionSpec} of the model's parameters on a mesh of these axis sizes, by the
    project's sharding rules (molmo_jax.sharding); axes not given have size 1."""
    import jax
    from flax import nnx

    from molmo_jax import sharding
    from molmo_jax.models import abstract_model

    unknown = sorted(set(axes) - set(sharding.MESH_AXES))
    if unknown:
        raise WeightsError(f"--mesh: unknown axes {unknown} (the mesh axes are {', '.join(sharding.MESH_AXES)})")
    mesh = jax.sharding.AbstractMesh(tuple(axes.get(a, 1) for a in sharding.MESH_AXES), sharding.MESH_AXES)
    specs = sharding.param_specs(nnx.state(abstract_model(cfg), nnx.Param), mesh)
    return {tuple(str(k) for k in path): var.get_value() for path, var in nnx.to_flat_state(specs)}


def _rule_group(rule, cfg, tensors) -> Group:
    def produce(i):
        arrays = []
        for key in rule.torch_keys:
            key = key.format(i=i) if i is not None else key
            a = tensors.read(key)
            validate.check_finite(a, f"{tensors.info(key).file}: tensor {PREFIX + key!r}")
            arrays.append(a)
        return dict(zip(rule.paths, rule.to_jax(arrays)))

    return Group(produce, torch_format.n_layers_of(cfg, rule.per_layer) if rule.per_layer else None)


def plan_leaves(cfg, tensors, dtype, write_shapes=None) -> list[StreamedLeaf]:
    shapes = param_paths(cfg)
    leaves = []
    for rule in torch_format.rules(cfg):
        group = _rule_group(rule, cfg, tensors)
        for path in rule.paths:
            leaves.append(StreamedLeaf(path, shapes[path], np.dtype(dtype), group,
                                       (write_shapes or {}).get(path)))
    return leaves


def import_checkpoint(src, dst, *, config=None, dtype=None, mesh=None, partition_specs=None,
                      tokenizer=None, overwrite=False, progress=None) -> common.Summary:
    """Convert the PyTorch checkpoint `src` (directory or state dict file) into the model directory
    `dst`. `config`: a config.json or preset name, for a bare state dict. `dtype`: cast (default: the
    checkpoint's). `mesh` ({axis: size}) aligns the stored chunks with that mesh's parameter shardings
    (`partition_specs`, {path: spec}, overrides the project's sharding rules). `progress(n_bytes,
    total_bytes)` is called as tensors are written."""
    dst = check_destination(dst, overwrite)
    cfg, tensors = sources.open_pytorch(src, config)
    cfg.param_dtype = validate.check_torch_tensors(cfg, tensors, dtype)
    write_shapes = specs = None
    if mesh is not None:
        specs = partition_specs if partition_specs is not None else mesh_partition_specs(cfg, mesh)
        write_shapes = {p: shard_shape(s, specs.get(p, ()), mesh, ".".join(p)) for p, s in param_paths(cfg).items()}
    leaves = plan_leaves(cfg, tensors, cfg.param_dtype, write_shapes)
    summary = common.Summary("import", str(src), str(dst), cfg.name, n_tensors=len(leaves),
                             n_params=sum(leaf.size for leaf in leaves), dtype=cfg.param_dtype, files=1)
    with atomic_output(dst, overwrite) as tmp:
        tmp.mkdir()
        (tmp / CONFIG).write_text(config_to_json(cfg))
        write_params(tmp / PARAMS, leaves, common.Progress(summary, progress, sum(leaf.nbytes for leaf in leaves)))
        if tokenizer is not None:
            common.copy_tokenizer(tokenizer, tmp / TOKENIZER)
        elif pathlib.Path(src).is_dir() and common.copy_tokenizer(src, tmp / TOKENIZER, required=False):
            summary.notes.append(f"tokenizer files copied from {src}")
        if mesh is not None:
            layout = {"axes": mesh, "partition_specs": {".".join(p): _spec_json(s) for p, s in specs.items()}}
            (tmp / MESH_FILE).write_text(json.dumps(layout, indent=1))
    return summary.finish()


def _spec_json(spec):
    return [list(e) if isinstance(e, tuple) else e for e in tuple(spec)]
