"""Searching training-step variants for a TPU slice: the smallest slice that fits, and the fastest
fitting variant on a slice.

A variant is a mesh split (tensor / fsdp / expert), examples per device per micro-batch (which sets
`grad_accum_steps` at the config's global batch), a remat policy and the gradient accumulator's
dtype. `smallest_fit` walks up the slice sizes with the leanest variant; `fastest_variant` then
improves one knob at a time from a fitting report (coordinate descent), keeping a move only if the
step still fits and its roofline estimate is faster. Compiles are cached on disk by the lowered
program (`CachedCompiler`), so a search that is run again, or stopped and restarted, only compiles
what it has not compiled before.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import time

from molmo_jax import sharding
from molmo_jax.analysis import aot

# Slices the table walks, smallest first (v5p counts TensorCores: 2 per chip).
SLICES = {"v5p": [f"v5p-{2 * chips}" for chips in (4, 8, 16, 32, 64, 128, 256, 512, 1024)],
          "v5e": [f"v5e-{chips}" for chips in (1, 4, 8, 16, 32, 64, 128, 256)]}
MICRO = (1, 2, 4, 8)               # examples per device per micro-batch (the original's recipe: 4)
REMATS = ("full", "dots", "offload", "none")
# The original reduces gradients in float32 (docs/architecture.md#optimiser); the bfloat16 accumulator
# is a knob of its own, measured apart, never chosen by the search.
ACCUM_DTYPES = ("float32",)


class NotCached(Exception):
    """`cached_only`: this compile is not in the cache."""


class CachedCompiler:
    """compile_report with a disk cache keyed by the lowered program (`aot.program_key`): lowering
    takes seconds, compiling minutes. Each entry keeps the compiled HLO (gzip), so the HLO analysis
    is re-run on every read and stays current without compiling again. A compile that raises is
    reported (`error`), not raised: one failure must not end an hours-long search."""

    def __init__(self, cache_dir: str | None, cached_only: bool = False, log=None):
        self.dir, self.cached_only, self.devices, self.log = cache_dir, cached_only, {}, log or (lambda m: None)
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)

    def get(self, key: str) -> dict | None:
        path = os.path.join(self.dir, key) if self.dir else None
        if path and os.path.exists(path + ".json"):
            with open(path + ".json") as f:
                measured = json.load(f)
            if os.path.exists(path + ".hlo.gz"):
                with gzip.open(path + ".hlo.gz", "rt") as f:
                    measured["hlo_text"] = f.read()
                measured.update(aot.hlo_fields(measured["hlo_text"], measured["n_devices"]))
            return measured
        if self.cached_only:
            raise NotCached(key)
        return None

    def put(self, key: str, measured: dict):
        if not self.dir:
            return
        path = os.path.join(self.dir, key)
        if measured.get("hlo_text"):
            with gzip.open(path + ".hlo.gz", "wt") as f:
                f.write(measured["hlo_text"])
        kept = {k: v for k, v in measured.items() if k != "hlo_text"}
        with open(path + ".json.tmp", "w") as f:
            json.dump(kept, f, default=float)
        os.replace(path + ".json.tmp", path + ".json")  # the .json last: an entry is whole or absent

    def topology_devices(self, name: str):
        if name not in self.devices:
            self.devices[name] = aot.topology_devices(aot.parse_topology(name))
        return self.devices[name]

    def __call__(self, config, topology: str) -> dict:
        topo = aot.parse_topology(topology)
        start = time.perf_counter()
        try:
            report = aot.compile_report(config, topo, devices=self.topology_devices(topology), cache=self)
        except NotCached:
            raise
        except Exception as e:  # noqa: BLE001 - reported as a variant that does not fit
            report = dict(model=config.model.name, stage=config.stage, topology=topology, mesh=dict(config.mesh),
                          grad_accum_steps=config.grad_accum_steps, remat=config.model.remat, fits=False,
                          error=f"{type(e).__name__}: {str(e)[:300]}", hbm_bytes_per_device=topo.chip.hbm_bytes,
                          compile_seconds=time.perf_counter() - start, compile_cpu_seconds=float("nan"))
        report["variant"] = describe(config)
        return report


def describe(config) -> dict:
    """The knobs of a variant, as `variant` takes them (and as docs/scaling.json records them)."""
    mesh = {k: int(v) for k, v in dict(config.mesh).items()}
    shards = math.prod(max(mesh.get(a, 1), 1) for a in sharding.BATCH)
    return dict(mesh={k: v for k, v in mesh.items() if v > 1} or {"fsdp": 1},
                micro=config.batch_size // config.grad_accum_steps // shards, remat=config.model.remat,
                grad_accum_steps=int(config.grad_accum_steps),
                grad_accum_dtype=config.get("grad_accum_dtype", "float32"))


def from_variant(config, v: dict):
    """The config of a recorded variant (a `describe` dict); ValueError if the batch no longer splits."""
    c = variant(config, dict(v["mesh"]), int(v["micro"]), v["remat"], v.get("grad_accum_dtype", "float32"))
    if c is None:
        raise ValueError(f"variant {v} does not split batch_size {config.batch_size}")
    return c


def variant(config, mesh: dict, micro: int, remat: str, accum_dtype: str = "float32"):
    """`aot.variant` plus the accumulator dtype; None if the batch does not split that way."""
    c = aot.variant(config, mesh, micro, remat)
    if c is not None:
        c.grad_accum_dtype = accum_dtype
    return c


def flags(v: dict) -> list:
    """The tools.aot / tools.train flags that select variant `v` (a `describe` dict)."""
    mesh = ",".join(f"{k}={n}" for k, n in v["mesh"].items())
    return [f"--mesh={mesh}", f"--config.grad_accum_steps={v['grad_accum_steps']}",
            f"--config.model.remat={v['remat']}", f"--config.grad_accum_dtype={v['grad_accum_dtype']}"]


def _moe(config) -> bool:
    return bool(config.model.llm.get("moe_num_experts", 0))


def tensor_choices(config, n_devices: int) -> list:
    """Tensor-parallel sizes that split heads, MLP and vocabulary evenly, largest first (a larger
    one shrinks the per-device share of weights, attention and logits inside a micro-batch)."""
    llm = config.model.llm
    return [t for t in (16, 8, 4, 2, 1) if t <= n_devices and not (llm.n_heads % t or llm.mlp_dim % t
                                                                     or llm.embedding_size % t)]


def lean_variant(config, n_devices: int, remat: str = "full"):
    """The variant that needs least memory per chip: the largest even tensor split, FSDP over the
    rest, one example per device per micro-batch, full remat (None if the batch does not split)."""
    tensor = tensor_choices(config, n_devices)[0]
    return variant(config, dict(fsdp=n_devices // tensor, tensor=tensor), 1, remat)


def smallest_fit(config, family: str, run, log) -> tuple:
    """Walk up `SLICES[family]`: skip a slice whose exact share of the training state exceeds HBM,
    else compile the leanest variant. Returns (the report on the first slice where it fits or None,
    every report made)."""
    tried = []
    for name in SLICES[family]:
        topo = aot.parse_topology(name)
        lean = lean_variant(config, topo.n_devices)
        if lean is None:
            continue
        try:
            devices = run.topology_devices(name)
        except Exception as e:  # noqa: BLE001 - an unsupported slice shape: say so and go on
            log(f"  {name}: no compile-only devices ({str(e).splitlines()[0][:200]})")
            continue
        plan = aot.compile_report(lean, topo, devices=devices, compile=False)
        if aot.state_lower_bound(plan) > topo.chip.hbm_bytes:
            log(f"  {name}: the training state alone needs {aot.state_lower_bound(plan) / 2 ** 30:.1f} GiB per chip")
            continue
        report = run(lean, name)
        tried.append(report)
        log(f"  {name} {describe(lean)}: {verdict(report)}")
        if report["fits"]:
            return report, tried
    return None, tried


def step_seconds(r: dict) -> float:
    roof = r.get("roofline") or {}
    return roof["step_s"] if r.get("fits") and roof.get("step_s") is not None else float("inf")


def verdict(r: dict) -> str:
    if r.get("fits"):
        roof = r.get("roofline") or {}
        return (f"fits, est. {roof.get('step_s', float('nan')):.2f} s ({roof.get('bound', '?')}), "
                f"MFU {roof.get('mfu', float('nan')):.1%}, compiled in {r['compile_seconds']:.0f} s")
    return f"does not fit ({(r.get('error') or r.get('oom_message') or 'over HBM')[:160]})"


def _neighbours(config, v: dict, n_devices: int, knob: str) -> list:
    """Variants one step away from `v` along `knob` (examples per micro-batch, remat, mesh split)."""
    mesh, micro, remat = dict(v["mesh"]), v["micro"], v["remat"]
    tensor, expert = mesh.get("tensor", 1), mesh.get("expert", 1)
    out = []
    if knob == "micro":
        out += [(mesh, m, remat) for m in MICRO if m > micro][:1]
    elif knob == "remat":
        for r in REMATS:
            if r != remat:
                out += [(mesh, micro, r)] + ([(mesh, micro // 2, r)] if micro > 1 else [])
    elif knob == "mesh":
        choices = tensor_choices(config, n_devices)
        # A MoE also tries its experts on FSDP alone: split over tensor, every tensor device runs the
        # token sort and unsort gathers of the whole group (docs/scaling.md, mixture of experts).
        for t in (tensor // 2, tensor * 2) + ((1,) if _moe(config) and tensor > 2 else ()):
            if t in choices and n_devices % (t * expert) == 0:
                out.append((dict(fsdp=n_devices // (t * expert), tensor=t, expert=expert), micro, remat))
        if _moe(config):
            experts = config.model.llm.moe_num_experts
            for e in ((8,) if expert == 1 else (expert // 2, expert * 2)):
                if 1 <= e <= experts and experts % e == 0 and n_devices % (tensor * e) == 0:
                    out.append((dict(fsdp=n_devices // (tensor * e), tensor=tensor, expert=e), micro, remat))
    return [c for c in (variant(config, {k: n for k, n in m.items() if n > 1} or dict(fsdp=1), mi, r,
                                v["grad_accum_dtype"]) for m, mi, r in out) if c is not None]


def fastest_variant(config, start: dict, run, log, max_rounds: int = 2) -> tuple:
    """From the fitting report `start`, move one knob at a time (examples per micro-batch while it
    helps, then remat, then the mesh split) and keep a move when it fits and is faster; repeat while
    a round improves. Returns (best report, every report made). Under `cached_only` a variant not
    compiled yet is skipped."""
    name = start["topology"]
    n = aot.parse_topology(name).n_devices
    best, tried, seen = start, [start], {json.dumps(start.get("variant"), sort_keys=True)}
    for _ in range(max_rounds):
        improved = False
        # A MoE's split decides most (its lean start, the largest tensor split, is its slowest): mesh first.
        for knob in (("mesh",) if _moe(config) else ()) + ("micro", "remat", "mesh", "micro"):
            while True:
                moved = False
                for c in _neighbours(config, best["variant"], n, knob):
                    key = json.dumps(describe(c), sort_keys=True)
                    if key in seen:
                        continue
                    seen.add(key)
                    try:
                        r = run(c, name)
                    except NotCached:
                        continue
                    tried.append(r)
                    log(f"  {name} {describe(c)}: {verdict(r)}")
                    if step_seconds(r) < step_seconds(best):
                        best, moved, improved = r, True, True
                if not (moved and knob == "micro"):
                    break
        if not improved:
            break
    return best, tried


def record(r: dict | None) -> dict | None:
    """A report as docs/scaling.json keeps it: the variant, its flags and its figures."""
    if r is None:
        return None
    roof = r.get("roofline") or {}
    v = r.get("variant") or {}
    keep = ("topology", "fits", "peak_bytes_per_device", "hbm_bytes_per_device", "flops_per_device",
            "model_flops_per_device", "hbm_traffic_bytes_per_device", "hbm_bytes_by_category",
            "ici_bytes_per_device", "compile_seconds", "compile_cpu_seconds", "error", "oom_message")
    out = {k: r.get(k) for k in keep if r.get(k) is not None}
    out.update(variant=v, flags=flags(v) if v.get("mesh") else [], est_step_seconds=roof.get("step_s"),
               est_mfu=roof.get("mfu"), bound=roof.get("bound"))
    return out


def recorded_variant(scaling: dict, config_name: str, topology: str) -> dict:
    """The fastest fitting variant docs/scaling.json records for (config, slice), as a `describe`
    dict; ValueError naming what is recorded when there is none."""
    cells = scaling.get("targets", []) + scaling.get("cells", [])
    for cell in cells:
        for key in ("fastest", "smallest"):
            r = cell.get(key)
            if cell.get("config") == config_name and r and r.get("topology") == topology and r.get("fits"):
                return r["variant"]
    known = sorted({f"{c['config']} on {c[k]['topology']}" for c in cells for k in ("fastest", "smallest")
                    if c.get(k) and c[k].get("fits")})
    raise ValueError(f"docs/scaling.json records no fitting variant of {config_name} on {topology}; "
                     f"recorded: {', '.join(known) or 'none'}")
