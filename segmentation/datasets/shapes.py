"""The built-in "shapes" dataset: 10 foreground classes that differ by shape only, in the VOC layout.

Colour and texture are drawn per object independently of the class, so only the outline identifies the class;
backgrounds are textured and noisy, objects overlap, and a thin 255 band marks object borders as in VOC. Every image
is drawn from its own generator seeded by (seed, split, index): the output is byte-identical on every call.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .generated import ensure_generated
from .voc import VOCSource, palette

# Objects are drawn upright (see MAX_ROTATION); the set still avoids pairs that differ only by a rotation (a square
# but no diamond, one "cross"), so that rotating them later cannot merge two classes. Mirror images (the training
# flip) stay in their class (L and J are both "L-shape").
# Names and order must match tasks/shapes.toml.
SHAPES_CLASSES = (
    "background", "disc", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent", "L-shape", "heart",
)
_VERSION = 5  # bump when the drawing code changes, so an old folder is not silently reused


def _polygon(kind: str) -> list[tuple[float, float]]:
    """Unit-size outline (roughly within radius 1) of a polygonal class."""
    if kind == "square":
        return [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
    if kind == "triangle":
        return [(math.cos(a), math.sin(a)) for a in np.deg2rad([-90, 30, 150])]
    if kind == "hexagon":
        return [(math.cos(a), math.sin(a)) for a in np.deg2rad(np.arange(0, 360, 60))]
    if kind == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.42
            a = math.radians(-90 + 36 * k)
            pts.append((r * math.cos(a), r * math.sin(a)))
        return pts
    if kind == "cross":
        t = 0.3
        return [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t),
                (-t, -t)]
    if kind == "L-shape":
        return [(-0.8, -1), (-0.2, -1), (-0.2, 0.4), (0.8, 0.4), (0.8, 1), (-0.8, 1)]
    if kind == "heart":  # the lower tip; the two lobes are discs added in _draw_mask
        return [(-0.93, -0.2), (0.93, -0.2), (0, 1)]
    raise KeyError(kind)


def _draw_mask(kind: str, size: int, cx: float, cy: float, r: float, angle: float, rng: np.random.Generator
               ) -> np.ndarray:
    """Boolean HxW mask of one object."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if kind in ("disc", "ring", "crescent"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if kind == "ring":
            ri = r * rng.uniform(0.45, 0.65)
            draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
        elif kind == "crescent":
            d = r * rng.uniform(0.45, 0.65)
            ox, oy = cx + d * math.cos(angle), cy + d * math.sin(angle)
            ri = r * 0.95
            draw.ellipse((ox - ri, oy - ri, ox + ri, oy + ri), fill=0)
    else:
        ca, sa = math.cos(angle), math.sin(angle)
        pts = [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in _polygon(kind)]
        draw.polygon(pts, fill=255)
        if kind == "heart":
            for lx in (-0.45, 0.45):
                ly = -0.35
                x, y, rr = cx + r * (lx * ca - ly * sa), cy + r * (lx * sa + ly * ca), 0.5 * r
                draw.ellipse((x - rr, y - rr, x + rr, y + rr), fill=255)
    return np.asarray(canvas) > 0


def _texture(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray, kinds: int = 4) -> np.ndarray:
    """HxW values in [0, 1]: stripes, checker, blotchy noise or a gradient, chosen at random among the first
    `kinds` (2 = only the high-frequency ones)."""
    kind = rng.integers(kinds)
    if kind == 0:  # stripes
        a, f = rng.uniform(0, math.pi), rng.uniform(0.25, 1.2)
        return 0.5 + 0.5 * np.sin(f * (xx * math.cos(a) + yy * math.sin(a)) + rng.uniform(0, 6.3))
    if kind == 1:  # checker
        p = rng.integers(3, 9)
        return (((xx // p) + (yy // p)) % 2).astype(np.float32)
    if kind == 2:  # smooth blotches: upsampled coarse noise
        g = rng.integers(3, 8)
        coarse = Image.fromarray((rng.random((g, g)) * 255).astype(np.uint8))
        return np.asarray(coarse.resize((size, size), Image.BICUBIC), np.float32) / 255.0
    a = rng.uniform(0, 2 * math.pi)  # gradient
    t = xx * math.cos(a) + yy * math.sin(a)
    return (t - t.min()) / max(float(t.max() - t.min()), 1e-6)


def _grey_pattern(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Background: a random high-frequency pattern between two near-grey colours (HxWx3 float)."""
    level = rng.uniform(50, 205)
    tint = rng.uniform(-12, 12, 3)
    c1 = level + tint
    c2 = np.clip(c1 + rng.uniform(-BACKGROUND_CONTRAST, BACKGROUND_CONTRAST), 0, 255)
    t = _texture(rng, size, yy, xx, kinds=2)[..., None]
    return c1 * (1 - t) + c2 * t


def _saturated_colour(rng: np.random.Generator, hue: float | None = None) -> np.ndarray:
    """An object's colour: strongly saturated, so "object vs background" is a local cue as in natural images. Its
    hue is random (it says nothing about the class) unless given."""
    drawn, sat, val = rng.uniform(0, 1), rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0)  # in this order: same bytes
    hue = drawn if hue is None else hue % 1.0
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6
    rgb = val - val * sat * np.clip(np.minimum(k, 4 - k), 0, 1)
    return rgb * 255


def _border(label: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another class: a ~1 px band, like VOC's (thicker) void border."""
    band = np.zeros(label.shape, bool)
    dx = label[:, 1:] != label[:, :-1]
    dy = label[1:, :] != label[:-1, :]
    band[:, :-1] |= dx
    band[:-1, :] |= dy
    return band


# Sizes and counts were tuned so that the demo's ResNet-18, trained from scratch on 2 CPU cores, learns the base
# classes in minutes. Measured on step 0 of 6-2 (300-400 iterations of 16 images): 1-3 objects of radius 0.18-0.36
# rotated freely and rescaled 0.5-2x reached ~16 % mIoU; upright objects of radius 0.30-0.40, one or two per image
# (two overlap often), not rescaled, learn about twice as fast. Output stride 8 matters as much: at 64 px, OS16
# leaves a 4x4 score map, too coarse for these outlines.
OBJECTS_PER_IMAGE = (1, 2)       # inclusive range
OBJECT_RADIUS = (0.30, 0.40)     # fraction of the image size
# Background: a near-grey high-frequency pattern; objects: one saturated colour of random hue plus noise. Telling
# object from background is then a local cue, as in natural images; telling the classes apart needs the outline.
# (With random colours on both sides, "inside a contour" is all there is, which a CNN trained from scratch on two
# CPU cores does not learn in minutes.)
BACKGROUND_CONTRAST = 60.0       # grey-level spread of the background pattern
NOISE_SIGMA = (3.0, 12.0)
MAX_ROTATION = 0.0            # radians either way; upright shapes are learnt much faster from scratch


def render(rng: np.random.Generator, size: int = 64, hue_jitter: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One sample: (HxWx3 uint8 image, HxW uint8 label with ids 0..10 and 255 on borders). With `hue_jitter` (a
    fraction of the colour wheel) class k's objects take hue (k - 1) / 10 +- hue_jitter: the colour then says much
    about the class (all of it below a jitter of 0.05), and classes are learnt far faster."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = _grey_pattern(rng, size, yy, xx)
    label = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1)):
        cls = int(rng.integers(1, len(SHAPES_CLASSES)))
        r = rng.uniform(*OBJECT_RADIUS) * size
        cx, cy = rng.uniform(0.1, 0.9, 2) * size
        mask = _draw_mask(SHAPES_CLASSES[cls], size, cx, cy, r, rng.uniform(-MAX_ROTATION, MAX_ROTATION), rng)
        hue = None if hue_jitter is None else (cls - 1) / (len(SHAPES_CLASSES) - 1) + rng.uniform(-hue_jitter, hue_jitter)
        image[mask] = _saturated_colour(rng, hue)
        label[mask] = cls
    image += rng.normal(0, rng.uniform(*NOISE_SIGMA), image.shape)  # sensor-like noise over everything
    label[_border(label)] = 255
    return np.clip(image, 0, 255).astype(np.uint8), label


def _write_split(root: Path, split: str, count: int, seed: int, size: int, pal: list[int],
                 hue_jitter: float | None = None) -> list[str]:
    ids = []
    for i in range(count):
        rng = np.random.default_rng((seed, 0 if split == "train" else 1, i))
        image, label = render(rng, size, hue_jitter)
        name = f"{split}_{i:05d}"
        Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=int(rng.integers(75, 96)))
        lbl = Image.frombytes("P", (size, size), label.tobytes())  # class ids as palette indices, as in VOC
        lbl.putpalette(pal)
        lbl.save(root / "SegmentationClassAug" / f"{name}.png", optimize=False)
        ids.append(name)
    return ids


def generate(dest: Path, seed: int = 0, size: int = 64, n_train: int = 2000, n_val: int = 300,
             hue_jitter: float | None = None) -> None:
    """Write the dataset into `dest` (must not exist yet; not atomic by itself, see `ensure_shapes`)."""
    for sub in ("JPEGImages", "SegmentationClassAug", "splits"):
        (dest / sub).mkdir(parents=True)
    pal = palette()
    for split, count, list_name in (("train", n_train, "train_aug.txt"), ("val", n_val, "val.txt")):
        ids = _write_split(dest, split, count, seed, size, pal, hue_jitter)
        (dest / "splits" / list_name).write_text("".join(f"{i}\n" for i in ids))


def ensure_shapes(root: Path, seed: int = 0, size: int = 64, n_train: int = 2000, n_val: int = 300,
                  hue_jitter: float | None = None, folder: str = "shapes") -> Path:
    """Return <root>/<folder>, generating it first when missing (atomically, see generated.ensure_generated)."""
    # hue_jitter None matches the folders generated before the option (check_meta reads a missing key as None)
    meta = {"version": _VERSION, "seed": seed, "size": size, "n_train": n_train, "n_val": n_val,
            "classes": list(SHAPES_CLASSES), "hue_jitter": hue_jitter}
    return ensure_generated(Path(root) / folder, meta,
                            lambda dest: generate(dest, seed, size, n_train, n_val, hue_jitter))


# "shapes-hue", the benchmark's data (`make benchmark`): the same shapes, but each class keeps its own hue (to within
# HUE_JITTER of the colour wheel; the 10 classes are 0.1 apart, so the hue alone tells them apart), and 1,600 training
# images. On 2 CPU cores a ResNet-18 at output stride 16 then reaches ~63-66 % mIoU on 6-2's step 0 in 2 epochs
# (plain shapes: ~30 % in 3), so later steps have something to forget, and the 3-seed benchmark fits in 30 minutes.
HUE_JITTER = 0.03
HUE_N_TRAIN = 1600


def ensure_shapes_hue(root: Path, seed: int = 0, size: int = 64) -> Path:
    """Return <root>/shapes-hue, generating it first when missing."""
    return ensure_shapes(root, seed, size, n_train=HUE_N_TRAIN, hue_jitter=HUE_JITTER, folder="shapes-hue")


class ShapesSource(VOCSource):
    """VOCSource over the generated folder (`root` is that folder, i.e. the return value of `ensure_shapes`)."""

    name = "shapes"
    num_classes = len(SHAPES_CLASSES)
    train_scale = (1.0, 1.0)  # object sizes already vary; VOC's 0.5-2x rescaling only slows learning here
    class_names = SHAPES_CLASSES


class ShapesHueSource(ShapesSource):
    """VOCSource over the generated shapes-hue folder (`ensure_shapes_hue`)."""

    name = "shapes-hue"
