"""Per-device statistics read from a compiled (SPMD-partitioned) HLO module's text.

XLA's `cost_analysis()` counts each while-loop body once; here every computation is weighted by how
often it runs (the trip counts of enclosing loops multiply), which matters because the layer stacks
and gradient accumulation are `lax.scan`s. Counted:
  flops        2 x multiply-adds of dot / ragged-dot / convolution and of the TPU grouped-matmul
               kernels (custom calls named ragged-dot*); elementwise work is ignored
  hbm_bytes    bytes read and written by the top-level instructions (a fusion reads its operands
               and writes its result once; dynamic slices of stacked weights count the slice)
  collectives  per kind: executions, result bytes, and bytes sent per device under the ring model
               (all-gather (n-1)/n R, reduce-scatter (n-1) R, all-reduce 2 (n-1)/n R,
               all-to-all (n-1)/n R, collective-permute R; R = result bytes, n = group size)
A loop whose trip count cannot be read is counted once and reported in `unknown_trip_counts`.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

_ITEMSIZE = dict(pred=1, s4=0.5, u4=0.5, s8=1, u8=1, f8e4m3fn=1, f8e5m2=1, s16=2, u16=2, f16=2, bf16=2,
                 s32=4, u32=4, f32=4, s64=8, u64=8, f64=8, c64=8, c128=16)
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_REFS = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|called_computations)="
                   r"(\{[^}]*\}|%?[\w.\-]+)")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_RING = {"all-gather": lambda n: (n - 1) / n, "reduce-scatter": lambda n: n - 1,
         "all-reduce": lambda n: 2 * (n - 1) / n, "all-to-all": lambda n: (n - 1) / n,
         "collective-permute": lambda n: 1.0}
# Instructions that move no HBM data themselves (their callees, if any, are counted instead).
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call",
               "conditional", "after-all", "partition-id", "replica-id", "async-start", "async-done",
               "async-update", "copy-start", "copy-done", "opt-barrier", "add-dependency"}


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    args: str          # the text inside the opcode's parentheses
    operands: list
    attrs: str         # everything after the closing parenthesis
    root: bool


@dataclasses.dataclass
class HloStats:
    flops: float
    hbm_bytes: float
    link_bytes: float
    collectives: dict
    unknown_trip_counts: int


def arrays(shape: str) -> list:
    return [(d, [int(x) for x in dims.split(",") if x]) for d, dims in _ARRAY.findall(shape) if d in _ITEMSIZE]


def nbytes(shape: str) -> float:
    return float(sum(_ITEMSIZE[d] * math.prod(dims) for d, dims in arrays(shape)))


def _matching(text: str, start: int) -> int:
    """Index of the bracket closing the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] in "([{"
        depth -= text[i] in ")]}"
        if depth == 0:
            return i
    return len(text) - 1


def split_tuple(shape: str) -> list:
    """Top-level elements of a tuple shape "(a, (b, c), d)"; [shape] for an array shape."""
    if not shape.startswith("("):
        return [shape]
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(shape):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if (ch == "," and depth == 1) or depth == 0:
            parts.append(shape[start:i].strip())
            start = i + 1
        if depth == 0:
            break
    return [p for p in parts if p]


def parse_instr(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    rest = m.group(3)
    if rest.startswith("("):
        end = _matching(rest, 0)
        shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    close = _matching(rest, op.end() - 1)
    args = rest[op.end():close]
    return Instr(m.group(2), shape, op.group(1), args, re.findall(r"%([\w.\-]+)", args),
                 rest[close + 1:], bool(m.group(1)))


def parse_hlo(text: str):
    """({computation name: [Instr]}, entry computation name)."""
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h:
            current = comps.setdefault(h.group(2), [])
            entry = h.group(2) if h.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            ins = parse_instr(line)
            if ins:
                current.append(ins)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def trip_count(ins: Instr, comps) -> int | None:
    """Iterations of a while loop: XLA's known_trip_count, else the `i < N` of its condition."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", ins.attrs)
    body = comps.get(cond.group(1), []) if cond else []
    consts = {i.name: int(i.args) for i in body if i.opcode == "constant" and re.fullmatch(r"-?\d+", i.args)}
    for i in body:  # lax.scan / fori_loop count from 0 while i < N
        if i.root and i.opcode == "compare" and "direction=LT" in i.attrs and len(i.operands) == 2:
            if i.operands[1] in consts:
                return consts[i.operands[1]]
    return None


def _callees(ins: Instr):
    for _, target in _REFS.findall(ins.attrs):
        yield from re.findall(r"[\w.\-]+", target.lstrip("%")) if target.startswith("{") else [target.lstrip("%")]


def multiplicities(comps, entry):
    """How many times each computation runs per execution of the entry, and the number of loops
    whose trip count was unknown. Computations form a DAG; weights are summed over callers."""
    edges, unknown = collections.defaultdict(list), 0
    for name, instrs in comps.items():
        for ins in instrs:
            factor = 1
            if ins.opcode == "while":
                n = trip_count(ins, comps)
                unknown += n is None
                factor = n or 1
            for callee in _callees(ins):
                if callee in comps:
                    edges[name].append((callee, factor))
    indegree = collections.Counter(c for outs in edges.values() for c, _ in outs)
    mult = collections.defaultdict(float, {entry: 1.0})
    ready = [c for c in comps if indegree[c] == 0]
    while ready:
        name = ready.pop()
        for callee, factor in edges[name]:
            mult[callee] += mult[name] * factor
            indegree[callee] -= 1
            if indegree[callee] == 0:
                ready.append(callee)
    return mult, unknown


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


def _read_bytes(comp, param_index: int, shapes: dict) -> float:
    """Bytes a fusion really reads from operand `param_index`: the slices if the parameter only
    feeds dynamic-slices (a layer's weights out of the stacked [layers, ...] array), else all of it."""
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
            elif u.opcode == "dynamic-slice" and u.operands[0] == name:
                total += nbytes(u.shape)
            elif u.opcode == "dynamic-update-slice" and u.operands[0] == name:
                continue  # updated in place
            else:
                return nbytes(shapes[param.name])
    return total


def _written_bytes(ins: Instr, comps, shapes: dict) -> float:
    """Bytes an instruction writes: in-place dynamic-update-slices write only their update."""
    target = comps.get(next(iter(_callees(ins)), ""), None) if ins.opcode == "fusion" else None
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
    fused = {c for instrs in comps.values() for i in instrs if i.opcode == "fusion" for c in _callees(i)}
    fused |= {c for instrs in comps.values() for i in instrs for c in re.findall(r"to_apply=%?([\w.\-]+)", i.attrs)}
    flops = hbm = link = 0.0
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
            c = _collective(ins)
            if c:
                kind, size = c
                sent = size * _RING[kind](_group_size(ins.attrs, n_devices))
                coll[kind]["count"] += weight
                coll[kind]["bytes"] += weight * size
                coll[kind]["link_bytes"] += weight * sent
                link += weight * sent
            elif name not in fused and ins.opcode not in _NO_TRAFFIC and not ins.opcode.endswith("-done"):
                hbm += weight * _traffic(ins, comps, shapes)
    return HloStats(flops, hbm, link, {k: v for k, v in coll.items() if v["count"]}, unknown)


def _traffic(ins: Instr, comps, shapes: dict) -> float:
    if ins.opcode == "dynamic-slice":
        return 2 * nbytes(ins.shape)
    if ins.opcode == "dynamic-update-slice":
        return 2 * nbytes(shapes.get(ins.operands[1], ""))
    written = _written_bytes(ins, comps, shapes)
    if ins.opcode == "fusion":
        body = comps.get(next(iter(_callees(ins)), ""), [])
        body_shapes = {i.name: i.shape for i in body}
        return written + sum(_read_bytes(body, k, body_shapes) for k in range(len(ins.operands)))
    return written + sum(nbytes(shapes.get(o, "")) for o in ins.operands)
