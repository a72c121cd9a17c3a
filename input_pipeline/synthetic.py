"""A synthetic PixMo: procedurally rendered images with PixMo-style conversations (numpy + PIL only).

Three image kinds, each with a dense caption and a short spoken-style transcript (for stage 1) plus
task conversations in the example contract of the input pipeline:
- "shapes": 1-6 big coloured shapes on a gradient/noise background -> `pointing` and `point_count`
  conversations (points in pixels, `point_scale` 0; a label may be absent, N = 0) and `user_qa`;
- "clock": an analog clock face -> style `clocks`, "What time is being shown?" -> "10:15";
- "chart": a small bar chart with coloured bars -> style `pixmo_docs_charts` questions.

Everything is a deterministic function of (seed, split, index): the same triple gives byte-identical
images and identical annotations. It is what `make demo` trains a tiny Molmo on from scratch, so the
scenes are deliberately easy: few large objects, five well-separated colours, a small vocabulary.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
KINDS = ("shapes", "clock", "chart")

COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 84, 214),
           "yellow": (240, 200, 20), "purple": (148, 64, 189)}
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"cross": "crosses"}
# Pale backgrounds, far from every shape colour so that shapes stand out.
BACKGROUNDS = {"light grey": (214, 214, 210), "pale blue": (200, 218, 236), "pale green": (208, 232, 204),
               "beige": (234, 222, 196), "pale pink": (240, 212, 218)}
CLOCK_FACES = {"white": (250, 250, 250), "cream": (246, 238, 212), "light grey": (226, 226, 226)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
OUTLINE = (40, 40, 40)
SUPERSAMPLE = 2  # shapes are drawn at 2x and box-filtered down, for smooth (anti-aliased) edges


@dataclasses.dataclass(frozen=True)
class SyntheticOptions:
    """Knobs of the renderer. Defaults are tuned to be learnable by a tiny model on a CPU."""
    image_size: tuple[int, int] = (112, 112)  # (width, height) in pixels
    min_objects: int = 1
    max_objects: int = 6
    # Distinct (colour, shape) kinds per scene, at least (up to 3, and never more than objects). With
    # 1, most scenes hold one kind and "point at every object" is right for them; 2 makes every
    # scene ask the model to pick the objects the question names.
    min_types: int = 1
    kinds: tuple[str, ...] = KINDS
    # Background colours drawn from (names of BACKGROUNDS). One plain colour removes a shortcut the
    # demo model took (naming objects' colour after the background's tint); the demo uses one
    # (scratch runs, two seeds each: pointing F1 0.43 and 0.42 vs 0.32 and 0.39 with all five;
    # docs/benchmarks.md).
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    kind_weights: tuple[float, ...] = (0.7, 0.15, 0.15)  # mix proportions, aligned with `kinds`
    pointing_per_image: int = 2  # `pointing` conversations per shapes image
    counting_per_image: int = 1  # `point_count` conversations per shapes image
    qa_per_image: int = 2  # `user_qa` conversations per shapes image
    absent_label_rate: float = 0.15  # chance that a pointing/counting label names an absent object
    clock_minute_step: int = 5  # clock minutes are multiples of this
    max_bars: int = 5  # bar charts have 3..max_bars bars
    # 0 = objects anywhere; N = object centres on the centres of an N x N grid of cells (one object
    # per cell). A grid aligned with the pooled image tokens makes pointing learnable by a tiny model
    # in minutes (the demo); free placement is the harder, more realistic setting.
    grid: int = 0

    def __post_init__(self):
        width, height = self.image_size
        problems = []
        if min(width, height) < 32 or max(width, height) > 2048:
            problems.append(f"image_size {self.image_size} must be within 32..2048 pixels per side")
        if not 1 <= self.min_objects <= self.max_objects <= 8:
            problems.append(f"need 1 <= min_objects ({self.min_objects}) <= max_objects ({self.max_objects}) <= 8")
        if not 1 <= self.min_types <= 3:
            problems.append(f"min_types ({self.min_types}) must be within 1..3")
        if not self.backgrounds or any(b not in BACKGROUNDS for b in self.backgrounds):
            problems.append(f"backgrounds {self.backgrounds} must be names from {tuple(BACKGROUNDS)}")
        if not self.kinds or any(k not in KINDS for k in self.kinds) or len(set(self.kinds)) != len(self.kinds):
            problems.append(f"kinds {self.kinds} must be distinct names from {KINDS}")
        if len(self.kind_weights) != len(self.kinds) or any(w < 0 for w in self.kind_weights) \
                or sum(self.kind_weights) <= 0:
            problems.append(f"kind_weights {self.kind_weights} must be one non-negative weight per kind")
        if min(self.pointing_per_image, self.counting_per_image, self.qa_per_image) < 0:
            problems.append("conversation counts per image must be >= 0")
        if not 0 <= self.absent_label_rate <= 1:
            problems.append(f"absent_label_rate {self.absent_label_rate} must be in [0, 1]")
        if self.clock_minute_step not in (1, 5, 15, 30):
            problems.append(f"clock_minute_step {self.clock_minute_step} must be 1, 5, 15 or 30")
        if not 3 <= self.max_bars <= len(COLOURS):
            problems.append(f"max_bars {self.max_bars} must be within 3..{len(COLOURS)}")
        if self.grid and not (2 <= self.grid <= 16 and self.grid * self.grid >= self.max_objects):
            problems.append(f"grid {self.grid} must be 0 or within 2..16 with grid^2 >= max_objects")
        if problems:
            raise ValueError("invalid SyntheticOptions: " + "; ".join(problems))


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image. Splits use disjoint seed sequences: (seed, split id, index)."""
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_IDS)}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed ({seed}) and index ({index}) must be >= 0")
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def render_example(options: SyntheticOptions, seed: int, split: str, index: int) -> dict:
    """One example: {"image": uint8 [H, W, 3], "message_list": [...], "metadata": {...}}."""
    rng = example_rng(seed, split, index)
    weights = np.asarray(options.kind_weights, np.float64)
    kind = options.kinds[int(rng.choice(len(options.kinds), p=weights / weights.sum()))]
    image, conversations, extra = _RENDERERS[kind](rng, options)
    height, width = image.shape[:2]
    metadata = {"kind": kind, "width": width, "height": height, "split": split, "index": index, "seed": seed}
    metadata.update(extra)
    metadata["point_targets"] = [
        {"conversation": i, "style": c["style"], "label": c["label"], "count": int(len(c["points"])),
         "points": [[round(float(x), 2), round(float(y), 2)] for x, y in c["points"]]}
        for i, c in enumerate(conversations) if "points" in c]
    return {"image": image, "message_list": conversations, "metadata": metadata}


# ---------------------------------------------------------------------------------------------
# Drawing helpers

def _background(rng, width, height, names=tuple(BACKGROUNDS)):
    """A pale colour with a linear gradient and low-frequency noise; returns (name, uint8 [H, W, 3])."""
    name = names[rng.integers(len(names))]
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (math.cos(angle) * (xs / width - 0.5) + math.sin(angle) * (ys / height - 0.5)) * 2
    coarse = rng.uniform(-1, 1, size=(5, 5)).astype(np.float32)  # upsampled: a soft texture, not grain
    texture = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))
    shade = rng.uniform(10, 22) * ramp + 8 * texture
    pixels = np.asarray(BACKGROUNDS[name], np.float32)[None, None, :] + shade[..., None]
    return name, np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _shape_polygon(shape, cx, cy, r, rotation):
    """Vertices of a shape of circumradius r centred on (cx, cy); None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        angles, radii = [45, 135, 225, 315], [r * 0.9] * 4
    elif shape == "triangle":
        angles, radii = [-90, 30, 150], [r * 1.1] * 3  # a triangle looks small next to a circle of equal r
    elif shape == "star":
        angles, radii = [-90 + 36 * k for k in range(10)], [r if k % 2 == 0 else r * 0.45 for k in range(10)]
    else:  # cross: a plus sign with arms of half-width 0.32 r
        t = 0.32
        corners = [(t, 1), (t, t), (1, t), (1, -t), (t, -t), (t, -1), (-t, -1), (-t, -t), (-1, -t), (-1, t),
                   (-t, t), (-t, 1)]
        angles = [math.degrees(math.atan2(y, x)) for x, y in corners]
        radii = [r * 0.95 * math.hypot(x, y) / math.hypot(1, t) for x, y in corners]
    return [(cx + rad * math.cos(math.radians(a + rotation)), cy + rad * math.sin(math.radians(a + rotation)))
            for a, rad in zip(angles, radii)]


class _Layer:
    """A transparent supersampled layer; `composite` box-filters it onto a background."""

    def __init__(self, width, height):
        self.image = Image.new("RGBA", (width * SUPERSAMPLE, height * SUPERSAMPLE), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.image)

    def shape(self, shape, cx, cy, r, rotation, fill, outline_width=1.5):
        s = SUPERSAMPLE
        line = max(1, round(outline_width * s))
        polygon = _shape_polygon(shape, cx * s, cy * s, r * s, rotation)
        if polygon is None:
            self.draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=fill + (255,),
                              outline=OUTLINE + (255,), width=line)
        else:
            self.draw.polygon(polygon, fill=fill + (255,), outline=OUTLINE + (255,), width=line)

    def line(self, x0, y0, x1, y1, width, fill):
        s = SUPERSAMPLE
        self.draw.line([(x0 * s, y0 * s), (x1 * s, y1 * s)], fill=fill + (255,), width=max(1, round(width * s)))

    def composite(self, background: np.ndarray) -> np.ndarray:
        height, width = background.shape[:2]
        small = self.image.resize((width, height), Image.Resampling.BOX)
        base = Image.fromarray(background, "RGB").convert("RGBA")
        return np.asarray(Image.alpha_composite(base, small).convert("RGB"))


def _plural(shape):
    return PLURALS.get(shape, shape + "s")


def _count_phrase(count, colour, shape):
    """'a red circle', 'two red circles'."""
    noun = f"{colour} {shape}" if colour else shape
    if count == 1:
        return f"a {noun}"
    return f"{NUMBER_WORDS[count]} {colour + ' ' if colour else ''}{_plural(shape)}"


def _join(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _position(x, y, width, height):
    """Coarse 3x3 position phrase, e.g. 'at the top left', 'in the center', 'on the right'."""
    col = "left" if x < width / 3 else "right" if x > 2 * width / 3 else "center"
    row = "top" if y < height / 3 else "bottom" if y > 2 * height / 3 else "middle"
    if row == "middle":
        return "in the center" if col == "center" else f"on the {col}"
    return f"at the {row}" if col == "center" else f"at the {row} {col}"


# ---------------------------------------------------------------------------------------------
# Shapes scenes

def _place_objects(rng, options, width, height):
    """Non-overlapping objects; an object that does not fit after many tries is left out."""
    short = min(width, height)
    n = int(rng.integers(options.min_objects, options.max_objects + 1))
    n_types = int(rng.integers(min(options.min_types, n, 3), min(n, 3) + 1))
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    types = [combos[i] for i in rng.choice(len(combos), size=n_types, replace=False)]
    assigned = types + [types[i] for i in rng.integers(0, n_types, size=n - n_types)]
    objects = []
    if options.grid:
        return _place_on_grid(rng, options, assigned, width, height)
    for colour, shape in assigned:
        size = "large" if rng.random() < 0.5 else "small"
        for attempt in range(60):
            if attempt == 30:
                size = "small"  # a crowded scene: try a smaller object before giving up
            r = short * (rng.uniform(0.12, 0.15) if size == "large" else rng.uniform(0.075, 0.095))
            cx = round(float(rng.uniform(r + 2, width - r - 2)), 1)
            cy = round(float(rng.uniform(r + 2, height - r - 2)), 1)
            if all(math.hypot(cx - o["x"], cy - o["y"]) > r + o["radius"] + 3 for o in objects):
                objects.append({"shape": shape, "colour": colour, "size": size, "x": cx, "y": cy,
                                "radius": round(float(r), 2), "rotation": round(float(rng.uniform(-15, 15)), 1)})
                break
    # Reading order (top band first, then left to right) makes captions list objects predictably.
    objects.sort(key=lambda o: (int(o["y"] * 3 // height), o["x"]))
    return objects


def _place_on_grid(rng, options, assigned, width, height):
    """One object per randomly chosen cell of an N x N grid, centred in the cell."""
    g = options.grid
    cw, ch = width / g, height / g
    cells = rng.permutation(g * g)[:len(assigned)]
    objects = []
    for (colour, shape), cell in zip(assigned, cells):
        size = "large" if rng.random() < 0.5 else "small"
        r = min(cw, ch) * (rng.uniform(0.36, 0.44) if size == "large" else rng.uniform(0.26, 0.32))
        cx, cy = round((cell % g + 0.5) * cw, 1), round((cell // g + 0.5) * ch, 1)
        objects.append({"shape": shape, "colour": colour, "size": size, "x": cx, "y": cy,
                        "radius": round(float(r), 2), "rotation": round(float(rng.uniform(-15, 15)), 1)})
    objects.sort(key=lambda o: (int(o["y"] * 3 // height), o["x"]))
    return objects


def _points(objects, keep):
    return np.asarray([[o["x"], o["y"]] for o in objects if keep(o)], np.float32).reshape(-1, 2)


def _shapes_texts(objects, bg_name, width, height):
    """Caption and transcript, naming the kinds in reading order and positions as 3x3 phrases."""
    def where(o):
        return _position(o["x"], o["y"], width, height)

    types = list(dict.fromkeys((o["colour"], o["shape"]) for o in objects))
    n = len(objects)
    sentences = [f"The image shows {NUMBER_WORDS[n]} shape{'s' if n > 1 else ''} on a {bg_name} background."]
    for colour, shape in types:
        members = [o for o in objects if (o["colour"], o["shape"]) == (colour, shape)]
        if len(members) == 1:
            o = members[0]
            sentences.append(f"There is a {o['size']} {colour} {shape} {where(o)}.")
        else:
            parts = [f"a {o['size']} one {where(o)}" for o in members]
            sentences.append(f"There are {_count_phrase(len(members), colour, shape)}: {_join(parts)}.")
    for shape in dict.fromkeys(s for _, s in types):
        colours = {c for c, s in types if s == shape}
        if len(colours) > 1:
            total = sum(o["shape"] == shape for o in objects)
            sentences.append(f"In total there are {NUMBER_WORDS[total]} {_plural(shape)}.")
    counts = [_count_phrase(sum((o["colour"], o["shape"]) == t for o in objects), *t) for t in types]
    verb = "there's" if counts[0].startswith("a ") else "there are"
    transcript = f"okay so on a {bg_name} background {verb} {_join(counts)}"
    return " ".join(sentences), transcript


def _point_conversations(rng, objects, style, how_many, absent_rate):
    """`how_many` pointing/counting conversations over distinct labels, some about absent objects."""
    present = {(o["colour"], o["shape"]) for o in objects}
    labels = {f"{c} {_plural(s)}": (lambda o, c=c, s=s: (o["colour"], o["shape"]) == (c, s)) for c, s in present}
    # A shape-only label ("circles") only where it differs from a colour label: shape in several colours.
    labels.update({_plural(s): (lambda o, s=s: o["shape"] == s)
                   for _, s in present if sum(s == t for _, t in present) > 1})
    names = sorted(labels)
    chosen = [names[i] for i in rng.permutation(len(names))[:how_many]]
    absent = sorted(f"{c} {_plural(s)}" for c in COLOURS for s in SHAPES if (c, s) not in present)
    conversations = []
    for name in chosen:
        if rng.random() < absent_rate:
            name, keep = absent[rng.integers(len(absent))], (lambda o: False)
        else:
            keep = labels[name]
        conversations.append({"style": style, "label": name, "points": _points(objects, keep), "point_scale": 0})
    return conversations


def _shape_questions(rng, objects, how_many):
    shape_counts = {s: sum(o["shape"] == s for o in objects) for s in SHAPES}
    colour_counts = {c: sum(o["colour"] == c for o in objects) for c in COLOURS}
    pool = [(f"What colour is the {o['shape']}?", o["colour"]) for o in objects if shape_counts[o["shape"]] == 1]
    pool += [(f"What shape is the {o['colour']} object?", o["shape"])
             for o in objects if colour_counts[o["colour"]] == 1]
    shape = SHAPES[rng.integers(len(SHAPES))]
    pool.append((f"How many {_plural(shape)} are there?", str(shape_counts[shape])))
    pool.append(("How many shapes are there?", str(len(objects))))
    colour, shape = list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
    exists = any((o["colour"], o["shape"]) == (colour, shape) for o in objects)
    pool.append((f"Is there a {colour} {shape}?", "Yes" if exists else "No"))
    picked = rng.permutation(len(pool))[:how_many]
    return [{"style": "user_qa", "question": pool[i][0], "answer": pool[i][1]} for i in sorted(picked)]


def _render_shapes(rng, options):
    width, height = options.image_size
    bg_name, background = _background(rng, width, height, options.backgrounds)
    objects = _place_objects(rng, options, width, height)
    layer = _Layer(width, height)
    for o in objects:
        layer.shape(o["shape"], o["x"], o["y"], o["radius"], o["rotation"], COLOURS[o["colour"]])
    caption, transcript = _shapes_texts(objects, bg_name, width, height)
    conversations = [{"style": "long_caption", "text": caption}, {"style": "transcript", "text": transcript}]
    conversations += _point_conversations(rng, objects, "pointing", options.pointing_per_image,
                                          options.absent_label_rate)
    conversations += _point_conversations(rng, objects, "point_count", options.counting_per_image,
                                          options.absent_label_rate)
    conversations += _shape_questions(rng, objects, options.qa_per_image)
    return layer.composite(background), conversations, {"background": bg_name, "objects": objects}


# ---------------------------------------------------------------------------------------------
# Clocks and bar charts

def _render_clock(rng, options):
    width, height = options.image_size
    bg_name, background = _background(rng, width, height, options.backgrounds)
    short = min(width, height)
    radius = short * 0.42
    cx = width / 2 + rng.uniform(-0.04, 0.04) * short
    cy = height / 2 + rng.uniform(-0.04, 0.04) * short
    face = list(CLOCK_FACES)[rng.integers(len(CLOCK_FACES))]
    hour = int(rng.integers(1, 13))
    minute = int(rng.integers(0, 60 // options.clock_minute_step)) * options.clock_minute_step
    layer = _Layer(width, height)
    layer.shape("circle", cx, cy, radius, 0, CLOCK_FACES[face], outline_width=max(1.5, short * 0.02))
    for tick in range(12):  # hour marks, thicker at 12, 3, 6 and 9
        a = math.radians(tick * 30 - 90)
        inner = 0.78 if tick % 3 == 0 else 0.85
        layer.line(cx + inner * radius * math.cos(a), cy + inner * radius * math.sin(a),
                   cx + 0.93 * radius * math.cos(a), cy + 0.93 * radius * math.sin(a),
                   short * (0.025 if tick % 3 == 0 else 0.012), OUTLINE)
    hands = (((hour % 12) + minute / 60) * 30, 0.5, 0.05), (minute * 6, 0.82, 0.025)  # degrees, length, width
    for degrees, length, hand_width in hands:
        a = math.radians(degrees - 90)
        layer.line(cx, cy, cx + length * radius * math.cos(a), cy + length * radius * math.sin(a),
                   short * hand_width, (20, 20, 20))
    layer.shape("circle", cx, cy, short * 0.03, 0, (20, 20, 20), outline_width=0.5)
    time = f"{hour}:{minute:02d}"
    minute_mark = minute // 5 if minute % 5 == 0 else None
    minute_text = (f"at the {minute_mark or 12}" if minute_mark is not None else f"at {minute} minutes")
    hour_text = f"at the {hour}" if minute == 0 else f"between the {hour} and the {hour % 12 + 1}"
    caption = (f"An analog clock with a {face} face on a {bg_name} background. The short hour hand points "
               f"{hour_text} and the long minute hand points {minute_text}. "
               f"The time shown is {time}.")
    conversations = [{"style": "long_caption", "text": caption},
                     {"style": "transcript", "text": f"so this is a clock with a {face} face and it says {time}"},
                     {"style": "clocks", "question": "What time is being shown?", "answer": time}]
    return layer.composite(background), conversations, {"background": bg_name, "hour": hour, "minute": minute,
                                                        "time": time, "center": [round(cx, 2), round(cy, 2)],
                                                        "radius": round(radius, 2)}


_FONT_CACHE: dict[int, ImageFont.FreeTypeFont] = {}


def _font(size):
    if size not in _FONT_CACHE:
        _FONT_CACHE[size] = ImageFont.load_default(size=size)
    return _FONT_CACHE[size]


def _render_chart(rng, options):
    width, height = options.image_size
    n = int(rng.integers(3, options.max_bars + 1))
    names = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), size=n, replace=False)]
    values = [int(v) for v in rng.choice(np.arange(1, 11), size=n, replace=False)]  # distinct: unique max/min
    image = Image.new("RGB", (width, height), (250, 250, 248))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = width * 0.17, width * 0.96, height * 0.07, height * 0.9
    unit = (bottom - top) / 10
    font = _font(max(7, round(min(width, height) * 0.08)))
    for v in range(11):  # a grid line per unit, so that values can be read off
        y = bottom - v * unit
        draw.line([(left, y), (right, y)], fill=(200, 200, 200) if v else OUTLINE, width=1)
        if v % 5 == 0:
            draw.text((left - 2, y), str(v), fill=OUTLINE, font=font, anchor="rm")
    draw.line([(left, top), (left, bottom)], fill=OUTLINE, width=1)
    slot = (right - left) / n
    for k, (name, value) in enumerate(zip(names, values)):
        x0 = left + slot * (k + 0.2)
        draw.rectangle([x0, bottom - value * unit, x0 + slot * 0.6, bottom - 1], fill=COLOURS[name], outline=OUTLINE)
    tallest, shortest = names[int(np.argmax(values))], names[int(np.argmin(values))]
    asked = int(rng.integers(n))
    qas = [("Which bar is the tallest?", tallest), ("Which bar is the shortest?", shortest),
           (f"What is the value of the {names[asked]} bar?", str(values[asked])), ("How many bars are there?", str(n))]
    bars = ", ".join(f"the {c} bar {v}" for c, v in zip(names, values))
    caption = (f"A bar chart with {NUMBER_WORDS[n]} bars on a white background, from left to right: {bars}. "
               f"The tallest bar is {tallest} and the shortest bar is {shortest}.")
    conversations = [{"style": "long_caption", "text": caption},
                     {"style": "transcript", "text": f"a bar chart with {NUMBER_WORDS[n]} bars and the {tallest} "
                                                     f"one is the tallest"}]
    conversations += [{"style": "pixmo_docs_charts", "question": q, "answer": a} for q, a in qas]
    return np.asarray(image), conversations, {"bars": [{"colour": c, "value": v} for c, v in zip(names, values)]}


_RENDERERS = {"shapes": _render_shapes, "clock": _render_clock, "chart": _render_chart}


def parse_options(text: str) -> SyntheticOptions:
    """Options from "key=value,key=value" (config files, command lines). Tuples use "+":
    "grid=4,max_objects=4,image_size=112,kinds=shapes+clock,kind_weights=0.9+0.1"."""
    fields = {f.name: f for f in dataclasses.fields(SyntheticOptions)}
    changes = {}
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in fields or not value:
            raise ValueError(f"synthetic options: bad item {item!r} (known keys: {', '.join(fields)})")
        parts = [v.strip() for v in value.split("+")]
        if key == "image_size":
            parts = parts * 2 if len(parts) == 1 else parts
            changes[key] = tuple(int(v) for v in parts)
        elif key in ("kinds", "backgrounds"):
            changes[key] = tuple(parts)
        elif key == "kind_weights":
            changes[key] = tuple(float(v) for v in parts)
        else:
            default = getattr(SyntheticOptions, key)
            changes[key] = type(default)(float(value)) if isinstance(default, int) else type(default)(value)
    if "kinds" in changes and "kind_weights" not in changes:
        changes["kind_weights"] = (1.0,) * len(changes["kinds"])
    return dataclasses.replace(SyntheticOptions(), **changes)
