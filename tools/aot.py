"""Compile the training step for a TPU slice ahead of time and report what it costs, without TPUs.

  python -m tools.aot --config configs/molmo_72b_sft.py --topology v5p-512 [--mesh fsdp=-1,tensor=8]
      [--config.key=value ...] [--json] [--inference] [--hbm_gib G]
  python -m tools.aot --config configs/X.py --topology v5e-256 --sweep [--tensor 1,4,8 --micro 1,2 --remat full,dots]
  python -m tools.aot --config configs/X.py --topology v5p-128 --best [--json]   # the variant docs/scaling.json records
  python -m tools.aot --table [--cached_only] [--only REGEX]   # regenerate docs/scaling.md and docs/scaling.json

Topologies: v4-N and v5p-N (N TensorCores, 2 per chip), v5e-N / v5litepod-N and v6e-N (N chips),
KxNAME-N for K slices, cpu-N for N simulated CPU devices (no libtpu needed). TPU compiles need
libtpu (`pip install -e '.[tpu]'`). See molmo_jax/analysis/aot.py for what is measured and docs/scaling.md
for the roofline formula and its limits.
"""
import json
import os
import sys

# Before jax is imported (the config files import it): this process only compiles. It never runs
# on a TPU, so it needs neither the TPU runtime nor libtpu's single-process lock file.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from molmo_jax import recipe  # noqa: E402
from molmo_jax.analysis.table import gib, mesh_text  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/<model>_<stage>.py)")
_TOPOLOGY = flags.DEFINE_string("topology", "cpu-8", "v5p-128, v5e-256, 2xv5p-256, v4-64, v6e-64, cpu-8, ...")
_MESH = flags.DEFINE_string("mesh", None, "mesh axes, e.g. fsdp=-1,tensor=8 (default: the config's mesh)")
_JSON = flags.DEFINE_bool("json", False, "print one JSON object instead of the table")
_INFERENCE = flags.DEFINE_bool("inference", False, "also compile the prefill and one decode step")
_HLO_OUT = flags.DEFINE_string("hlo-out", None, "write the compiled HLO text of the training step to this file")
_HBM_GIB = flags.DEFINE_float("hbm_gib", None, "per-device memory budget in GiB (default: the chip's usable "
                              "HBM; CPU: host memory / devices)")
_SWEEP = flags.DEFINE_bool("sweep", False, "compile a grid of meshes x per-device batch x remat and rank it")
_TENSOR = flags.DEFINE_list("tensor", ["1", "2", "4", "8"], "sweep: tensor-parallel sizes (fsdp = the rest)")
_MICRO = flags.DEFINE_list("micro", ["1", "2"], "sweep: examples per device per micro-batch (sets grad_accum_steps)")
_REMAT = flags.DEFINE_list("remat", ["full", "dots"], "sweep: remat policies")
_EXPERT = flags.DEFINE_list("expert", ["1"], "sweep: expert-parallel sizes (MoE)")
_BEST = flags.DEFINE_bool("best", False, "compile the fastest fitting variant docs/scaling.json records for this "
                          "config and topology (its mesh, grad accumulation, remat), without searching")
_TABLE = flags.DEFINE_bool("table", False, "search the target slices, the smallest fitting slices and the fastest "
                           "variant on each, and write docs/scaling.md and docs/scaling.json")
_OUT = flags.DEFINE_string("out", "docs/scaling.md", "--table: where to write the tables")
_SCALING_JSON = flags.DEFINE_string("scaling_json", "docs/scaling.json", "--table: where to write every cell's "
                                    "variants and figures; --best: where to read them")
_ONLY = flags.DEFINE_string("only", None, "--table: search only the configs whose name matches this regex")
_CACHED_ONLY = flags.DEFINE_bool("cached_only", False, "--table: compile nothing, write what the cache holds "
                                 "(searches that need a new compile stay 'not searched yet')")
_CACHE = flags.DEFINE_string("cache", os.path.join(os.path.expanduser("~"), ".cache", "molmo_jax", "aot"),
                             "--table: directory caching each compile's report and HLO (keyed by the lowered "
                             "program, device layout, memory budget and versions); '' = no cache")


def _setup_environment(topology: str):
    """Before jax creates its CPU client: N simulated devices for cpu-N."""
    name = topology.strip().lower()
    if name.startswith("cpu-") and name[4:].isdigit():
        flag = f"--xla_force_host_platform_device_count={int(name[4:])}"
        current = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in current:
            os.environ["XLA_FLAGS"] = f"{current} {flag}".strip()


def format_report(r: dict) -> str:
    lines = [f"{r['model']} {r['stage']} on {r['topology']}: {r['n_devices']} x {r['device_kind']}, "
             f"mesh {mesh_text(r['mesh'])} ({r['mesh_layout']} layout)",
             f"batch {r['batch_size']} x {r['seq_len']} tokens, {r['crops']} crops; grad_accum "
             f"{r['grad_accum_steps']} -> {r['micro_batch_per_device']:g} examples per device per micro-batch; "
             f"remat {r['remat']}"]
    if r["batch_replicated"]:
        lines.append("WARNING: the micro-batch does not divide over the batch axes, so it is replicated")
    lines += ["per device                       GiB",
              f"  parameters              {gib(r['param_bytes_per_device']):>10}",
              f"  optimizer state         {gib(r['opt_state_bytes_per_device']):>10}",
              f"  batch                   {gib(r['batch_bytes_per_device']):>10}",
              f"  temporaries/activations {gib(r.get('temp_bytes_per_device')):>10}",
              f"  peak                    {gib(r.get('peak_bytes_per_device')):>10}   of "
              f"{gib(r['hbm_bytes_per_device'])} -> {'fits' if r['fits'] else 'DOES NOT FIT'}"]
    if r.get("oom_message"):
        lines.append(f"  compiler: {r['oom_message']}")
    lines.append(f"compile {r['compile_seconds']:.1f} s wall, {r['compile_cpu_seconds']:.1f} s CPU")
    if r.get("flops_per_device") is not None:
        lines.append(f"FLOPs per device per step: compiled HLO {r['flops_per_device']:.4g} (dots x loop trips), "
                     f"XLA cost analysis {r['xla_cost_flops_per_device']:.4g} (loop bodies once), "
                     f"model (analytic) {r['model_flops_per_device']:.4g}")
        by_category = r.get("hbm_bytes_by_category") or {}
        if by_category:
            lines.append("HBM traffic per step by category (GiB): " + ", ".join(
                f"{k} {gib(v)}" for k, v in sorted(by_category.items(), key=lambda kv: -kv[1]) if v))
        lines.append("collectives per step       count        GiB   GiB sent (ring)")
        for kind, c in r["collectives"].items():
            lines.append(f"  {kind:<22}{c['count']:>8.0f} {gib(c['bytes']):>10} {gib(c['link_bytes']):>10}")
    roof = r.get("roofline") or {}
    if roof:
        lines.append(f"roofline: compute {roof['compute_s'] * 1e3:.1f} ms, HBM {roof['hbm_s'] * 1e3:.1f} ms, "
                     f"ICI {roof['ici_s'] * 1e3:.1f} ms -> step >= {roof['step_s'] * 1e3:.1f} ms "
                     f"({roof['bound']}-bound), MFU <= {roof['mfu']:.1%}")
    for name, p in (r.get("inference") or {}).items():
        if isinstance(p, dict):
            roof = p.get("roofline") or {}
            est = f", step >= {roof['step_s'] * 1e3:.2f} ms ({roof['bound']}-bound)" if roof else ""
            lines.append(f"{name}: peak {gib(p.get('peak_bytes_per_device'))} GiB, fits {p['fits']}, "
                         f"HLO FLOPs {p.get('flops_per_device') or 0:.4g}{est}, compile {p['compile_seconds']:.1f} s")
    return "\n".join(lines)


def format_sweep(reports: list) -> str:
    head = (f"{'fits':<5}{'mesh':<26}{'accum':>6}{'ex/dev':>7}{'remat':>6}{'peak GiB':>10}{'step ms':>9}"
            f"{'MFU':>7}  bound")
    rows = [head]
    for r in reports:
        roof = r.get("roofline") or {}
        rows.append(f"{'yes' if r['fits'] else 'no':<5}{mesh_text(r['mesh']):<26}{r['grad_accum_steps']:>6}"
                    f"{r['micro_batch_per_device']:>7g}{r['remat']:>6}{gib(r.get('peak_bytes_per_device')):>10}"
                    f"{roof.get('step_s', float('nan')) * 1e3:>9.1f}{roof.get('mfu', float('nan')):>7.1%}  "
                    f"{roof.get('bound', '-')}")
    return "\n".join(rows)


def best_variant(config, topology: str):
    """The config with the fastest fitting variant that --scaling_json records for it on `topology`."""
    from molmo_jax.analysis import search
    name = os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])))[0]
    try:
        with open(_SCALING_JSON.value) as f:
            scaling = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--best: cannot read {_SCALING_JSON.value}: {e}") from None
    v = search.recorded_variant(scaling, name, topology)
    print(f"--best: {name} on {topology}: " + " ".join(search.flags(v)), file=sys.stderr)
    return search.from_variant(config, v)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _TABLE.value:
        _setup_environment("v5p-8")
        from molmo_jax.analysis import table
        log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
        table.write_table(_OUT.value, _SCALING_JSON.value, _CACHE.value or None, _CACHED_ONLY.value, log, _ONLY.value)
        return 0
    if _CONFIG.value is None:
        raise app.UsageError("--config is required (or --table)")
    _setup_environment(_TOPOLOGY.value)
    from molmo_jax.analysis import aot
    config = _CONFIG.value
    problems = recipe.validate(config)
    if problems:
        print(f"error: --config: {'; '.join(problems)}", file=sys.stderr)
        return 2
    try:
        topo = aot.parse_topology(_TOPOLOGY.value)
        from molmo_jax import sharding

        mesh = sharding.parse_mesh(_MESH.value) if _MESH.value else None
        if _BEST.value:
            if _MESH.value or _SWEEP.value:
                raise ValueError("--best takes its mesh from docs/scaling.json: leave out --mesh and --sweep")
            config = best_variant(config, _TOPOLOGY.value)
        hbm = _HBM_GIB.value * 2 ** 30 if _HBM_GIB.value else None
        if not _SWEEP.value:
            report = aot.compile_report(config, topo, mesh, hbm_bytes=hbm, inference=_INFERENCE.value,
                                        keep_hlo=bool(_HLO_OUT.value))
            if _HLO_OUT.value:
                with open(_HLO_OUT.value, "w") as f:
                    f.write(report.pop("hlo_text"))
            report.update(aot.estimate_fields(report))
            print(json.dumps(report, default=float) if _JSON.value else format_report(report))
            return 0
        devices = aot.topology_devices(topo)
        grid = aot.sweep_grid(config, len(devices), [int(x) for x in _TENSOR.value], [int(x) for x in _MICRO.value],
                              _REMAT.value, [int(x) for x in _EXPERT.value])
        if not grid:
            raise ValueError(f"no sweep point divides batch_size {config.batch_size} over {len(devices)} devices")
        reports = []
        for i, c in enumerate(grid):
            print(f"[{i + 1}/{len(grid)}] mesh {mesh_text(dict(c.mesh))} accum {c.grad_accum_steps} remat "
                  f"{c.model.remat}", file=sys.stderr, flush=True)
            reports.append(aot.compile_report(c, topo, devices=devices, hbm_bytes=hbm))
        reports = aot.rank(reports)
        print(json.dumps(reports, default=float) if _JSON.value else format_sweep(reports))
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:  # an unknown --config.KEY fails inside flag parsing with a traceback: name it first
        recipe.check_overrides()
    except recipe.RecipeError as e:
        sys.exit(f"error: {e}")
    app.run(lambda argv: sys.exit(main(argv)))
