"""Compile the training step for a TPU slice ahead of time and report what it costs, without TPUs.

  python -m tools.aot --config configs/molmo_72b_sft.py --topology v5p-512 [--mesh fsdp=-1,tensor=8]
      [--config.key=value ...] [--json] [--inference] [--hbm_gib G]
  python -m tools.aot --config configs/X.py --topology v5e-256 --sweep [--tensor 1,4,8 --micro 1,2 --remat full,dots]
  python -m tools.aot --table [--cached_only]   # regenerate docs/scaling.md (compiles are cached, see --cache)

Topologies: v4-N and v5p-N (N TensorCores, 2 per chip), v5e-N / v5litepod-N and v6e-N (N chips),
KxNAME-N for K slices, cpu-N for N simulated CPU devices (no libtpu needed). TPU compiles need
libtpu (`pip install -e '.[tpu]'`). See molmo_jax/analysis/aot.py for what is measured and docs/scaling.md
for the roofline formula and its limits.
"""
import gzip
import importlib
import json
import os
import subprocess
import sys
import time

# Before jax is imported (the config files import it): this process only compiles. It never runs
# on a TPU, so it needs neither the TPU runtime nor libtpu's single-process lock file.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

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
_TABLE = flags.DEFINE_bool("table", False, "search the smallest fitting slices and write docs/scaling.md")
_OUT = flags.DEFINE_string("out", "docs/scaling.md", "--table: where to write")
_CACHED_ONLY = flags.DEFINE_bool("cached_only", False, "--table: compile nothing, write what the cache holds "
                                 "(searches that need a new compile stay 'not searched yet')")
_CACHE = flags.DEFINE_string("cache", os.path.join(os.path.expanduser("~"), ".cache", "molmo_jax", "aot"),
                             "--table: directory caching each compile's report and HLO (keyed by the config, "
                             "topology, versions and model source); '' = no cache")


def _setup_environment(topology: str):
    """Before jax creates its CPU client: N simulated devices for cpu-N."""
    name = topology.strip().lower()
    if name.startswith("cpu-") and name[4:].isdigit():
        flag = f"--xla_force_host_platform_device_count={int(name[4:])}"
        current = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in current:
            os.environ["XLA_FLAGS"] = f"{current} {flag}".strip()


def _gib(x) -> str:
    return "?" if x is None else f"{x / 2 ** 30:.2f}"


def mesh_text(mesh: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in mesh.items() if v > 1) or "1 device"


def format_report(r: dict) -> str:
    lines = [f"{r['model']} {r['stage']} on {r['topology']}: {r['n_devices']} x {r['device_kind']}, "
             f"mesh {mesh_text(r['mesh'])} ({r['mesh_layout']} layout)",
             f"batch {r['batch_size']} x {r['seq_len']} tokens, {r['crops']} crops; grad_accum "
             f"{r['grad_accum_steps']} -> {r['micro_batch_per_device']:g} examples per device per micro-batch; "
             f"remat {r['remat']}"]
    if r["batch_replicated"]:
        lines.append("WARNING: the micro-batch does not divide over the batch axes, so it is replicated")
    lines += ["per device                       GiB",
              f"  parameters              {_gib(r['param_bytes_per_device']):>10}",
              f"  optimizer state         {_gib(r['opt_state_bytes_per_device']):>10}",
              f"  batch                   {_gib(r['batch_bytes_per_device']):>10}",
              f"  temporaries/activations {_gib(r.get('temp_bytes_per_device')):>10}",
              f"  peak                    {_gib(r.get('peak_bytes_per_device')):>10}   of "
              f"{_gib(r['hbm_bytes_per_device'])} -> {'fits' if r['fits'] else 'DOES NOT FIT'}"]
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
                f"{k} {_gib(v)}" for k, v in sorted(by_category.items(), key=lambda kv: -kv[1]) if v))
        lines.append("collectives per step       count        GiB   GiB sent (ring)")
        for kind, c in r["collectives"].items():
            lines.append(f"  {kind:<22}{c['count']:>8.0f} {_gib(c['bytes']):>10} {_gib(c['link_bytes']):>10}")
    roof = r.get("roofline") or {}
    if roof:
        lines.append(f"roofline: compute {roof['compute_s'] * 1e3:.1f} ms, HBM {roof['hbm_s'] * 1e3:.1f} ms, "
                     f"ICI {roof['ici_s'] * 1e3:.1f} ms -> step >= {roof['step_s'] * 1e3:.1f} ms "
                     f"({roof['bound']}-bound), MFU <= {roof['mfu']:.1%}")
    for name, p in (r.get("inference") or {}).items():
        if isinstance(p, dict):
            roof = p.get("roofline") or {}
            est = f", step >= {roof['step_s'] * 1e3:.2f} ms ({roof['bound']}-bound)" if roof else ""
            lines.append(f"{name}: peak {_gib(p.get('peak_bytes_per_device'))} GiB, fits {p['fits']}, "
                         f"HLO FLOPs {p.get('flops_per_device') or 0:.4g}{est}, compile {p['compile_seconds']:.1f} s")
    return "\n".join(lines)


def format_sweep(reports: list) -> str:
    head = (f"{'fits':<5}{'mesh':<26}{'accum':>6}{'ex/dev':>7}{'remat':>6}{'peak GiB':>10}{'step ms':>9}"
            f"{'MFU':>7}  bound")
    rows = [head]
    for r in reports:
        roof = r.get("roofline") or {}
        rows.append(f"{'yes' if r['fits'] else 'no':<5}{mesh_text(r['mesh']):<26}{r['grad_accum_steps']:>6}"
                    f"{r['micro_batch_per_device']:>7g}{r['remat']:>6}{_gib(r.get('peak_bytes_per_device')):>10}"
                    f"{roof.get('step_s', float('nan')) * 1e3:>9.1f}{roof.get('mfu', float('nan')):>7.1%}  "
                    f"{roof.get('bound', '-')}")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------
# --table: the smallest slices on which each released model's training step fits

TABLE_MODELS = (("molmoe_1b", "MolmoE-1B"), ("molmo_7b_o", "Molmo-7B-O"), ("molmo_7b_d", "Molmo-7B-D"),
                ("molmo_72b", "Molmo-72B"))
TABLE_SLICES = {"v5p": [f"v5p-{2 * chips}" for chips in (4, 8, 16, 32, 64, 128, 256, 512, 1024)],
                "v5e": [f"v5e-{chips}" for chips in (1, 4, 8, 16, 32, 64, 128, 256)]}
class NotCached(Exception):
    """--cached_only: this compile is not in the cache."""


class CachedCompiler:
    """compile_report with a disk cache keyed by the lowered program (molmo_jax.analysis.aot.program_key):
    lowering takes seconds, compiling minutes. Each entry keeps the compiled HLO (gzip), so the HLO
    analysis is re-run on every read and stays current without compiling again."""

    def __init__(self, cache_dir: str | None, cached_only: bool = False):
        from molmo_jax.analysis import aot
        self.aot, self.dir, self.cached_only, self.devices = aot, cache_dir, cached_only, {}
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
                measured.update(self.aot.hlo_fields(measured["hlo_text"], measured["n_devices"]))
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

    def __call__(self, config, topology: str) -> dict:
        topo = self.aot.parse_topology(topology)
        if topology not in self.devices:
            self.devices[topology] = self.aot.topology_devices(topo)
        start = time.perf_counter()
        try:
            return self.aot.compile_report(config, topo, devices=self.devices[topology], cache=self)
        except NotCached:
            raise
        except Exception as e:  # noqa: BLE001 - one failed compile must not end an hours-long search
            return dict(model=config.model.name, stage=config.stage, topology=topology, mesh=dict(config.mesh),
                        grad_accum_steps=config.grad_accum_steps, remat=config.model.remat, fits=False,
                        error=f"{type(e).__name__}: {str(e)[:300]}", hbm_bytes_per_device=topo.chip.hbm_bytes,
                        compile_seconds=time.perf_counter() - start, compile_cpu_seconds=float("nan"))


def tensor_choices(config, n_devices: int) -> list:
    """Tensor-parallel sizes that split heads, MLP and vocabulary evenly, largest first (a larger
    one shrinks the per-device share of weights, attention and logits inside a micro-batch)."""
    llm = config.model.llm
    return [t for t in (16, 8, 4, 2, 1) if t <= n_devices and not (llm.n_heads % t or llm.mlp_dim % t
                                                                     or llm.embedding_size % t)]


def lean_variant(config, n_devices: int, aot, remat: str = "full"):
    """The variant that needs least memory per chip: the largest even tensor split, FSDP over the
    rest, one example per device per micro-batch, full remat (None if the batch does not split)."""
    tensor = tensor_choices(config, n_devices)[0]
    return aot.variant(config, dict(fsdp=n_devices // tensor, tensor=tensor), 1, remat)


def smallest_fit(config, family: str, run, log) -> tuple:
    """Walk up the slice sizes: skip a slice whose exact share of the training state exceeds HBM,
    else compile the leanest variant (largest even tensor split, one example per device per
    micro-batch, full remat). Returns (the report on the first slice where it fits or None, every
    report made); `try_alternatives` then looks for a faster variant on that slice."""
    aot = run.aot
    tried = []
    for name in TABLE_SLICES[family]:
        topo = aot.parse_topology(name)
        lean = lean_variant(config, topo.n_devices, aot)
        if lean is None:
            continue
        if name not in run.devices:
            try:
                run.devices[name] = aot.topology_devices(topo)
            except Exception as e:  # noqa: BLE001 - an unsupported slice shape: say so and go on
                log(f"  {name}: no compile-only devices ({str(e).splitlines()[0][:200]})")
                continue
        plan = aot.compile_report(lean, topo, devices=run.devices[name], compile=False)
        if aot.state_lower_bound(plan) > topo.chip.hbm_bytes:
            log(f"  {name}: the training state alone needs {aot.state_lower_bound(plan) / 2 ** 30:.1f} GiB per chip")
            continue
        report = run(lean, name)
        tried.append(report)
        why = report.get("error") or report.get("oom_message") or ""
        log(f"  {name} {mesh_text(report['mesh'])}: {'fits' if report['fits'] else 'does not fit'} "
            f"(compiled in {report['compile_seconds']:.0f} s) {why}")
        if report["fits"]:
            return report, tried
    return None, tried


def try_alternatives(config, best: dict, tried: list, run, log) -> tuple:
    """On the slice `smallest_fit` found, also compile `dots` remat and plain FSDP (no tensor split)
    and keep the fastest variant that fits. Returns (best, tried) updated."""
    aot, name = run.aot, best["topology"]
    n = aot.parse_topology(name).n_devices
    others = [lean_variant(config, n, aot, remat="dots")]
    if best["mesh"]["tensor"] > 1:
        others.append(aot.variant(config, dict(fsdp=n), 1, "full"))
    tried = list(tried)
    for c in filter(None, others):
        try:
            tried.append(run(c, name))
        except NotCached:  # --cached_only: rank what was compiled
            continue
        log(f"  {name} {mesh_text(tried[-1]['mesh'])} remat {c.model.remat}: "
            f"{'fits' if tried[-1]['fits'] else 'does not fit'}")
    return aot.rank([r for r in tried if r["topology"] == name])[0], tried


def _mfu(r) -> str:
    roof = r.get("roofline") or {}
    return f"{roof['mfu']:.0%}" if roof.get("mfu") is not None else "-"


def _row(r) -> str:
    roof = r.get("roofline") or {}
    step = f"{roof['step_s']:.2f} s ({roof['bound']})" if roof else "-"
    if r.get("oom_message"):
        peak = f"out of memory: {_gib(r.get('temp_bytes_per_device'))} GiB of temporaries"
    elif r.get("error"):
        peak = f"failed: {r['error'][:80]}"
    else:
        peak = f"{_gib(r.get('peak_bytes_per_device'))} / {_gib(r['hbm_bytes_per_device'])}"
    return (f"{r['topology']} | {mesh_text(r['mesh'])} | {r['grad_accum_steps']} | {r['remat']} | {peak} | "
            f"{_mfu(r)} | {step} | {r['compile_seconds']:.0f} / {r['compile_cpu_seconds']:.0f}")


BEGIN, END = "<!-- BEGIN GENERATED BY python -m tools.aot --table -->", "<!-- END GENERATED -->"


def _within(r, limit: str, aot) -> str:
    ok = r is not None and aot.parse_topology(r["topology"]).n_devices <= aot.parse_topology(limit).n_devices
    found = (f"{r['topology']} (mesh {mesh_text(r['mesh'])}, grad accum {r['grad_accum_steps']}, remat {r['remat']}, "
             f"peak {_gib(r['peak_bytes_per_device'])} GiB per chip)" if r else "none")
    return f"**{'met' if ok else 'NOT met'}**: smallest fitting slice {found}"


def _range(reports: list, key: str) -> str:
    return f"{min(r[key] for r in reports):.0f} to {max(r[key] for r in reports):.0f} s"


REFERENCE_POINTS = (("molmo_72b", "sft", "v5p-512"), ("molmo_7b_d", "sft", "v5e-256"))  # named in the issue


PENDING = "pending"  # a table cell not searched yet (an interrupted --table run writes what it has)


def generated_section(results: list, references: list, aot) -> str:
    """results: (title, stage, family, config, best report or None, reports made) per search;
    references: reports of the lean variant at REFERENCE_POINTS."""
    import jax
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    lines = [BEGIN, "", f"Generated by compiling the training step of commit {commit} (plus uncommitted changes, "
             f"if any) with jax {jax.__version__} and libtpu on a 2-core CPU host.", "",
             "| chip | usable HBM GiB | bf16 TFLOP/s | HBM GB/s | ICI GB/s (out, one way) |", "|---|---|---|---|---|"]
    lines += [f"| {c.name} | {c.hbm_bytes / 2 ** 30:.2f} | {c.peak_flops / 1e12:.0f} | {c.hbm_bw / 1e9:.0f} | "
              f"{c.ici_bw / 1e9:.0f} |" for c in aot.CHIPS.values()]
    columns = ("slice | mesh | grad accum | remat | peak / usable HBM GiB per chip | est. MFU | est. step (bound) | "
               "compile s (wall / CPU)")
    lines += ["", "### Smallest slices at the original batch size and sequence length", "",
              f"| model | stage | batch x seq | smallest {columns} |", "|---" * 11 + "|"]
    for title, stage, family, config, best, _ in results:
        if best == PENDING:
            cells = f"not searched yet ({family}; re-run `tools.aot --table`: finished compiles are cached) | | | | | | |"
        else:
            cells = _row(best) if best else f"no {family} slice tried fits | | | | | | |"
        lines.append(f"| {title} | {stage} | {config.batch_size} x {config.seq_len} | {cells} |")
    found = {(title, stage, family): (None if best == PENDING else best) for title, stage, family, _, best, _ in results}
    lines += ["", "### The two requirements", ""]
    for title, family, limit in (("Molmo-72B", "v5p", "v5p-512"), ("Molmo-7B-D", "v5e", "v5e-256")):
        lines.append(f"- {title} stage 2 on {limit} or smaller: {_within(found.get((title, 'sft', family)), limit, aot)}")
    lines += ["", "At the slices the requirements name (the same lean variant):", "",
              f"| model | stage | {columns} | fits |", "|---" * 11 + "|"]
    lines += [f"| {r['model']} | {r['stage']} | {_row(r)} | {'yes' if r['fits'] else 'no'} |" for r in references]
    made = [r for *_, found in results for r in found] + list(references)
    big = [r for r in made if r["model"] == "molmo_72b" and r["fits"]]
    lines += ["", "### Compile time of the 72B step", "",
              f"{len(big)} Molmo-72B configurations compiled and fit; each compile took {_range(big, 'compile_seconds')}"
              f" wall and {_range(big, 'compile_cpu_seconds')} of CPU (this host is shared with other jobs: wall "
              "time includes waiting for a core)." if big else "No Molmo-72B configuration compiled and fit."]
    lines += ["", "### Every compile the search made", "", f"| model | stage | {columns} | fits |", "|---" * 11 + "|"]
    lines += [f"| {r['model']} | {r['stage']} | {_row(r)} | {'yes' if r['fits'] else 'no'} |"
              for *_, found in results for r in found]
    return "\n".join(lines + ["", END])


def write_table(out_path: str, cache_dir: str | None, cached_only: bool = False):
    """Search every released model x stage x chip family and rewrite the generated part of
    `out_path` (between the BEGIN/END markers; the prose around it is kept)."""
    def read_doc():
        with open(out_path) as f:
            doc = f.read()
        if BEGIN not in doc or END not in doc:
            raise SystemExit(f"{out_path}: no '{BEGIN}' ... '{END}' markers to replace")
        return doc
    read_doc()  # fail before hours of compiling, not after
    run = CachedCompiler(cache_dir, cached_only)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    cells = [(key, title, stage, family) for key, title in TABLE_MODELS for stage in ("pretrain", "sft")
             for family in TABLE_SLICES]
    # The two required rows first, so that an interrupted run has them (results are cached).
    first = [("Molmo-72B", "sft", "v5p"), ("Molmo-7B-D", "sft", "v5e")]
    configs = {(key, stage): importlib.import_module(f"configs.{key}_{stage}").get_config()
               for key, _, stage, _ in cells}
    results = {(key, stage, family): (title, stage, family, configs[key, stage], PENDING, [])
               for key, title, stage, family in cells}
    references = []

    def write():  # after every search: a run stopped part-way still leaves a correct, partial table
        section = generated_section([results[c[0], c[2], c[3]] for c in cells], references, run.aot)
        head, rest = read_doc().split(BEGIN, 1)  # read again: the prose may have been edited meanwhile
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(head + section + rest.split(END, 1)[1])
        os.replace(tmp, out_path)
        log(f"wrote {out_path}")

    order = sorted(cells, key=lambda c: first.index(c[1:]) if c[1:] in first else 2)
    # Two passes, so that an interrupted run has a smallest slice in every cell before it spends
    # compiles on faster variants: first the lean variant up the slices (then the reference
    # points), then the alternatives.
    for key, title, stage, family in order:
        log(f"{title} {stage} on {family}:")
        try:
            results[key, stage, family] = (title, stage, family, configs[key, stage]) + smallest_fit(
                configs[key, stage], family, run, log)
        except NotCached:
            log("  (needs a compile that is not cached: left as not searched yet)")
            continue
        write()
    for key, stage, name in REFERENCE_POINTS:
        log(f"{key} {stage} on {name} (reference point)")
        try:
            references.append(run(lean_variant(configs[key, stage], run.aot.parse_topology(name).n_devices,
                                               run.aot), name))
        except NotCached:
            log("  (not cached)")
    write()
    for key, title, stage, family in order:
        *head, best, tried = results[key, stage, family]
        if best in (None, PENDING):
            continue
        log(f"{title} {stage} on {family}: faster variants on {best['topology']}")
        results[key, stage, family] = tuple(head) + try_alternatives(configs[key, stage], best, tried, run, log)
        write()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _TABLE.value:
        _setup_environment("v5p-8")
        write_table(_OUT.value, _CACHE.value or None, _CACHED_ONLY.value)
        return 0
    if _CONFIG.value is None:
        raise app.UsageError("--config is required (or --table)")
    _setup_environment(_TOPOLOGY.value)
    from molmo_jax.analysis import aot
    config = _CONFIG.value
    try:
        topo = aot.parse_topology(_TOPOLOGY.value)
        from molmo_jax import sharding

        mesh = sharding.parse_mesh(_MESH.value) if _MESH.value else None
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
    app.run(lambda argv: sys.exit(main(argv)))
