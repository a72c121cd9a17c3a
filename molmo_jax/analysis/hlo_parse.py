"""Reading compiled (SPMD-partitioned) HLO module text: instructions, computations, how often each
runs (loop trip counts), array sizes, and the source stack of every instruction (the FileNames /
FunctionNames / StackFrames tables jax keeps after the module)."""
from __future__ import annotations

import collections
import dataclasses
import math
import re

_ITEMSIZE = dict(pred=1, s4=0.5, u4=0.5, s8=1, u8=1, f8e4m3fn=1, f8e5m2=1, s16=2, u16=2, f16=2, bf16=2,
                 s32=4, u32=4, f32=4, s64=8, u64=8, f64=8, c64=8, c128=16)
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_REFS = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|called_computations)="
                   r"(\{[^}]*\}|%?[\w.\-]+)")
@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    args: str          # the text inside the opcode's parentheses
    operands: list
    attrs: str         # everything after the closing parenthesis
    root: bool


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


def _statements(text: str):
    """The module's lines with each instruction joined into one: an attribute may span lines (a
    Pallas kernel's metadata JSON does), so a line that starts no instruction, header or closing
    brace continues the one before it."""
    pending = None
    for line in text.splitlines():
        if _HEADER.match(line) or line.rstrip() == "}" or _INSTR.match(line) or not line.strip():
            if pending is not None:
                yield pending
            pending = line
        elif pending is not None:
            pending += " " + line.strip()
    if pending is not None:
        yield pending


def parse_hlo(text: str):
    """({computation name: [Instr]}, entry computation name)."""
    comps, entry, current = {}, None, None
    for line in _statements(text):
        h = _HEADER.match(line)
        if h:
            current = comps.setdefault(h.group(2), [])
            entry = h.group(2) if h.group(1) else entry
        elif line.rstrip() == "}":
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


def callees(ins: Instr):
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
            for callee in callees(ins):
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


_TABLE_ROW = re.compile(r"^(\d+) (.*)$")


def _tables(text: str) -> dict[str, dict[int, str]]:
    """The FileNames / FunctionNames / FileLocations / StackFrames tables printed after the module."""
    tables, current = {}, None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
        elif current is not None:
            m = _TABLE_ROW.match(line)
            if m:
                current[int(m.group(1))] = m.group(2)
            elif line.strip():
                current = None
    return tables


def stack_functions(text: str) -> dict[int, list[str]]:
    """{stack_frame_id: function names from the outermost call to the innermost}."""
    t = _tables(text)
    field = lambda row, key: int(re.search(rf"{key}=(\d+)", row).group(1))  # noqa: E731
    fn_of_loc = {i: t["FunctionNames"][field(row, "function_name_id")].strip('"')
                 for i, row in t.get("FileLocations", {}).items()}
    file_of_loc = {i: t["FileNames"][field(row, "file_name_id")].strip('"')
                   for i, row in t.get("FileLocations", {}).items()}
    frames = {i: (field(row, "file_location_id"), field(row, "parent_frame_id"))
              for i, row in t.get("StackFrames", {}).items()}
    stacks = {}
    for frame in frames:
        names, seen, f = [], set(), frame
        while f in frames and f not in seen:
            seen.add(f)
            loc, parent = frames[f]
            names.append("optax" if "optax" in file_of_loc[loc] or file_of_loc[loc].endswith("optim.py")
                         else fn_of_loc[loc])
            f = parent
        stacks[frame] = names[::-1]
    return stacks


