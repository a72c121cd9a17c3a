"""Where the bench-s training step's time goes: a per-op profile of the compiled step on this CPU.

    .venv/bin/python -m bench.profile_train [--steps 2] [--remat full] [--top 25]

Runs the step of bench/bench_train.py under `jax.profiler.trace`, reads the trace back
(`jax.profiler.ProfileData`) and sums the time of every XLA operation (thunk) over the traced steps.
Each operation is attributed, through the source stack frames the compiled HLO keeps, to a part of
the model (vit, connector, llm, loss, optimizer) and the function that emitted it (attend, MLP, ...),
and its matmul FLOPs are counted from the dots it holds (molmo_jax.analysis.hlo_stats), so that the tables say
which work runs far below the matmul rate. Thunks can overlap on the CPU's threads: the sum of their
times may exceed the wall time.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
import time

from molmo_jax.analysis import hlo_stats
from molmo_jax.analysis.hlo_parse import parse_hlo, stack_functions

# Functions that only one part of the model calls (innermost stack frame, prefix match). Shared helpers
# (attend, Dense, ...) take the part of the other operations in the same HLO computation: each layer
# scan's body is its own computation.
PARTS = (("ViTBlock", "vit"), ("VisionTransformer", "vit"), ("LayerNorm", "vit"), ("quick_gelu", "vit"),
         ("Connector", "connector"), ("Block", "llm"), ("Decoder", "llm"), ("RMSNorm", "llm"),
         ("Attention", "llm"), ("MLP", "llm"), ("rope", "llm"), ("attention_mask", "llm"),
         ("positions_from_mask", "llm"), ("sparse_loss", "loss"), ("token_losses", "loss"),
         ("optax", "optimizer"), ("make_train_step", "step"))
def _part(functions: list[str]) -> str | None:
    return next((part for f in functions for prefix, part in PARTS if f.startswith(prefix)), None)


def op_table(text: str):
    """{instruction name: (where, matmul FLOPs)} for every instruction of the compiled module; where
    is 'part: innermost function', e.g. 'vit: attend', 'llm: MLP.__call__'."""
    comps, _ = parse_hlo(text)
    shapes = {i.name: i.shape for instrs in comps.values() for i in instrs}
    stacks = stack_functions(text)

    def flops(ins, depth=0):
        if ins.opcode == "dot":
            return hlo_stats.dot_flops(ins, shapes)
        if ins.opcode != "fusion" or depth > 4:
            return 0.0
        called = re.search(r"calls=%?([\w.\-]+)", ins.attrs)
        return sum(flops(i, depth + 1) for i in comps.get(called.group(1), [])) if called else 0.0

    table = {}
    for instrs in comps.values():
        functions = []
        for ins in instrs:
            frame = re.search(r"stack_frame_id=(\d+)", ins.attrs)
            functions.append(stacks.get(int(frame.group(1)), []) if frame else [])
        parts = {_part(f) for f in functions} - {None, "step"}
        default = parts.pop() if len(parts) == 1 else "shared"
        for ins, f in zip(instrs, functions):
            inner = f[-1].split(".<locals>")[0] if f else "(no source)"
            table[ins.name] = (f"{_part(f) or default}: {inner}", flops(ins))
    return table


def trace_events(trace_dir: str) -> dict[str, list[float]]:
    """{op: [durations in s]} of the XLA module that took the most time in the trace (the step)."""
    from jax.profiler import ProfileData

    times = collections.defaultdict(lambda: collections.defaultdict(list))
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for plane in ProfileData.from_file(path).planes:
            for line in plane.lines:
                for event in line.events:
                    stats = dict(event.stats)
                    if "hlo_op" in stats:
                        times[stats.get("hlo_module", "")][stats["hlo_op"]].append(event.duration_ns / 1e9)
    if not times:
        raise SystemExit(f"no XLA operations in the trace under {trace_dir}: nothing to report")
    step_module = max(times, key=lambda m: sum(map(sum, times[m].values())))
    return times[step_module]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2, help="traced steps (after 2 warm-up steps)")
    parser.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    parser.add_argument("--max-loss-tokens", type=int, default=1024)
    parser.add_argument("--top", type=int, default=25, help="slowest operations listed")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: trace at least one step")

    import jax

    from bench.bench_train import build_step
    _, step = build_step(args.remat, 1, args.max_loss_tokens)
    for _ in range(2):
        step()
    table = op_table(step.compiled_text())
    trace_dir = tempfile.mkdtemp(prefix="profile_train_")
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir):
        for _ in range(args.steps):
            step()
    wall = (time.perf_counter() - t0) / args.steps
    rows = []
    for name, ts in trace_events(trace_dir).items():
        place, fl = table.get(name, ("?", 0.0))
        rows.append((sum(ts) / args.steps, len(ts) // args.steps, fl * len(ts) / args.steps, name, place))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"wall time per step {wall:.2f} s (traced, {args.steps} steps); sum of op times per step "
          f"{total:.2f} s; {len(rows)} distinct ops")
    groups = collections.defaultdict(lambda: [0.0, 0.0])  # [seconds, FLOPs]
    for sec, _, fl, _, place in rows:
        key = (place, "matmul" if fl else "other")
        groups[key][0] += sec
        groups[key][1] += fl
    print("\n| where | kind | s per step | share | GFLOP | GFLOP/s |\n|---|---|---|---|---|---|")
    for (place, kind), (sec, fl) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        if sec >= 0.005 * total:
            rate = f"{fl / sec / 1e9:.0f}" if fl else ""
            print(f"| {place} | {kind} | {sec:.3f} | {sec / total:.1%} | {fl / 1e9:.1f} | {rate} |")
    print("\n| s per step | calls | GFLOP/s | op | where |\n|---|---|---|---|---|")
    for sec, calls, fl, name, place in rows[:args.top]:
        rate = f"{fl / sec / 1e9:.0f}" if fl else ""
        print(f"| {sec:.3f} | {calls} | {rate} | {name} | {place} |")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
