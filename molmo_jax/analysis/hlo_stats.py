"""Per-device statistics read from a compiled (SPMD-partitioned) HLO module's text.

XLA's `cost_analysis()` counts each while-loop body once; here every computation is weighted by how
often it runs (the trip counts of enclosing loops multiply), which matters because the layer stacks
and gradient accumulation are `lax.scan`s. Counted:
  flops        2 x multiply-adds of dot / ragged-dot / convolution and of the TPU grouped-matmul
               kernels (custom calls named ragged-dot*); attention kernels (custom calls named
               splash_*) by the analytic count over every query and key, i.e. as if no block were
               masked (forward 4, dq 6, dkv 8 x queries x keys x head_dim); the MoE's grouped-matmul
               kernels (Pallas megablox gmm / tgmm) by their own cost estimate, scaled to the experts a
               device holds (`grouped_kernel_flops`); elementwise work is ignored
  hbm_bytes    bytes read and written by the top-level instructions and collectives (a fusion reads its operands
               and writes its result once; (dynamic) slices of stacked weights or saved activations
               count the slice, also through nested fusions, as do TPU async slices (`slice-start`),
               and a ConcatBitcast of adjacent slices moves nothing; a
               kernel reads its operands and writes its results once, except an attention kernel's
               dynamic mask, of which only one row of blocks (the partially masked ones along the
               diagonal) is counted), split by category in `hbm_by_category`: attention, matmul
               (operands and results of dots and of fusions holding one), elementwise, optimizer,
               collectives (their input and output buffers), other
  collectives  per kind: executions, result bytes, and bytes sent per device under the ring model
               (all-gather (n-1)/n R, reduce-scatter (n-1) R, all-reduce 2 (n-1)/n R,
               all-to-all (n-1)/n R, collective-permute R; R = result bytes, n = group size)
A loop whose trip count cannot be read is counted once and reported in `unknown_trip_counts`.
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from molmo_jax.analysis.hlo_parse import (Instr, arrays, callees, multiplicities, nbytes, parse_hlo, split_tuple,
                                          stack_functions)

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_RING = {"all-gather": lambda n: (n - 1) / n, "reduce-scatter": lambda n: n - 1,
         "all-reduce": lambda n: 2 * (n - 1) / n, "all-to-all": lambda n: (n - 1) / n,
         "collective-permute": lambda n: 1.0}
# Instructions that move no HBM data themselves (their callees, if any, are counted instead).
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call",
               "conditional", "after-all", "partition-id", "replica-id", "async-start", "async-done",
               "async-update", "copy-start", "copy-done", "opt-barrier", "add-dependency"}


HBM_CATEGORIES = ("attention", "matmul", "elementwise", "optimizer", "collectives", "other")
# Source functions whose operations are attention / optimizer work (innermost frames first).
_ATTENTION_FUNCTIONS = ("attend", "softmax", "_softmax_jvp", "splash", "_splash_local", "cudnn")


@dataclasses.dataclass
class HloStats:
    flops: float
    hbm_bytes: float
    link_bytes: float
    collectives: dict
    unknown_trip_counts: int
    hbm_by_category: dict = dataclasses.field(default_factory=dict)


def _dims(attrs: str, key: str) -> list:
    m = re.search(key + r"=\{([\d,]*)\}", attrs)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def _valid_taps(out: int, in_size: int, k: int, stride: int, pad_lo: int, lhs_dil: int, rhs_dil: int) -> int:
    """Sum over output positions of the kernel taps that land on a real (non-padding) input."""
    o = np.arange(out)[:, None]
    t = np.arange(k)[None, :]
    pos = o * stride + t * rhs_dil - pad_lo
    ok = (pos >= 0) & (pos <= (in_size - 1) * lhs_dil) & (pos % lhs_dil == 0)
    return int(ok.sum())


def conv_flops(ins: Instr, shapes: dict) -> float:
    lhs, rhs = (arrays(shapes.get(o, ""))[0][1] for o in ins.operands[:2])
    out = arrays(ins.shape)[0][1]
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs).groups()
    lpos, rpos, opos = ({c: i for i, c in enumerate(s)} for s in labels)
    window = re.search(r"window=\{([^}]*)\}", ins.attrs)
    fields = dict(f.split("=", 1) for f in window.group(1).split()) if window else {}
    spatial = sorted(c for c in labels[0] if c.isdigit())

    def field(name, i, default):
        if name not in fields:
            return default
        return fields[name].split("x")[i]

    taps = 1
    for i, c in enumerate(spatial):
        pad_lo = int(field("pad", i, "0_0").split("_")[0])
        taps *= _valid_taps(out[opos[c]], lhs[lpos[c]], rhs[rpos[c]], int(field("stride", i, 1)), pad_lo,
                            int(field("lhs_dilate", i, 1)), int(field("rhs_dilate", i, 1)))
    groups = int((re.search(r"feature_group_count=(\d+)", ins.attrs) or [0, 1])[1])
    return 2.0 * out[opos["b"]] * out[opos["f"]] * taps * lhs[lpos["f"]] / groups


def dot_flops(ins: Instr, shapes: dict) -> float:
    lhs = arrays(shapes.get(ins.operands[0], ""))[0][1]
    contracted = math.prod(lhs[d] for d in _dims(ins.attrs, "lhs_contracting_dims"))
    return 2.0 * math.prod(arrays(ins.shape)[0][1]) * contracted


def ragged_kernel_flops(ins: Instr, shapes: dict) -> float:
    """TPU grouped-matmul kernels (custom calls named ragged-dot*): out [M, N] from lhs [M, K] and
    per-group weights; every row meets one group, so 2 M N K."""
    out = arrays(ins.shape)
    if len(out) != 1 or len(out[0][1]) != 2:
        return 0.0
    m, n = out[0][1]
    for o in ins.operands:
        a = arrays(shapes.get(o, ""))
        if len(a) == 1 and len(a[0][1]) == 2 and a[0][1][0] == m:
            return 2.0 * m * n * a[0][1][1]
    return 0.0


_GROUPED_OP = re.compile(r'op_name="[^"]*jit\((t?gmm)\)/pallas_call"')
_COST_FLOPS = re.compile(r'"cost_estimate":\{"flops":"(\d+)"')


def grouped_kernel(ins: Instr) -> str:
    """'gmm' or 'tgmm' for a Pallas megablox grouped-matmul kernel (layers/moe_kernel.py), else ''."""
    if ins.opcode != "custom-call" or "tpu_custom_call" not in ins.attrs:
        return ""
    m = _GROUPED_OP.search(ins.attrs)
    return m.group(1) if m else ""


def grouped_kernel_flops(ins: Instr, shapes: dict) -> float:
    """The kernel's own cost estimate (2 m k n over all m rows), times the share of the groups this
    device holds: under expert parallelism a device computes only the rows routed to its experts,
    counted here as if routing were balanced (E_local / E of the rows). The groups: the row-offset
    table s32[E + 1] among the operands; the local ones: the weights' (gmm) or result's (tgmm) first
    dimension."""
    m = _COST_FLOPS.search(ins.attrs)
    if not m:
        return 0.0
    ops = [arrays(shapes.get(o, "")) for o in ins.operands]
    offsets = next((a[0][1][0] for a in ops if len(a) == 1 and a[0][0] == "s32" and len(a[0][1]) == 1
                    and a[0][1][0] > 1), None)
    grouped = arrays(ins.shape) if grouped_kernel(ins) == "tgmm" else next(
        (a for a in ops if len(a) == 1 and len(a[0][1]) == 3), [])
    share = 1.0
    if offsets and grouped:
        share = min(1.0, grouped[0][1][0] / (offsets - 1))
    return float(m.group(1)) * share


def _splash_shapes(ins: Instr, shapes: dict):
    """(queries x head_dim array dims, keys) of a splash attention kernel: its first floating operand
    is q [..., T, d], its second k [..., S, d]."""
    floats = [a[0][1] for a in (arrays(shapes.get(o, "")) for o in ins.operands)
              if len(a) == 1 and a[0][0] in ("f32", "bf16", "f16") and len(a[0][1]) >= 2]
    return (floats[0], floats[1][-2]) if len(floats) >= 2 else (None, None)


SPLASH_FACTORS = (("dkv", 8.0), ("dq", 6.0), ("fwd", 4.0))


def splash_flops(ins: Instr, shapes: dict) -> float:
    q, s = _splash_shapes(ins, shapes)
    if q is None:
        return 0.0
    name = _splash_name(ins)
    factor = next((f for kind, f in SPLASH_FACTORS if f"_{kind}" in name), 4.0)
    return factor * math.prod(q[:-1]) * s * q[-1]


_SPLASH_OP = re.compile(r'op_name="[^"]*?((?:splash_\w+/)+)[^"]*pallas_call"')


def _splash_name(ins: Instr) -> str:
    """The splash kernel a custom call runs ('' if none): its instruction name, or, where XLA named
    the call after an enclosing function (a splash call under remat or a batching loop becomes
    `closed_call.N`), the innermost splash function of its op_name."""
    if ins.opcode != "custom-call":
        return ""
    if ins.name.startswith("splash_"):
        return ins.name
    m = _SPLASH_OP.search(ins.attrs) if "tpu_custom_call" in ins.attrs else None
    return m.group(1).rstrip("/").rsplit("/", 1)[-1] if m else ""


def _is_splash(ins: Instr) -> bool:
    return bool(_splash_name(ins))


def _splash_traffic(ins: Instr, shapes: dict) -> float:
    """Operands and results, the dynamic mask blocks ([heads, T, S] integers) as one row of blocks."""
    total = nbytes(ins.shape)
    for o in ins.operands:
        a = arrays(shapes.get(o, ""))
        if len(a) == 1 and a[0][0] in ("s32", "s8", "pred") and len(a[0][1]) == 3 and min(a[0][1][1:]) >= 128:
            total += nbytes(shapes[o]) * 128 / a[0][1][-1]
        else:
            total += nbytes(shapes.get(o, ""))
    return total


def _holds_dot(ins: Instr, comps) -> bool:
    if ins.opcode in ("dot", "convolution", "ragged-dot"):
        return True
    body = comps.get(next(iter(callees(ins)), ""), []) if ins.opcode == "fusion" else []
    return any(i.opcode in ("dot", "convolution") for i in body)


def _category(ins: Instr, functions: list, comps) -> str:
    if _is_splash(ins) or any(f.split(".")[0] in _ATTENTION_FUNCTIONS for f in functions[-3:]):
        return "attention"
    if "optax" in functions:
        return "optimizer"
    if _holds_dot(ins, comps) or grouped_kernel(ins):
        return "matmul"
    return "elementwise" if ins.opcode == "fusion" else "other"


def _group_size(attrs: str, n_devices: int) -> int:
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        sizes = dict((k.strip("'"), int(v)) for k, v in re.findall(r"('?[\w]+'?)=(\d+)", m.group(1)))
        return math.prod(sizes.get(a.strip().strip("'"), 1) for a in m.group(2).split(","))
    return n_devices


def _collective(ins: Instr):
    """(kind, result bytes) for a collective instruction, else None."""
    op = ins.opcode
    kind = op[:-len("-start")] if op.endswith("-start") else op
    if kind not in COLLECTIVES or op.endswith("-done"):
        return None
    shape = ins.shape
    if op.endswith("-start") and kind in ("all-gather", "collective-permute"):
        shape = split_tuple(shape)[1]  # (operands, results, ...) -> results
    return kind, nbytes(shape)


def _read_bytes(comp, param_index: int, shapes: dict, comps=None) -> float:
    """Bytes a fusion really reads from operand `param_index`: the slices if the parameter only
    feeds (dynamic-)slices (a layer's weights or saved activations out of a stacked [layers, ...]
    array), also through nested fusions, else all of it."""
    param = next((i for i in comp if i.opcode == "parameter" and i.args.strip() == str(param_index)), None)
    if param is None:
        return 0.0
    frontier, total = [param.name], 0.0
    while frontier:
        name = frontier.pop()
        users = [i for i in comp if name in i.operands]
        for u in users:
            if u.opcode == "bitcast":
                frontier.append(u.name)
            elif u.opcode in ("dynamic-slice", "slice") and u.operands[0] == name:
                total += nbytes(u.shape)
            elif u.opcode == "dynamic-update-slice" and u.operands[0] == name:
                continue  # updated in place
            elif u.opcode == "fusion" and comps is not None and u.operands.count(name) == 1:
                inner = comps.get(next(iter(callees(u)), ""), [])
                total += _read_bytes(inner, u.operands.index(name), {i.name: i.shape for i in inner}, comps)
            else:
                return nbytes(shapes[param.name])
    return min(total, nbytes(shapes[param.name]))


def _written_bytes(ins: Instr, comps, shapes: dict) -> float:
    """Bytes an instruction writes: in-place dynamic-update-slices write only their update."""
    target = comps.get(next(iter(callees(ins)), ""), None) if ins.opcode == "fusion" else None
    body = target if target is not None else [ins]
    local = {i.name: i.shape for i in body} | shapes
    root = next((i for i in body if i.root), ins)
    outs = [root] if root.opcode != "tuple" else [next((i for i in body if i.name == o), None) for o in root.operands]
    total = 0.0
    for o in outs:
        if o is not None and o.opcode == "dynamic-update-slice":
            total += nbytes(local.get(o.operands[1], ""))
        elif o is not None:
            total += nbytes(o.shape)
    return total if outs else nbytes(ins.shape)


def analyse_hlo(text: str, n_devices: int) -> HloStats:
    comps, entry = parse_hlo(text)
    mult, unknown = multiplicities(comps, entry)
    # Fusion bodies and reducers run inside their caller: only the caller's traffic counts.
    fused = {c for instrs in comps.values() for i in instrs if i.opcode == "fusion" for c in callees(i)}
    fused |= {c for instrs in comps.values() for i in instrs for c in re.findall(r"to_apply=%?([\w.\-]+)", i.attrs)}
    stacks = stack_functions(text)
    flops = hbm = link = 0.0
    by_category = dict.fromkeys(HBM_CATEGORIES, 0.0)
    coll = {k: dict(count=0.0, bytes=0.0, link_bytes=0.0) for k in COLLECTIVES}
    for name, instrs in comps.items():
        weight = mult.get(name, 0.0)
        if not weight:
            continue
        shapes = {i.name: i.shape for i in instrs}
        for ins in instrs:
            if ins.opcode in ("dot", "ragged-dot"):
                flops += weight * dot_flops(ins, shapes)
            elif ins.opcode == "convolution":
                flops += weight * conv_flops(ins, shapes)
            elif ins.opcode == "custom-call" and ins.name.startswith("ragged-dot") and "metadata" not in ins.name:
                flops += weight * ragged_kernel_flops(ins, shapes)
            elif _is_splash(ins):
                flops += weight * splash_flops(ins, shapes)
            elif grouped_kernel(ins):
                flops += weight * grouped_kernel_flops(ins, shapes)
            c = _collective(ins)
            if c:
                kind, size = c
                sent = size * _RING[kind](_group_size(ins.attrs, n_devices))
                coll[kind]["count"] += weight
                coll[kind]["bytes"] += weight * size
                coll[kind]["link_bytes"] += weight * sent
                link += weight * sent
                hbm += weight * 2 * size  # the buffer read and the one written
                by_category["collectives"] += weight * 2 * size
            elif name not in fused and ins.opcode not in _NO_TRAFFIC and not ins.opcode.endswith("-done"):
                moved = weight * (_splash_traffic(ins, shapes) if _is_splash(ins) else _traffic(ins, comps, shapes))
                hbm += moved
                frame = re.search(r"stack_frame_id=(\d+)", ins.attrs)
                by_category[_category(ins, stacks.get(int(frame.group(1)), []) if frame else [], comps)] += moved
    return HloStats(flops, hbm, link, {k: v for k, v in coll.items() if v["count"]}, unknown, by_category)


def _traffic(ins: Instr, comps, shapes: dict) -> float:
    if ins.opcode in ("dynamic-slice", "slice"):
        return 2 * nbytes(ins.shape)
    if ins.opcode == "slice-start":  # ((operand), slice, context): reads and writes the slice
        return 2 * nbytes(split_tuple(ins.shape)[1])
    if ins.opcode == "custom-call" and 'custom_call_target="ConcatBitcast"' in ins.attrs:
        return 0.0  # its operands were written side by side: the concatenation is a bitcast
    if ins.opcode == "dynamic-update-slice":
        return 2 * nbytes(shapes.get(ins.operands[1], ""))
    written = _written_bytes(ins, comps, shapes)
    if ins.opcode == "fusion":
        body = comps.get(next(iter(callees(ins)), ""), [])
        body_shapes = {i.name: i.shape for i in body}
        return written + sum(_read_bytes(body, k, body_shapes, comps) for k in range(len(ins.operands)))
    return written + sum(nbytes(shapes.get(o, "")) for o in ins.operands)
