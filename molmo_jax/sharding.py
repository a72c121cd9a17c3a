"""Meshes and the one table from logical axis names to mesh axes.

Every parameter carries logical axis names (`nnx.Param(..., out_sharding=("embed", "mlp"))`).
`RULES` maps each logical name to a mesh axis (or a tuple of mesh axes, or None = replicated).
Activations are constrained at block boundaries through `constrain(x, names)`, which is a no-op
unless a mesh is active (`with use_mesh(mesh):`), so the same model code runs on one CPU.

Mesh axes:
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
  tensor  tensor parallelism: heads and MLP columns split
  expert  expert parallelism for MoE blocks (also carries batch for non-expert layers)
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH = ("data", "fsdp", "expert")  # the batch dimension is split over every non-model axis

RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    "expert_mlp": "tensor",
    "norm": None,
    "q_norm": "tensor",
    "kv_norm": "tensor",
    "vit_embed": "fsdp",
    "vit_heads": "tensor",
    "vit_mlp": "tensor",
    "vit_feature": "fsdp",
    "vit_pos": None,
    "patch": None,
    "lora_rank": None,
    # activations
    "batch": BATCH,
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_vocab": "tensor",
}

log = logging.getLogger(__name__)
_current: list[tuple[Mesh, dict]] = []


class MeshError(ValueError):
    """A mesh that cannot be built: names the axes and sizes and what is wrong with them."""


def parse_mesh(text: str) -> dict[str, int]:
    """'data=1,fsdp=-1,tensor=2' -> {"data": 1, "fsdp": -1, "tensor": 2}: the one parser of every
    tool's --mesh. Axes must be mesh axes, each given once, sizes >= 1 or -1 ("the rest of the
    devices", at most once); `mesh_shape` then checks the product against the device count."""
    spec: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in str(text).split(","))):
        axis, sep, value = (x.strip() for x in item.partition("="))
        if not sep or axis not in MESH_AXES:
            raise MeshError(f"--mesh {text!r}: expected AXIS=N pairs with AXIS one of {', '.join(MESH_AXES)}, "
                            f"got {item!r}")
        if axis in spec:
            raise MeshError(f"--mesh {text!r}: axis {axis!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise MeshError(f"--mesh {text!r}: size of {axis!r} must be an integer, got {value!r}") from None
        if size == 0 or size < -1:
            raise MeshError(f"--mesh {text!r}: size of {axis!r} must be >= 1 or -1 (the rest), got {size}")
        spec[axis] = size
    if not spec:
        raise MeshError(f"--mesh {text!r}: no axis given")
    check_mesh_spec(spec)
    return spec


def check_mesh_spec(spec: dict) -> None:
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"mesh {spec}: unknown axes {unknown} (the mesh axes are {', '.join(MESH_AXES)})")
    if list(spec.values()).count(-1) > 1:
        raise MeshError(f"mesh {spec}: at most one axis may be -1")
    bad = [a for a, s in spec.items() if not isinstance(s, int) or s == 0 or s < -1]
    if bad:
        raise MeshError(f"mesh {spec}: sizes must be >= 1 or -1 (the rest of the devices); {bad[0]} is not")


def mesh_shape(spec: dict, n_devices: int) -> tuple[int, ...]:
    """Resolve {axis: size} with at most one -1 ("the rest of the devices") against the device count."""
    check_mesh_spec({a: int(s) for a, s in spec.items()})
    sizes = [int(spec.get(a, 1)) for a in MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise MeshError(f"mesh {spec}: {n_devices} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"but {n_devices} are available")
    return tuple(sizes)


def make_mesh(spec: dict | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh with the four named axes; `spec` like {"data": 1, "fsdp": -1, "tensor": 1}."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(dict(spec or {"fsdp": -1}), len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)  # explicit axes break nnx gathers
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def spec_for(names: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None,
             rules: dict | None = None) -> P:
    """PartitionSpec for logical `names`. A dimension not divisible by its mesh axes, or a mesh axis
    already used by an earlier dimension, is replicated instead (so odd sizes never fail)."""
    rules = RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        axes = rules.get(name) if name is not None else None
        if axes is None:
            out.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
        axes = tuple(a for a in axes if a not in used)
        if shape is not None and mesh is not None and axes:
            size = math.prod(mesh.shape[a] for a in axes)
            if shape[i] % size:
                log.debug("replicating dim %d (%s, size %d) instead of splitting it %d ways",
                          i, name, shape[i], size)
                axes = ()
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def param_specs(state, mesh: Mesh | None = None, rules: dict | None = None):
    """PartitionSpec per parameter of an nnx State (abstract or concrete), from its logical names."""
    def one(var):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        return var.replace(spec_for(names, var.shape, mesh, rules))
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state, mesh: Mesh, rules: dict | None = None):
    specs = param_specs(state, mesh, rules)
    return jax.tree.map(lambda v: v.replace(NamedSharding(mesh, v.get_value())), specs,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: dict | None = None):
    """Activate `mesh` (jax.set_mesh) and the rules for `constrain`."""
    _current.append((mesh, RULES if rules is None else rules))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _current.pop()


def current_mesh() -> Mesh | None:
    """The mesh activated by `use_mesh`, or None."""
    return _current[-1][0] if _current else None


def platform() -> str:
    """The platform the program is built for: the active mesh's devices (compile-only TPU devices
    included), else jax's default backend."""
    mesh = current_mesh()
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def constrain(x, names: Sequence[str | None]):
    """with_sharding_constraint by logical names; identity when no mesh is active."""
    if not _current:
        return x
    mesh, rules = _current[-1]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(names, x.shape, mesh, rules)))


def gathered(x, names: Sequence[str | None]):
    """Constrain a parameter (already cast to the compute dtype) to its layout without the batch
    axes: under FSDP this all-gathers a layer's weights before its matmul, so the matmul contracts
    locally. Left to itself the partitioner may instead split the contraction over the fsdp shards
    and accumulate partial results into the whole output once per shard, which makes the matmul
    HBM-bound (docs/scaling.md#fsdp-weights-are-gathered-before-the-matmul). Identity without a mesh."""
    if not _current:
        return x
    mesh, rules = _current[-1]
    batch_axes = set(BATCH)
    local = {k: (tuple(a for a in ((v,) if isinstance(v, str) else v) if a not in batch_axes) or None)
             if v is not None else None for k, v in rules.items()}
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(names, x.shape, mesh, local)))


def batch_sharding(mesh: Mesh, ndim: int, batch_size: int | None = None) -> NamedSharding:
    """Sharding of a batch array: first dimension over the batch axes, the rest replicated."""
    spec = spec_for(("batch",) + (None,) * (ndim - 1), (batch_size or 0,) + (1,) * (ndim - 1)
                    if batch_size else None, mesh)
    return NamedSharding(mesh, spec)
