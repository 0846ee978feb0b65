#!/usr/bin/env python3
"""The miniature world of the pack's demo model: procedurally drawn scenes and their prompts.

Every image is a 64 x 64 RGB scene of one object (or two, for the two-object prompts) drawn with PIL on
a neutral background, with a caption from templates like paper 1's PromptSet:

    "a {colour} {shape}"               plain (solid) object ("an" before a vowel: "an orange star")
    "a {texture} {shape}"              textured object of an unnamed (random) colour
    "a {colour} {texture} {shape}"     textured object, colour named
    "a {shape}"                        plain object of an unnamed colour
    "a {colour} {shape} and a {colour} {shape}"   two plain objects

Vocabulary: 8 colours, 6 shapes, 3 textures (plus plain), 6 background tones (with jitter and optional
gradients); object size 24..48 px (18..28 px each in two-object scenes), random position and rotation.

Signs (the v2 world, ``sign_rate`` > 0): a coloured plate carrying one upper-case word of :data:`WORDS` (each
one CLIP BPE token) in one of :data:`FONTS`, alone or below / above one plain object. The word's text box is
:data:`SIGN_TEXT_WIDTH` px wide (two 8-px latent cells a letter) and starts on the 8-px latent grid, so a word has a few
latent codes, not one per sub-pixel shift:

    'a sign that says "CAT"'           plate of an unnamed (random) colour
    'a {colour} sign that says "CAT"'  plate colour named
    'a {colour} {shape} and a sign that says "CAT"'

Held-out set: the (colour, shape) pairs of :data:`HELD_OUT_COLOUR_SHAPE` and the (texture, shape) pairs of
:data:`HELD_OUT_TEXTURE_SHAPE` never occur in the ``train`` split -- not in any caption and not in any
image, not even with the attribute left unnamed -- so prompts naming them test composition. Likewise the
(word, plate colour) pairs of :data:`HELD_OUT_WORD_COLOUR` and the (word, companion shape) pairs of
:data:`HELD_OUT_WORD_SHAPE`.

Everything is deterministic: sample ``index`` of split ``split`` with world seed ``seed`` is drawn from
``random.Random(f"{seed}:{split}:{index}")`` (string seeds hash with SHA-512: the same on every machine
and Python version) and rendered with PIL at 4x and downsampled (box filter).

Importable without ComfyUI (only PIL and numpy). ``python scripts/mini_world.py --grid out.png`` writes a
preview grid of training samples with their captions.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import random
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 64  # image side in pixels (8 x 8 latents at the autoencoder's 8 x compression)
SUPERSAMPLE = 4  # drawn at SIZE * SUPERSAMPLE, then box-filtered down (anti-aliasing)
WORLD_SEED = 20250101

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 140, 25),
    "yellow": (240, 215, 35),
    "green": (45, 165, 60),
    "cyan": (35, 200, 215),
    "blue": (35, 70, 215),
    "purple": (135, 50, 185),
    "pink": (245, 125, 185),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross")
TEXTURES: tuple[str, ...] = ("striped", "dotted", "checkered")
PLAIN = "plain"
ALL_TEXTURES: tuple[str, ...] = (PLAIN, *TEXTURES)  # judge texture classes (index 0 = plain)
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (236, 236, 236), (196, 196, 196), (128, 128, 128), (64, 64, 64), (24, 24, 28), (222, 212, 188))

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

# held out of the train split everywhere (each colour once, each shape at least once)
HELD_OUT_COLOUR_SHAPE: frozenset[tuple[str, str]] = frozenset(
    (c, SHAPES[i % len(SHAPES)]) for i, c in enumerate(COLOUR_NAMES))
HELD_OUT_TEXTURE_SHAPE: frozenset[tuple[str, str]] = frozenset(
    {("striped", "triangle"), ("dotted", "star"), ("checkered", "heart")})

# sign words: 3 letters, each a single CLIP BPE token (lower-cased by the tokenizer), none a world word
WORDS: tuple[str, ...] = ("CAT", "DOG", "SUN", "BUS", "CAR", "BOX", "HAT", "PEN", "CUP", "KEY", "MAP", "EGG",
                          "FOX", "OWL", "BEE", "ZOO", "TOY", "JAM", "ICE", "SKY", "NET", "BAG", "BED", "PIG")
# bold faces of Debian's fonts-dejavu-core: a proportional and a monospaced one (Liberation Sans Bold, also tried,
# survived the autoencoder worst: docs/mini_model_card.md, "v2 world")
FONT_DIR = Path("/usr/share/fonts/truetype")
FONTS: dict[str, str] = {"dejavu_sans": "dejavu/DejaVuSans-Bold.ttf", "dejavu_mono": "dejavu/DejaVuSansMono-Bold.ttf"}
# the width of the word's text box (PIL's: from the pen to the ink's right edge, ink top to bottom) at 64 px:
# 6 latent cells, 2 a letter; the font size follows (capitals 13.5..20.5 px tall)
SIGN_TEXT_WIDTH = 48.0
LATENT_CELL = 8  # px at 64 px: the text box's top-left corner lies on this grid
SIGN_PAD = 3.5  # plate margin around the word, px at 64 px
# a word no caption of the world uses (a single CLIP token too): the word a LoRA on the text layers is taught
# (scripts/eval_mini.py, part lora)
NEW_WORD = "COW"
HELD_OUT_WORD_COLOUR: frozenset[tuple[str, str]] = frozenset(
    (w, COLOUR_NAMES[i % len(COLOUR_NAMES)]) for i, w in enumerate(WORDS))
HELD_OUT_WORD_SHAPE: frozenset[tuple[str, str]] = frozenset(
    (w, SHAPES[(i // 4 + i) % len(SHAPES)]) for i, w in enumerate(WORDS))
SIGN_WITH_OBJECT_RATE = 0.35  # share of sign scenes that also show an object

SPLITS = ("train", "heldout", "all")
TWO_OBJECT_RATE = 0.12  # share of two-object scenes in the train split
TEXTURED_RATE = 0.5  # share of textured single objects


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    texture: str  # PLAIN or one of TEXTURES
    cx: float  # centre, pixels of the SIZE x SIZE image
    cy: float
    size: float  # bounding-circle diameter in pixels
    angle: float  # degrees
    rgb: tuple[int, int, int]  # jittered colour
    pattern_angle: int  # stripe orientation (0, 45, 90, 135)
    pattern_phase: float  # 0..1


@dataclasses.dataclass(frozen=True)
class Sign:
    word: str  # one of WORDS
    colour: str  # plate colour name
    rgb: tuple[int, int, int]  # jittered plate colour
    ink: tuple[int, int, int]  # word colour: dark on light plates, white on dark ones
    font: str  # key of FONTS
    cx: float  # centre, pixels of the SIZE x SIZE image
    cy: float
    text_px: float  # font size (em) of the word


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: tuple[int, int, int]
    gradient: tuple[float, float] | None  # (direction degrees, amplitude) or None
    prompt: str
    sign: Sign | None = None

    @property
    def labels(self) -> tuple[int, int, int]:
        """(colour, shape, texture) class indices of the first object (the judge's targets)."""
        o = self.objects[0]
        return COLOUR_NAMES.index(o.colour), SHAPES.index(o.shape), ALL_TEXTURES.index(o.texture)


def is_held_out(colour: str | None, shape: str, texture: str | None = None) -> bool:
    return (colour, shape) in HELD_OUT_COLOUR_SHAPE or (texture, shape) in HELD_OUT_TEXTURE_SHAPE


def sign_is_held_out(word: str, colour: str | None, shape: str | None) -> bool:
    return (word, colour) in HELD_OUT_WORD_COLOUR or (word, shape) in HELD_OUT_WORD_SHAPE


def scene_is_held_out(scene: Scene) -> bool:
    sign = scene.sign
    shape = scene.objects[0].shape if scene.objects else None
    return any(is_held_out(o.colour, o.shape, o.texture) for o in scene.objects) or \
        (sign is not None and sign_is_held_out(sign.word, sign.colour, shape))


# ----------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------
def caption(colour: str | None, shape: str, texture: str | None = None) -> str:
    words = ([colour] if colour else []) + ([texture] if texture and texture != PLAIN else []) + [shape]
    return " ".join(["an" if words[0][0] in "aeiou" else "a"] + words)


def sign_caption(word: str, colour: str | None = None, obj: tuple[str, str] | None = None) -> str:
    """'a [colour] sign that says "WORD"', after 'a {colour} {shape} and ' when ``obj`` = (colour, shape)."""
    text = f'{caption(colour, "sign")} that says "{word}"'
    return f"{caption(*obj)} and {text}" if obj else text


_SIGN_PART = re.compile(r'^an? (?:(\w+) )?sign that says "(\w+)"$')


def _parse_sign(part: str, prompt: str) -> dict:
    m = _SIGN_PART.match(part)
    if not m or m.group(2).upper() not in WORDS or (m.group(1) and m.group(1) not in COLOURS):
        raise ValueError(f'prompt {prompt!r}: a sign must read \'a [colour] sign that says "WORD"\' with WORD one of '
                         f"{', '.join(WORDS)}.")
    return {"sign": m.group(2).upper(), "colour": m.group(1)}


def parse_prompt(prompt: str) -> list[dict]:
    """Inverse of the templates: one dict (colour, texture, shape; None where unnamed) per object, and for a
    sign {"sign": WORD, "colour": plate colour or None}. Raises ValueError for text outside the world's
    vocabulary."""
    objs = []
    for part in prompt.strip().lower().split(" and "):
        if " sign that says " in part:
            objs.append(_parse_sign(part.strip(), prompt))
            continue
        words = part.split()
        if not words or words[0] not in ("a", "an"):
            raise ValueError(f"prompt {prompt!r}: each object must start with 'a' (template 'a [colour] [texture] shape').")
        words = words[1:]
        if not words or words[-1] not in SHAPES:
            raise ValueError(f"prompt {prompt!r}: each object must end with a shape, one of {', '.join(SHAPES)}.")
        d = {"shape": words[-1], "colour": None, "texture": None}
        for w in words[:-1]:
            if w in COLOURS and d["colour"] is None:
                d["colour"] = w
            elif w in TEXTURES and d["texture"] is None:
                d["texture"] = w
            else:
                raise ValueError(f"prompt {prompt!r}: unknown or repeated word {w!r}; colours: {', '.join(COLOURS)}; "
                                 f"textures: {', '.join(TEXTURES)}.")
        objs.append(d)
    signs = [i for i, d in enumerate(objs) if "sign" in d]
    if signs and (signs != [len(objs) - 1] or len(objs) > 2 or (len(objs) == 2 and objs[0]["texture"])):
        raise ValueError(f"prompt {prompt!r}: a sign comes last, once, after at most one plain object: "
                         f'\'a [colour] sign that says "WORD"\' or \'a [colour] shape and a [colour] sign that says '
                         f'"WORD"\'.')
    return objs


def single_prompts(split: str = "all") -> list[str]:
    """Every single-object caption of a split ('train': naming no held-out pair; 'heldout': naming one)."""
    _check_split(split)
    out = []
    for s in SHAPES:
        cands = [(c, None) for c in COLOURS] + [(None, t) for t in TEXTURES] + \
                [(c, t) for c in COLOURS for t in TEXTURES] + [(None, None)]
        for c, t in cands:
            held = is_held_out(c, s, t)
            if split == "all" or (split == "train") != held:
                out.append(caption(c, s, t))
    return out


def heldout_eval_prompts() -> list[str]:
    """The held-out prompts the quality measurement uses: 'a {colour} {shape}' for every held-out
    (colour, shape) pair and 'a {texture} {shape}' for every held-out (texture, shape) pair."""
    return sorted(caption(c, s) for c, s in HELD_OUT_COLOUR_SHAPE) + \
        sorted(caption(None, s, t) for t, s in HELD_OUT_TEXTURE_SHAPE)


def sign_prompts(split: str = "all") -> list[str]:
    """Every sign caption of a split ('train': naming no held-out pair; 'heldout': naming one)."""
    _check_split(split)
    objects = [None] + [(c, s) for c in COLOUR_NAMES for s in SHAPES if not is_held_out(c, s)]
    out = []
    for word in WORDS:
        for obj in objects:
            for colour in (None, *COLOUR_NAMES):
                if obj is not None and colour == obj[0]:
                    continue  # the sampler never gives the plate its object's colour
                held = sign_is_held_out(word, colour, obj[1] if obj else None)
                if split == "all" or (split == "train") != held:
                    out.append(sign_caption(word, colour, obj))
    return out


def heldout_sign_prompts() -> list[str]:
    """The sign prompts the word-accuracy measurement uses: 'a {colour} sign that says "WORD"' for every
    held-out (word, colour) pair and 'a {colour} {shape} and a sign that says "WORD"' for every held-out
    (word, shape) pair (the object's colour: the first one not held out with that shape)."""
    out = [sign_caption(w, c) for w, c in sorted(HELD_OUT_WORD_COLOUR)]
    for w, s in sorted(HELD_OUT_WORD_SHAPE):
        colour = next(c for c in COLOUR_NAMES[(WORDS.index(w) + 3) % 8:] + COLOUR_NAMES if not is_held_out(c, s))
        out.append(sign_caption(w, None, (colour, s)))
    return out


def seen_sign_prompts() -> list[str]:
    """One trained sign prompt per word ('a {colour} sign that says "WORD"', a colour not held out with it): the
    control set of the word measurements."""
    return [sign_caption(word, COLOUR_NAMES[(i + 4) % len(COLOUR_NAMES)]) for i, word in enumerate(WORDS)]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}.")


# ----------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------
def _jitter(rgb, rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)


def _pick_attributes(rng: random.Random, split: str, texture_allowed: bool = True):
    """(colour, shape, texture) drawn uniformly among the combinations the split allows."""
    while True:
        shape = rng.choice(SHAPES)
        colour = rng.choice(COLOUR_NAMES)
        texture = rng.choice(TEXTURES) if texture_allowed and rng.random() < TEXTURED_RATE else PLAIN
        held = is_held_out(colour, shape, texture)
        if split == "all" or (split == "train") != held:
            return colour, shape, texture


def _make_obj(rng, colour, shape, texture, cx, cy, size) -> Obj:
    angle = 0.0 if shape == "circle" else rng.uniform(-15.0, 15.0)
    return Obj(shape=shape, colour=colour, texture=texture, cx=cx, cy=cy, size=size, angle=angle,
               rgb=_jitter(COLOURS[colour], rng, 14), pattern_angle=rng.choice((0, 45, 90, 135)),
               pattern_phase=rng.random())


def _background(rng):
    bg = _jitter(rng.choice(BACKGROUNDS), rng, 10)
    grad = (rng.uniform(0, 360), rng.uniform(10, 28)) if rng.random() < 0.5 else None
    return bg, grad


def sample_scene(rng: random.Random, split: str = "train", two_object_rate: float | None = None,
                 sign_rate: float = 0.0) -> Scene:
    """A random scene of ``split`` ('train': no held-out combination anywhere; 'heldout': the (first)
    object or the sign is a held-out combination, named in the caption; 'all': anything). A share
    ``sign_rate`` of the scenes shows a sign (0: the v1 world, drawn exactly as before)."""
    _check_split(split)
    rate = TWO_OBJECT_RATE if two_object_rate is None else two_object_rate
    bg, grad = _background(rng)
    if sign_rate and rng.random() < sign_rate:
        return _sign_scene(rng, split, bg, grad)
    if split != "heldout" and rng.random() < rate:
        return _two_object_scene(rng, split, bg, grad)
    colour, shape, texture = _pick_attributes(rng, split)
    size = rng.uniform(24.0, 48.0)
    r = size / 2 + 1
    obj = _make_obj(rng, colour, shape, texture, rng.uniform(r, SIZE - r), rng.uniform(r, SIZE - r), size)
    if split == "heldout":  # name the held-out attribute(s)
        name_c = (colour, shape) in HELD_OUT_COLOUR_SHAPE or rng.random() < 0.5
        name_t = (texture, shape) in HELD_OUT_TEXTURE_SHAPE or (texture != PLAIN and rng.random() < 0.5)
    elif texture == PLAIN:
        name_c, name_t = rng.random() < 0.92, False
    else:
        name_c, name_t = rng.random() < 0.5, True
    prompt = caption(colour if name_c else None, shape, texture if name_t else None)
    return Scene((obj,), bg, grad, prompt)


def _two_object_scene(rng, split, bg, grad) -> Scene:
    while True:
        a = _pick_attributes(rng, split, texture_allowed=False)
        b = _pick_attributes(rng, split, texture_allowed=False)
        if a[0] != b[0] and a[1] != b[1]:
            break
    horizontal = rng.random() < 0.5
    objs = []
    for k, (colour, shape, texture) in enumerate((a, b)):
        size = rng.uniform(18.0, 28.0)
        r = size / 2 + 1
        # each object in its own half: the two never overlap
        lo, hi = (r, SIZE / 2 - r + 1) if k == 0 else (SIZE / 2 + r - 1, SIZE - r)
        along, across = rng.uniform(lo, max(lo, hi)), rng.uniform(r, SIZE - r)
        cx, cy = (along, across) if horizontal else (across, along)
        objs.append(_make_obj(rng, colour, shape, texture, cx, cy, size))
    if rng.random() < 0.5:
        objs.reverse()  # the caption's order is not the spatial order
    prompt = " and ".join(caption(o.colour, o.shape) for o in objs)
    return Scene(tuple(objs), bg, grad, prompt)


def _sign_scene(rng, split, bg, grad) -> Scene:
    """A sign, alone or with one plain object (drawn from the train pairs), whose (word, plate colour) and
    (word, object shape) pairs fit the split."""
    with_obj = rng.random() < SIGN_WITH_OBJECT_RATE
    while True:
        word, colour = rng.choice(WORDS), rng.choice(COLOUR_NAMES)
        obj = _pick_attributes(rng, "train", texture_allowed=False)[:2] if with_obj else None
        if obj is not None and obj[0] == colour:
            continue
        held = sign_is_held_out(word, colour, obj[1] if obj else None)
        if split == "all" or (split == "train") != held:
            break
    # a held-out scene names its held-out pair: the plate colour when that is the pair, else at random
    name_colour = (split == "heldout" and (word, colour) in HELD_OUT_WORD_COLOUR) or rng.random() < 0.6
    prompt = sign_caption(word, colour if name_colour else None, obj)
    return _layout_sign(rng, word, colour, obj, bg, grad, prompt)


def _layout_sign(rng, word, colour, obj, bg, grad, prompt) -> Scene:
    """Centre the word across the image with its text box's top on the latent grid, at random among the rows that
    keep the plate inside the image (its half when an object shares the image: the object takes the other)."""
    font = rng.choice(tuple(FONTS))
    text_px = fit_text_px(word, font, SIGN_TEXT_WIDTH)
    w, h = sign_size(word, font, text_px)
    rgb = _jitter(COLOURS[colour], rng, 14)
    ink = (24, 24, 24) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 150 else (248, 248, 248)
    objects: tuple[Obj, ...] = ()
    lo, hi = 0.0, SIZE - 0.5  # the rows the plate may use
    if obj is not None:
        top = rng.random() < 0.5  # the sign's half
        lo, hi = (0.0, SIZE / 2) if top else (SIZE / 2, float(SIZE))
        size = rng.uniform(18.0, 26.0)
        r = size / 2 + 1
        olo = SIZE / 2 if top else 0.0
        objects = (_make_obj(rng, obj[0], obj[1], PLAIN, rng.uniform(r, SIZE - r), rng.uniform(olo + r, olo + SIZE / 2 - r),
                             size),)
    rows = [y for y in range(LATENT_CELL, SIZE, LATENT_CELL) if lo <= y - SIGN_PAD and y - SIGN_PAD + h <= hi]
    top_ink = rng.choice(rows)
    sign = Sign(word=word, colour=colour, rgb=rgb, ink=ink, font=font, cx=SIZE / 2, cy=top_ink - SIGN_PAD + h / 2,
                text_px=text_px)
    return Scene(objects, bg, grad, prompt, sign)


def scene_for_prompt(prompt: str, rng: random.Random) -> Scene:
    """A scene matching ``prompt`` (unnamed attributes drawn at random; unnamed texture = plain)."""
    parsed = parse_prompt(prompt)
    bg, grad = _background(rng)
    if "sign" in parsed[-1]:
        sign = parsed[-1]
        obj = (parsed[0]["colour"] or rng.choice(COLOUR_NAMES), parsed[0]["shape"]) if len(parsed) == 2 else None
        colour = sign["colour"] or rng.choice([c for c in COLOUR_NAMES if not obj or c != obj[0]])
        return _layout_sign(rng, sign["sign"], colour, obj, bg, grad, prompt)
    objs = []
    n = len(parsed)
    for k, d in enumerate(parsed):
        colour = d["colour"] or rng.choice(COLOUR_NAMES)
        texture = d["texture"] or PLAIN
        if n == 1:
            size = rng.uniform(24.0, 48.0)
            r = size / 2 + 1
            cx, cy = rng.uniform(r, SIZE - r), rng.uniform(r, SIZE - r)
        else:
            size = rng.uniform(18.0, 28.0)
            r = size / 2 + 1
            cx = (k + 0.5) * SIZE / n
            cy = rng.uniform(r, SIZE - r)
        objs.append(_make_obj(rng, colour, d["shape"], texture, cx, cy, size))
    return Scene(tuple(objs), bg, grad, prompt)


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------
def _rotate(points, cx, cy, angle_deg):
    a = math.radians(angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in points]


def shape_polygon(shape: str, r: float) -> list[tuple[float, float]] | None:
    """Polygon of ``shape`` centred at 0 with bounding radius ``r`` (None: circle, drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        h = r / math.sqrt(2) * 0.98
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape == "triangle":
        return [(r * math.cos(math.radians(-90 + 120 * k)), r * math.sin(math.radians(-90 + 120 * k)) + r * 0.18)
                for k in range(3)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            a = math.radians(-90 + 36 * k)
            pts.append((rad * math.cos(a), rad * math.sin(a) + r * 0.06))
        return pts
    if shape == "heart":
        pts = []
        for k in range(64):
            t = 2 * math.pi * k / 64
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x * r / 17.0, (y + 2.5) * r / 17.0))
        return pts
    if shape == "cross":
        w = r * 0.36
        return [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w),
                (-w, -w)]
    raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")


def _pattern(obj: Obj, n: int) -> Image.Image:
    """The object's fill at n x n (supersampled): plain colour or a texture of colour and a dark shade."""
    base = Image.new("RGB", (n, n), obj.rgb)
    if obj.texture == PLAIN:
        return base
    dark = tuple(int(v * 0.3) for v in obj.rgb)
    period = 8 * SUPERSAMPLE  # 8 px at 64 x 64 = one latent cell
    d = ImageDraw.Draw(base)
    off = obj.pattern_phase * period
    if obj.texture == "striped":
        a = math.radians(obj.pattern_angle)
        ux, uy = math.cos(a), math.sin(a)  # stripe normal
        span = int(n * 1.5 / period) + 2
        for k in range(-span, span):
            c0 = k * period + off
            c1 = c0 + period / 2
            # band between c0 and c1 along the normal, long along the tangent
            pts = []
            for c, sgn in ((c0, -1), (c0, 1), (c1, 1), (c1, -1)):
                px = n / 2 + ux * c - uy * sgn * n
                py = n / 2 + uy * c + ux * sgn * n
                pts.append((px, py))
            d.polygon(pts, fill=dark)
    elif obj.texture == "dotted":
        rad = 2.2 * SUPERSAMPLE
        for yy in range(-1, n // period + 2):
            for xx in range(-1, n // period + 2):
                x = xx * period + off
                y = yy * period + off
                d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=dark)
    elif obj.texture == "checkered":
        half = period / 2
        for yy in range(-1, int(n / half) + 2):
            for xx in range(-1, int(n / half) + 2):
                if (xx + yy) % 2 == 0:
                    x, y = xx * half + off / 2, yy * half + off / 2
                    d.rectangle([x, y, x + half - 1, y + half - 1], fill=dark)
    else:
        raise ValueError(f"unknown texture {obj.texture!r}")
    return base


def _background_image(scene: Scene, n: int) -> Image.Image:
    bg = np.array(scene.background, dtype=np.float32)
    if scene.gradient is None:
        arr = np.broadcast_to(bg, (n, n, 3)).copy()
    else:
        direction, amp = scene.gradient
        a = math.radians(direction)
        ys, xs = np.mgrid[0:n, 0:n].astype(np.float32) / (n - 1) - 0.5
        ramp = (xs * math.cos(a) + ys * math.sin(a)) * 2 * amp  # -amp..amp
        arr = bg[None, None, :] + ramp[..., None]
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


@functools.lru_cache(maxsize=64)
def _font(name: str, px: int) -> ImageFont.FreeTypeFont:
    path = FONT_DIR / FONTS[name]
    if not path.exists():
        raise FileNotFoundError(f"the mini world's sign font {path} is missing: install Debian's fonts-dejavu-core "
                                f"(apt-get install fonts-dejavu-core).")
    return ImageFont.truetype(str(path), px)


def _text_box(word: str, font: str, px: float) -> tuple[int, int, int, int]:
    """The word's ink box (x0, y0, x1, y1) at font size ``px`` (rounded: drawing uses whole pixel sizes)."""
    return _font(font, max(1, round(px))).getbbox(word)


def fit_text_px(word: str, font: str, ink_width: float) -> float:
    """The font size (em, px at 64 px) at which ``word`` is ``ink_width`` px wide."""
    x0, _, x1, _ = _text_box(word, font, 100 * SUPERSAMPLE)
    return 100.0 * ink_width / ((x1 - x0) / SUPERSAMPLE)


def sign_size(word: str, font: str, text_px: float) -> tuple[float, float]:
    """(width, height) of the sign's plate at 64 px: the word's ink box plus :data:`SIGN_PAD` on each side."""
    x0, y0, x1, y1 = _text_box(word, font, text_px * SUPERSAMPLE)
    return (x1 - x0) / SUPERSAMPLE + 2 * SIGN_PAD, (y1 - y0) / SUPERSAMPLE + 2 * SIGN_PAD


def sign_cells(scene: Scene, cell: int = LATENT_CELL) -> np.ndarray:
    """The share of each ``cell`` x ``cell`` px cell (a latent pixel at 8) that the sign's plate covers:
    float32 [SIZE // cell, SIZE // cell]; zeros without a sign."""
    n = SIZE // cell
    out = np.zeros((n, n), np.float32)
    if scene.sign is None:
        return out
    w, h = sign_size(scene.sign.word, scene.sign.font, scene.sign.text_px)
    edges = np.arange(n + 1, dtype=np.float64) * cell
    cover_x = np.clip(np.minimum(edges[1:], scene.sign.cx + w / 2) - np.maximum(edges[:-1], scene.sign.cx - w / 2), 0, cell)
    cover_y = np.clip(np.minimum(edges[1:], scene.sign.cy + h / 2) - np.maximum(edges[:-1], scene.sign.cy - h / 2), 0, cell)
    return (np.outer(cover_y, cover_x) / cell**2).astype(np.float32)


def _draw_sign(img: Image.Image, sign: Sign, k: float) -> None:
    """The plate (rounded rectangle) and the word centred on it, at scale ``k`` of the 64 px geometry."""
    px = sign.text_px * k
    x0, y0, x1, y1 = _text_box(sign.word, sign.font, px)
    w, h = sign_size(sign.word, sign.font, sign.text_px)
    cx, cy = sign.cx * k, sign.cy * k
    d = ImageDraw.Draw(img)
    d.rounded_rectangle([cx - w * k / 2, cy - h * k / 2, cx + w * k / 2, cy + h * k / 2], radius=2 * k, fill=sign.rgb)
    d.text((cx - (x1 + x0) / 2, cy - (y1 + y0) / 2), sign.word, font=_font(sign.font, max(1, round(px))),
           fill=sign.ink)


def render(scene: Scene, size: int = SIZE) -> Image.Image:
    """The scene as a ``size`` x ``size`` RGB PIL image (drawn at 4x, box-filtered down)."""
    n = size * SUPERSAMPLE
    k = n / SIZE
    img = _background_image(scene, n)
    for obj in scene.objects:
        mask = Image.new("L", (n, n), 0)
        d = ImageDraw.Draw(mask)
        cx, cy, r = obj.cx * k, obj.cy * k, obj.size / 2 * k
        poly = shape_polygon(obj.shape, r)
        if poly is None:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            d.polygon(_rotate(poly, cx, cy, obj.angle), fill=255)
        img.paste(_pattern(obj, n), (0, 0), mask)
    if scene.sign is not None:
        _draw_sign(img, scene.sign, k)
    return img.resize((size, size), Image.Resampling.BOX)


# ----------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------
def sample(index: int, split: str = "train", seed: int = WORLD_SEED, two_object_rate: float | None = None,
           sign_rate: float = 0.0) -> Scene:
    """Scene ``index`` of ``split`` for world seed ``seed`` (deterministic, independent of other indices)."""
    _check_split(split)
    rng = random.Random(f"{seed}:{split}:{index}")
    return sample_scene(rng, split, two_object_rate, sign_rate)


def make_dataset(n: int, split: str = "train", seed: int = WORLD_SEED, start: int = 0,
                 two_object_rate: float | None = None, sign_rate: float = 0.0) -> tuple[np.ndarray, list[Scene]]:
    """``n`` samples (indices start..start+n-1): uint8 images [n, SIZE, SIZE, 3] and their scenes."""
    scenes = [sample(start + i, split, seed, two_object_rate, sign_rate) for i in range(n)]
    images = np.stack([np.asarray(render(s), dtype=np.uint8) for s in scenes]) if scenes else \
        np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return images, scenes


def check_new_word(word: str) -> str:
    """``word`` if it can be taught as a new word (three upper-case letters, not one of WORDS), else ValueError."""
    if word in WORDS or not re.fullmatch(r"[A-Z]{3}", word):
        raise ValueError(f"word {word!r}: give three upper-case letters that are not a world word ({', '.join(WORDS)}).")
    return word


def new_word_test_objects() -> list[tuple[str, str]]:
    """The four (colour, shape) objects a taught word is tested beside (eval_mini's lora part);
    new_word_dataset never draws them."""
    return [(c, s) for c in COLOUR_NAMES for s in SHAPES if not is_held_out(c, s)][::9][:4]


def _new_word_object(rng: random.Random, plate: str) -> tuple[str, str]:
    """A plain trained object for a new-word scene: not the plate's colour, not one of the test objects."""
    test = set(new_word_test_objects())
    while True:
        obj = _pick_attributes(rng, "train", texture_allowed=False)[:2]
        if obj[0] != plate and obj not in test:
            return obj


def new_word_dataset(n: int, word: str = NEW_WORD, seed: int = WORLD_SEED,
                     object_rate: float = 0.0) -> tuple[np.ndarray, list[Scene]]:
    """``n`` scenes of a sign that says ``word``, a word outside WORDS (plate colour named in 60 % of the captions,
    as in training), alone or, in ``object_rate`` of them, beside a plain object (never one of
    new_word_test_objects): the images a LoRA learns a new word from. uint8 images [n, SIZE, SIZE, 3]."""
    check_new_word(word)
    scenes = []
    for i in range(n):
        rng = random.Random(f"{seed}:new_word:{word}:{i}")
        bg, grad = _background(rng)
        colour = rng.choice(COLOUR_NAMES)
        obj = _new_word_object(rng, colour) if object_rate and rng.random() < object_rate else None
        prompt = sign_caption(word, colour if rng.random() < 0.6 else None, obj)
        scenes.append(_layout_sign(rng, word, colour, obj, bg, grad, prompt))
    images = np.stack([np.asarray(render(s), dtype=np.uint8) for s in scenes]) if scenes else \
        np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return images, scenes


def grid(images: Iterable[Image.Image], cols: int = 8, gap: int = 2, scale: int = 2) -> Image.Image:
    ims = [im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST) for im in images]
    if not ims:
        raise ValueError("grid: no images")
    w, h = ims[0].size
    rows = math.ceil(len(ims) / cols)
    out = Image.new("RGB", (cols * (w + gap) + gap, rows * (h + gap) + gap), (255, 255, 255))
    for i, im in enumerate(ims):
        out.paste(im, (gap + (i % cols) * (w + gap), gap + (i // cols) * (h + gap)))
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", type=Path, help="write a preview grid PNG of training samples here")
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("-n", type=int, default=32, help="number of samples in the grid")
    p.add_argument("--seed", type=int, default=WORLD_SEED)
    p.add_argument("--sign-rate", type=float, default=0.0, help="share of scenes with a sign (v2 world: 0.5)")
    args = p.parse_args(argv)
    images, scenes = make_dataset(args.n, args.split, args.seed, sign_rate=args.sign_rate)
    for i, s in enumerate(scenes):
        print(f"{i:4d}  {s.prompt}")
    if args.grid:
        grid([Image.fromarray(a) for a in images]).save(args.grid)
        print(f"wrote {args.grid}")
    print(f"prompts: {len(single_prompts('train'))} single-object train, {len(single_prompts('heldout'))} held-out; "
          f"held-out eval prompts: {heldout_eval_prompts()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
