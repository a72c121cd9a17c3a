"""Ahead-of-time compilation of the training step for TPU slices (or simulated CPU devices).

`compile_report(config, topology, mesh_spec)` lowers the real jitted training step
(`trainer.build_step`) on ShapeDtypeStructs that carry the step's shardings, compiles it for
compile-only devices of a TPU topology (libtpu does this on a CPU host), and reports per device:
memory (parameters, optimizer state, temporaries, peak) against the chip's HBM, FLOPs, collective
traffic, whether it fits (the compiler's RESOURCE_EXHAUSTED is caught) and a roofline step time.

Slices, their chips and their meshes: `molmo_jax.analysis.topology`.

FLOPs, HBM traffic and collective bytes are read from the compiled HLO text (`molmo_jax.analysis.hlo_stats`),
with every loop body weighted by its trip count: XLA's own cost analysis counts each while-loop body
once, and every layer stack here is a `lax.scan`.
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
import re
import time
from importlib.metadata import PackageNotFoundError, version

import jax
import jax.numpy as jnp
import ml_collections

from molmo_jax import config as config_lib
from molmo_jax.analysis import flops as flops_lib
from molmo_jax import sharding
from molmo_jax import trainer
from molmo_jax.analysis.hlo_stats import analyse_hlo
# tools.aot reaches the slice helpers through this module (it imports it once jax is configured).
from molmo_jax.analysis.topology import CHIPS, Chip, Topology, build_mesh, parse_topology, topology_devices  # noqa: F401

def crops_per_example(config) -> int:
    data = config.get("data") or {}
    return 1 + int(data.get("max_crops", config.model.image.max_crops))  # global view + tiles


def abstract_batch(config, mesh) -> dict:
    """The training batch as ShapeDtypeStructs sharded over the batch axes."""
    cfg = config.model
    b, t, c = config.batch_size, config.seq_len, crops_per_example(config)
    ph, pw = config_lib.patches_per_side(cfg)
    pixels = cfg.vit.patch_size ** 2 * 3
    if cfg.get("family", "molmo") == "molmo2":  # the layout of preprocess.molmo2_example
        from molmo_jax.inference_molmo2 import media_settings
        from molmo_jax.preprocess.molmo2_example import batch_layout

        data = config.get("data") or {}
        pack = int(data.get("pack_records", 1))  # a packed row has room for `pack` records' views
        lay = batch_layout(*media_settings(cfg, c - 1), int(data.get("max_images", 1)) * pack,
                           int(data.get("max_frames", 0)) * pack)
        names = ("input_ids", "target_tokens", "position_ids", "mm_token_type_ids")
        names += ("subsegment_ids",) if pack > 1 else ()
        text = {k: ((b, t), jnp.int32) for k in names}
        shapes = dict(text, loss_masks=((b, t), jnp.float32),
                      pixel_values=((b * lay.crops, lay.patches, lay.pixels), jnp.float32),
                      image_token_pooling=((b * lay.rows, lay.window), jnp.int32))
        return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding.batch_sharding(mesh, len(s), s[0]))
                for k, (s, d) in shapes.items()}
    shapes = dict(input_ids=((b, t), jnp.int32), target_tokens=((b, t), jnp.int32),
                  position_ids=((b, t), jnp.int32), subsegment_ids=((b, t), jnp.int32), loss_masks=((b, t), jnp.float32),
                  images=((b, c, ph * pw, pixels), jnp.float32), image_masks=((b, c, ph * pw), jnp.float32),
                  image_input_idx=((b, c, config_lib.tokens_per_crop(cfg)), jnp.int32))
    return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding.batch_sharding(mesh, len(s), b))
            for k, (s, d) in shapes.items()}


def bytes_per_device(tree, dtype=None) -> int:
    """Exact bytes of one device's shards of a tree of sharded ShapeDtypeStructs (in `dtype` if
    given); uneven splits never happen here because odd dimensions are replicated."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(dtype or leaf.dtype).itemsize
    return total


def hbm_budget(topo: Topology, override_bytes: float | None = None) -> float:
    if override_bytes:
        return float(override_bytes)
    if topo.is_tpu:
        return topo.chip.hbm_bytes
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / topo.n_devices


_OOM = re.compile(r"required[^(]*\(([\d.]+)([KMGT])\)[^(]*available[^(]*\(([\d.]+)([KMGT])\)")
_UNITS = dict(K=2 ** 10, M=2 ** 20, G=2 ** 30, T=2 ** 40)


def _compile(lowered):
    """(compiled or None, the compiler's out-of-memory message or None)."""
    try:
        return lowered.compile(), None
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None, str(e).strip().splitlines()[0][:500]


def memory_fields(compiled, oom: str | None, fixed_bytes: int, budget: float) -> dict:
    """Peak = arguments + outputs not aliased to arguments + temporaries + code (per device). It
    fits if the compiler accepted it and the peak is within `budget`: a TPU compiler rejects a
    program whose temporaries alone exceed HBM, but accepts some whose arguments then do not fit."""
    if compiled is None:
        m = _OOM.search(oom or "")
        required = float(m.group(1)) * _UNITS[m.group(2)] if m else None
        available = float(m.group(3)) * _UNITS[m.group(4)] if m else None
        peak = fixed_bytes + required if required else None
        return dict(fits=False, compiler_accepted=False, peak_bytes_per_device=peak, temp_bytes_per_device=required,
                    compiler_hbm_bytes=available, oom_message=oom)
    ma = compiled.memory_analysis()
    peak = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
            + ma.temp_size_in_bytes + ma.generated_code_size_in_bytes)
    return dict(fits=peak <= budget, compiler_accepted=True, peak_bytes_per_device=peak,
                temp_bytes_per_device=ma.temp_size_in_bytes, argument_bytes_per_device=ma.argument_size_in_bytes,
                output_bytes_per_device=ma.output_size_in_bytes - ma.alias_size_in_bytes,
                code_bytes_per_device=ma.generated_code_size_in_bytes, oom_message=None)


def roofline(report: dict, chip: Chip | None) -> dict:
    """step >= max(FLOPs / peak, HBM bytes / HBM bandwidth, ICI bytes / ICI bandwidth), per device.
    Assumes the three overlap perfectly and run at peak; MFU = model FLOPs / (step x peak)."""
    if chip is None or report.get("flops_per_device") is None:
        return {}
    times = dict(compute=report["flops_per_device"] / chip.peak_flops,
                 memory=report["hbm_traffic_bytes_per_device"] / chip.hbm_bw,
                 ici=report["ici_bytes_per_device"] / chip.ici_bw)
    bound = max(times, key=times.get)
    step = times[bound]
    return dict(compute_s=times["compute"], hbm_s=times["memory"], ici_s=times["ici"], step_s=step,
                bound=bound, mfu=report["model_flops_per_device"] / (step * chip.peak_flops))


def estimate_fields(r: dict) -> dict:
    """The roofline estimate at the top level of a report (tools.aot --json): est_step_seconds,
    est_mfu, bound; None where there is no chip to estimate for (cpu-N) or nothing was compiled."""
    roof = r.get("roofline") or {}
    return dict(est_step_seconds=roof.get("step_s"), est_mfu=roof.get("mfu"), bound=roof.get("bound"))


def measure(lowered, n_devices: int, fixed_bytes: int, budget: float) -> dict:
    """Compile a lowered program and read memory, FLOPs and collectives per device."""
    t0, c0 = time.perf_counter(), time.process_time()
    compiled, oom = _compile(lowered)
    out = dict(n_devices=n_devices, compile_seconds=time.perf_counter() - t0,
               compile_cpu_seconds=time.process_time() - c0)
    out.update(memory_fields(compiled, oom, fixed_bytes, budget))
    out.update(flops_per_device=None, xla_cost_flops_per_device=None, hbm_traffic_bytes_per_device=None,
               ici_bytes_per_device=None, collectives={})
    if compiled is not None:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out["xla_cost_flops_per_device"] = float((cost or {}).get("flops", 0.0))
        out["hlo_text"] = compiled.as_text()
        out.update(hlo_fields(out["hlo_text"], n_devices))
    return out


def program_key(lowered, topo: Topology, layout, budget: float, fixed_bytes: int) -> str:
    """What a compile depends on: the lowered program itself (so that an edit which leaves the
    step unchanged, an init or a docstring, keeps its cached compile, and any edit that changes it
    does not), the device layout, the memory budget, jax and libtpu."""
    try:
        libtpu = version("libtpu")
    except PackageNotFoundError:
        libtpu = "none"
    digest = hashlib.sha256(f"{jax.__version__} {libtpu} {topo.name} {layout} {budget} {fixed_bytes}\n".encode())
    digest.update(lowered.as_text().encode())
    return digest.hexdigest()[:24]


def hlo_fields(hlo_text: str, n_devices: int) -> dict:
    stats = analyse_hlo(hlo_text, n_devices)
    return dict(flops_per_device=stats.flops, hbm_traffic_bytes_per_device=stats.hbm_bytes,
                hbm_bytes_by_category=stats.hbm_by_category, ici_bytes_per_device=stats.link_bytes,
                collectives=stats.collectives, unknown_trip_counts=stats.unknown_trip_counts)


def compile_report(config, topo: Topology, mesh_spec: dict | None = None, devices=None,
                   hbm_bytes: float | None = None, inference: bool = False, compile: bool = True,
                   keep_hlo: bool = False, cache=None) -> dict:
    """Compile the training step of `config` for `topo` and report per device (see module doc).
    `hbm_bytes` overrides the per-device memory budget; with `inference`, the prefill and one decode
    step are compiled too (report["inference"]); `compile=False` stops after the exact state sizes;
    `keep_hlo` keeps the compiled HLO text in report["hlo_text"]. `cache` (an object with
    get(key) -> dict | None and put(key, dict)) holds `measure` results under `program_key`."""
    mesh_spec = dict(mesh_spec if mesh_spec is not None else config.mesh)
    devices = devices if devices is not None else topology_devices(topo)
    mesh, layout = build_mesh(mesh_spec, devices, topo)
    b, t, accum = config.batch_size, config.seq_len, config.grad_accum_steps
    if accum < 1 or b % accum:
        raise ValueError(f"batch_size {b} is not divisible by grad_accum_steps {accum}")
    batch_shards = math.prod(mesh.shape[a] for a in sharding.BATCH)
    setup = trainer.build_step(config, mesh)
    params, opt_state = setup.abstract_params(), setup.abstract_opt_state()
    batch = abstract_batch(config, mesh)
    budget = hbm_budget(topo, hbm_bytes)
    crops = crops_per_example(config)
    report = dict(
        model=config.model.get("name", "?"), stage=config.get("stage", "?"), topology=topo.name,
        device_kind=devices[0].device_kind, n_devices=len(devices),
        mesh={k: int(v) for k, v in mesh.shape.items()}, mesh_layout=layout, remat=config.model.remat,
        batch_size=b, grad_accum_steps=accum, seq_len=t, crops=crops, max_loss_tokens=config.max_loss_tokens,
        micro_batch_per_device=b / accum / batch_shards, batch_replicated=(b // accum) % batch_shards != 0,
        param_count=sum(math.prod(p.shape) for p in jax.tree.leaves(params)),
        param_bytes_per_device=bytes_per_device(params), opt_state_bytes_per_device=bytes_per_device(opt_state),
        grad_accum_dtype=config.get("grad_accum_dtype", "float32"),
        grad_bytes_per_device=bytes_per_device(params, config.get("grad_accum_dtype", "float32")),  # the accumulator
        batch_bytes_per_device=bytes_per_device(batch), hbm_bytes_per_device=budget,
        model_flops_per_device=flops_lib.train_step_flops(config.model, b, t, crops) / len(devices))
    if not compile:
        return report
    with sharding.use_mesh(mesh):
        lowered = setup.step.lower(params, opt_state, batch, jax.ShapeDtypeStruct((), jnp.int32))
        fixed = sum(report[k] for k in ("param_bytes_per_device", "opt_state_bytes_per_device",
                                        "batch_bytes_per_device"))
        key = program_key(lowered, topo, layout, budget, fixed) if cache is not None else None
        measured = cache.get(key) if cache is not None else None
        if measured is None:
            measured = measure(lowered, len(devices), fixed, budget)
            if cache is not None:
                cache.put(key, measured)
        report.update(measured)
        report["roofline"] = roofline(report, topo.chip)
        if inference:
            report["inference"] = inference_reports(config, setup, mesh, params, batch, budget, topo)
    if not keep_hlo:
        report.pop("hlo_text", None)
    return report


def state_lower_bound(report: dict) -> int:
    """Bytes every step holds at least: parameters, optimizer state, the float32 gradient
    accumulator (one per parameter) and the batch."""
    return (report["param_bytes_per_device"] + report["opt_state_bytes_per_device"]
            + report["grad_bytes_per_device"] + report["batch_bytes_per_device"])


def variant(config, mesh: dict, micro_per_device: int, remat: str):
    """A copy of `config` with this mesh, remat policy and grad accumulation such that every device
    sees `micro_per_device` examples per micro-batch; None if the batch does not split that way."""
    shards = math.prod(mesh.get(a, 1) for a in sharding.BATCH)
    per_micro = shards * micro_per_device
    if config.batch_size % per_micro:
        return None
    c = copy.deepcopy(config)
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, expert=1) | mesh)
    c.grad_accum_steps = config.batch_size // per_micro
    c.model.remat = remat
    return c


def sweep_grid(config, n_devices: int, tensors=(1, 2, 4, 8), micro=(1, 2), remats=("full", "dots"),
               experts=(1,)) -> list:
    """Variants over meshes (fsdp = the rest of the devices), examples per device per micro-batch
    and remat policies; combinations that do not divide are left out."""
    out = []
    for e in experts:
        for tp in tensors:
            if n_devices % (tp * e):
                continue
            mesh = dict(fsdp=n_devices // (tp * e), tensor=tp, expert=e)
            for m in micro:
                for remat in remats:
                    c = variant(config, mesh, m, remat)
                    if c is not None:
                        out.append(c)
    return out


def rank(reports: list) -> list:
    """Fitting reports first, fastest roofline step first; then the rest by peak memory."""
    def key(r):
        step = (r.get("roofline") or {}).get("step_s")
        return (not r["fits"], step if (r["fits"] and step is not None) else float("inf"),
                r.get("peak_bytes_per_device") or float("inf"))
    return sorted(reports, key=key)


INFERENCE_NEW_TOKENS = 64  # the KV cache holds the prompt plus this many tokens (rounded up)


def inference_reports(config, setup, mesh, params, batch, budget: float, topo: Topology) -> dict:
    """Prefill of a [batch_size, seq_len] prompt with images, and one decode step on its cache, as
    `molmo_jax.generate` runs them (decoder blocks unrolled per layer, cache [B, kv_heads, S, hd])."""
    from flax import nnx

    from molmo_jax import generate
    cfg = config.model
    b, t, n_layers = config.batch_size, config.seq_len, cfg.llm.n_layers
    cache_len = generate.cache_length(t, INFERENCE_NEW_TOKENS)

    def modules(p):
        state = jax.tree.map(lambda x: x, setup.abstract)
        nnx.replace_by_pure_dict(state, p)
        model = nnx.merge(setup.graphdef, state)
        block_def, stacked = nnx.split(model.llm.blocks)
        return model, [nnx.merge(block_def, jax.tree.map(lambda a, i=i: a[i], stacked)) for i in range(n_layers)]

    def prefill(p, prompt):
        return generate.prefill(*modules(p), prompt, cache_len)

    def decode(p, tokens, positions, cache, slots_valid):
        return generate.decode_step(*modules(p), tokens, positions, cache, slots_valid, t)

    def sds(shape, dtype, names):
        spec = sharding.spec_for(names, shape, mesh)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(mesh, spec))

    kv = (b, cfg.llm.n_kv_heads, cache_len, cfg.llm.head_dim)
    cache = [generate.KVCache(*(sds(kv, jnp.dtype(cfg.dtype), generate.CACHE_AXES) for _ in range(2)))
             for _ in range(n_layers)]
    step_args = (sds((b,), jnp.int32, ("batch",)), sds((b,), jnp.int32, ("batch",)), cache,
                 sds((b, cache_len), jnp.bool_, ("batch", None)))
    prompt = {k: v for k, v in batch.items() if k in ("input_ids", "images", "image_masks", "image_input_idx")}
    # Analytic FLOPs: the prefill's head runs at one position per row; decode leaves out the
    # attention over the cache (small next to the matmuls at these lengths).
    model_flops = dict(prefill=flops_lib.forward_flops(cfg, b, t, crops_per_example(config), logit_positions=1),
                       decode=flops_lib.llm_flops(cfg, b, 1))
    out = dict(cache_len=cache_len, cache_bytes_per_device=bytes_per_device(cache))
    for name, fn, args in (("prefill", prefill, (params, prompt)), ("decode", decode, (params,) + step_args)):
        lowered = jax.jit(fn).lower(*args)
        out[name] = measure(lowered, mesh.size, bytes_per_device(args), budget)
        out[name].pop("hlo_text", None)
        out[name]["model_flops_per_device"] = model_flops[name] / mesh.size
        out[name]["roofline"] = roofline(out[name], topo.chip)
    return out
