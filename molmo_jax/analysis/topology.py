"""TPU slices as the compiler sees them: the chips' published numbers, slice names (v4-N and v5p-N
count TensorCores, 2 per chip, one JAX device per chip; v5e-N, alias v5litepod-N, and v6e-N count
chips; `KxNAME` is K slices joined over the data-centre network; `cpu-N` is N simulated host
devices), their compile-only devices (libtpu on a CPU host) and meshes laid out on them.
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax

from molmo_jax import sharding

GB = 1e9
GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip numbers published in the Cloud TPU documentation (v4 ICI: the TPU v4 paper's six
    links of about 50 GB/s per direction). `hbm_bytes` is what the compiler may use (libtpu
    0.0.42.1's "available HBM" in its out-of-memory message), a little under the published size."""
    name: str
    hbm_bytes: float        # usable HBM per chip
    peak_flops: float       # dense bf16 FLOP/s
    hbm_bw: float           # HBM bytes/s
    ici_bw: float           # ICI bytes/s leaving a chip, one direction, all links together
    torus_dims: int         # 3-D (v4, v5p) or 2-D (v5e, v6e) slice shapes
    cores_in_name: int      # v4-N / v5p-N count TensorCores (2 per chip); v5e-N / v6e-N count chips
    max_chips: int          # largest single slice
    libtpu_name: str


CHIPS = {
    # name          usable HBM   bf16 peak  HBM BW      ICI BW    dims ncore max   libtpu
    "v4": Chip("v4", 30.75 * GiB, 275e12, 1200 * GB, 300 * GB, 3, 2, 4096, "v4"),    # 32 GiB
    "v5e": Chip("v5e", 15.75 * GiB, 197e12, 819 * GB, 200 * GB, 2, 1, 256, "v5e"),   # 16 GiB
    "v5p": Chip("v5p", 95.74 * GiB, 459e12, 2765 * GB, 600 * GB, 3, 2, 6144, "v5p"),  # 95 GiB
    "v6e": Chip("v6e", 31.25 * GiB, 918e12, 1640 * GB, 400 * GB, 2, 1, 256, "v6e"),  # 32 GiB
}
ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str                   # as given, e.g. "2xv5p-256"
    chip: Chip | None           # None: simulated CPU devices
    num_slices: int
    chips_per_slice: int
    shape: tuple[int, ...]      # physical chip grid of one slice

    @property
    def n_devices(self) -> int:
        return self.num_slices * self.chips_per_slice

    @property
    def is_tpu(self) -> bool:
        return self.chip is not None


def slice_shape(chip: Chip, chips: int) -> tuple[int, ...]:
    """The usual slice shape for a chip count: v5p 4 -> 2x2x1, 64 -> 4x4x4, 128 -> 4x4x8;
    v5e 8 -> 2x4, 256 -> 16x16. Grown by doubling the smallest side (powers of two only)."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{chip.name}: {chips} chips is not a power of two; give one of 1, 2, 4, 8, ...")
    if chips > chip.max_chips:
        raise ValueError(f"{chip.name}: {chips} chips exceed the largest slice ({chip.max_chips} chips); "
                         f"use several slices, e.g. 2x{chip.name}-...")
    dims = [1] * chip.torus_dims
    while math.prod(dims) < chips:
        dims[dims.index(min(dims))] *= 2
    if chip.torus_dims == 3 and chips == 4:
        return (2, 2, 1)  # the 4-chip host board
    return tuple(sorted(dims))


_TOPOLOGY = re.compile(r"^(?:(\d+)x)?([a-z0-9]+)-(\d+)$")


def parse_topology(name: str) -> Topology:
    m = _TOPOLOGY.match(name.strip().lower())
    if not m:
        raise ValueError(f"topology {name!r}: expected NAME-N or KxNAME-N, e.g. v5p-128, v5e-256, "
                         f"2xv5p-256, cpu-8")
    slices, family, n = int(m.group(1) or 1), ALIASES.get(m.group(2), m.group(2)), int(m.group(3))
    if family == "cpu":
        if slices > 1:
            raise ValueError(f"topology {name!r}: simulated CPU devices have no slices; use cpu-N")
        return Topology(name, None, 1, n, (n,))
    if family not in CHIPS:
        raise ValueError(f"topology {name!r}: unknown TPU {m.group(2)!r}; choose one of "
                         f"{', '.join(sorted(CHIPS) + ['v5litepod', 'cpu'])}")
    chip = CHIPS[family]
    if n % chip.cores_in_name:
        raise ValueError(f"topology {name!r}: {family}-N counts TensorCores ({chip.cores_in_name} per chip), "
                         f"so N must be even")
    chips = n // chip.cores_in_name
    return Topology(name, chip, slices, chips, slice_shape(chip, chips))


def topology_devices(topo: Topology) -> list:
    """Compile-only TPU devices for the topology (needs libtpu), or the first N CPU devices."""
    if not topo.is_tpu:
        devices = jax.devices("cpu")
        if len(devices) < topo.n_devices:
            raise ValueError(f"topology {topo.name} needs {topo.n_devices} CPU devices but this process has "
                             f"{len(devices)}; set XLA_FLAGS=--xla_force_host_platform_device_count="
                             f"{topo.n_devices} before jax starts (tools.aot does this itself)")
        return devices[:topo.n_devices]
    try:
        import libtpu  # noqa: F401  (only to give a clear error)
    except ImportError as e:
        raise RuntimeError(f"compiling for {topo.name} needs libtpu (pip install 'molmo_jax[tpu]', i.e. "
                           f"libtpu==0.0.42.1); without it use --topology cpu-N") from e
    from jax.experimental import topologies
    kwargs = dict(num_slices=topo.num_slices) if topo.num_slices > 1 else {}
    if topo.chip.name == "v4":
        kwargs["chip_config_name"] = "megacore"  # one JAX device per chip, as on real v4 slices
    if topo.chips_per_slice < 4:  # smaller than the default 2x2 host
        kwargs["chips_per_host_bounds"] = tuple(topo.shape) + (1,) * (3 - len(topo.shape))
    grid = "x".join(str(d) for d in topo.shape)
    desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{topo.chip.libtpu_name}:{grid}", **kwargs)
    return list(desc.devices)


def build_mesh(spec: dict, devices: list, topo: Topology):
    """A mesh laid out on the physical topology when possible (mesh_utils), else in device order.
    Multi-slice: the slices form the outer part of the `data` axis (or of `fsdp` if data is 1)."""
    from jax.experimental import mesh_utils
    shape = sharding.mesh_shape(spec, len(devices))
    layout = "flat"
    ordered = devices
    if topo.is_tpu:
        try:
            if topo.num_slices > 1:
                axis = 0 if shape[0] % topo.num_slices == 0 else 1
                if shape[axis] % topo.num_slices:
                    raise ValueError("no data/fsdp axis divisible by the number of slices")
                dcn = [1] * len(shape)
                dcn[axis] = topo.num_slices
                ici = [s // d for s, d in zip(shape, dcn)]
                arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
            else:
                arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
            ordered, layout = list(arr.ravel()), "topology"
        except (ValueError, NotImplementedError, AssertionError) as e:
            layout = f"flat ({e})"
    mesh_spec = dict(zip(sharding.MESH_AXES, shape))
    return sharding.make_mesh(mesh_spec, devices=ordered), layout
