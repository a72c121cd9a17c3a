"""`import`: a PyTorch checkpoint (Molmo, Molmo2) -> one of this project's model directories, streamed.

The whole checkpoint is validated from its headers first (keys, shapes, dtypes against the config).
Then every mapping rule runs layer by layer: the few PyTorch tensors of one layer are read, checked
for NaN/Inf, converted and written into their slice of the stacked orbax leaves, so memory holds
about one layer's tensors (or the largest unstacked tensor, the embedding), never the model. All of
it goes to a temporary sibling of DST that is renamed at the end. `write_model_dir` is shared with
`init-from-base`.
"""
from __future__ import annotations

import json
import math
import pathlib

import numpy as np

from molmo_jax.weights.configs import config_to_json
from molmo_jax.weights.errors import WeightsError
from molmo_jax.weights.locate import CONFIG, PARAMS, TOKENIZER
from molmo_jax.weights.mappings import for_config
from molmo_jax.weights.params import param_paths
from molmo_jax.weights.pytorch import checked_reader, open_pytorch
from molmo_jax.weights.rules import check_tensors, convert_rule
from molmo_jax.weights.stream_orbax import Group, StreamedLeaf, write_params
from molmo_jax.weights.writing import Progress, Summary, atomic_output, check_destination, copy_tokenizer

MESH_FILE = "mesh.json"


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
    if any(size < 1 for size in axes.values()):
        raise WeightsError(f"--mesh {axes}: give every axis an explicit size (no -1) to lay out the stored arrays")
    mesh = jax.sharding.AbstractMesh(tuple(axes.get(a, 1) for a in sharding.MESH_AXES), sharding.MESH_AXES)
    specs = sharding.param_specs(nnx.state(abstract_model(cfg), nnx.Param), mesh)
    return {tuple(str(k) for k in path): var.get_value() for path, var in nnx.to_flat_state(specs)}


def rule_group(rule, read) -> Group:
    """The rule's output, produced layer by layer (or whole) when the writer asks for it."""
    return Group(lambda i: convert_rule(rule, i, read), rule.n_layers)


def plan_leaves(cfg, rules, read, dtype, write_shapes=None) -> list[StreamedLeaf]:
    shapes = param_paths(cfg)
    leaves = []
    for rule in rules:
        group = rule_group(rule, read)
        leaves += [StreamedLeaf(p, shapes[p], np.dtype(dtype), group, (write_shapes or {}).get(p)) for p in rule.paths]
    return leaves


def write_model_dir(dst, cfg, leaves, summary: Summary, *, tokenizer=None, fallback_tokenizer=None, progress=None,
                    overwrite=False, extra_files: dict | None = None) -> None:
    """Write `leaves` (streamed) and `cfg` as a model directory at `dst`, atomically. Tokenizer files
    come from `tokenizer` (required) or else `fallback_tokenizer` (if it has any)."""
    with atomic_output(dst, overwrite) as tmp:
        tmp.mkdir()
        (tmp / CONFIG).write_text(config_to_json(cfg))
        write_params(tmp / PARAMS, leaves, Progress(summary, progress, sum(leaf.nbytes for leaf in leaves)))
        if tokenizer is not None:
            copy_tokenizer(tokenizer, tmp / TOKENIZER)
        elif fallback_tokenizer is not None and copy_tokenizer(fallback_tokenizer, tmp / TOKENIZER, required=False):
            summary.notes.append(f"tokenizer files copied from {fallback_tokenizer}")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)


def import_checkpoint(src, dst, *, config=None, dtype=None, mesh=None, partition_specs=None,
                      tokenizer=None, overwrite=False, progress=None) -> Summary:
    """Convert the PyTorch checkpoint `src` (directory or state dict file) into the model directory
    `dst`. `config`: a config.json or preset name, for a bare state dict. `dtype`: cast (default: the
    checkpoint's). `mesh` ({axis: size}) aligns the stored chunks with that mesh's parameter shardings
    (`partition_specs`, {path: spec}, overrides the project's sharding rules). `progress(n_bytes,
    total_bytes)` is called as tensors are written."""
    dst = check_destination(dst, overwrite)
    cfg, tensors = open_pytorch(src, config)
    mapping = for_config(cfg)
    rules = mapping.rules(cfg, tensors)
    cfg.param_dtype = check_tensors(rules, cfg, tensors, dtype, prefix=mapping.PREFIX, where=str(src))
    write_shapes = specs = None
    if mesh is not None:
        specs = partition_specs if partition_specs is not None else mesh_partition_specs(cfg, mesh)
        write_shapes = {p: shard_shape(s, specs.get(p, ()), mesh, ".".join(p)) for p, s in param_paths(cfg).items()}
    leaves = plan_leaves(cfg, rules, checked_reader(tensors, mapping.PREFIX), cfg.param_dtype, write_shapes)
    summary = Summary("import", str(src), str(dst), cfg.name, n_tensors=len(leaves),
                      n_params=sum(leaf.size for leaf in leaves), dtype=cfg.param_dtype, files=1)
    extra = None
    if mesh is not None:
        layout = {"axes": mesh, "partition_specs": {".".join(p): _spec_json(s) for p, s in specs.items()}}
        extra = {MESH_FILE: json.dumps(layout, indent=1)}
    write_model_dir(dst, cfg, leaves, summary, tokenizer=tokenizer,
                    fallback_tokenizer=src if pathlib.Path(src).is_dir() else None, progress=progress,
                    overwrite=overwrite, extra_files=extra)
    return summary.finish()


def _spec_json(spec):
    return [list(e) if isinstance(e, tuple) else e for e in tuple(spec)]
