"""The built-in "city-shapes" dataset: small street scenes in the Cityscapes layout, every pixel a class.

CIL's protocol has no background class and trains each stage on its own cities. This dataset gives it a CPU-sized
stand-in: the 19 Cityscapes classes drawn as a street scene (sky, buildings, vegetation, poles and signs, sidewalk,
road, people and vehicles), written exactly as Cityscapes ships it and read by the Cityscapes loader:

    <root>/leftImg8bit/{train,val}/<city>/<city>_000000_<frame>_leftImg8bit.png
    <root>/gtFine/{train,val}/<city>/<city>_000000_<frame>_gtFine_labelIds.png   (Cityscapes labelIds)

Train cities are CIL's 17 (tasks/cityscapes.toml's city sets apply unchanged), val cities are Cityscapes' three.
Each city tints its scenes its own way, as real cities differ. Only the few pixels between objects are void (0).
Images are drawn from generators seeded by (seed, split, city, frame): the output is byte-identical on every call.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .cityscapes import LABEL_TO_TRAIN
from .generated import ensure_generated

TRAIN_TO_LABEL = {train: label for label, train in LABEL_TO_TRAIN.items()}
TRAIN_CITIES = ("hanover", "aachen", "strasbourg", "dusseldorf", "jena", "monchengladbach", "ulm", "tubingen",
                "bochum", "hamburg", "weimar", "zurich", "darmstadt", "bremen", "cologne", "stuttgart", "krefeld")
VAL_CITIES = ("frankfurt", "lindau", "munster")
_VERSION = 1

# Base colour (RGB) of each trainId; a scene jitters them, a city tints them.
_COLOURS = {
    0: (90, 85, 95),      # road
    1: (170, 150, 160),   # sidewalk
    2: (120, 90, 70),     # building
    3: (150, 150, 120),   # wall
    4: (110, 130, 150),   # fence
    5: (60, 60, 60),      # pole
    6: (230, 170, 30),    # traffic light
    7: (220, 220, 0),     # traffic sign
    8: (40, 140, 40),     # vegetation
    9: (140, 190, 110),   # terrain
    10: (110, 160, 230),  # sky
    11: (220, 30, 60),    # person
    12: (255, 80, 0),     # rider
    13: (20, 20, 160),    # car
    14: (10, 60, 100),    # truck
    15: (0, 100, 120),    # bus
    16: (0, 80, 60),      # train
    17: (30, 0, 230),     # motorcycle
    18: (140, 20, 40),    # bicycle
}
OBJECT_CLASSES = tuple(range(11, 19))


class _Scene:
    """A label map and an image drawn together, layer over layer (later layers cover earlier ones)."""

    def __init__(self, height: int, width: int, rng: np.random.Generator, tint: np.ndarray) -> None:
        self.h, self.w, self.rng, self.tint = height, width, rng, tint
        self.label = Image.new("L", (width, height), 255)
        self.draw = ImageDraw.Draw(self.label)

    def fill(self, train_id: int, shape: str, box: tuple[float, ...]) -> None:
        if shape == "rect":
            self.draw.rectangle(box, fill=train_id)
        elif shape == "ellipse":
            self.draw.ellipse(box, fill=train_id)
        else:
            self.draw.polygon(box, fill=train_id)

    def render(self) -> tuple[np.ndarray, np.ndarray]:
        train_ids = np.asarray(self.label, np.uint8).copy()
        colours = np.zeros((256, 3), np.float32)
        for c, rgb in _COLOURS.items():
            colours[c] = np.clip(np.array(rgb) + self.tint + self.rng.normal(0, 10, 3), 0, 255)
        image = colours[train_ids] + self.rng.normal(0, 8, (self.h, self.w, 3))
        # Texture on the large classes, so that colour alone does not always decide between neighbours.
        yy, xx = np.mgrid[0:self.h, 0:self.w]
        stripes = 12 * np.sin(xx * self.rng.uniform(0.3, 0.9) + yy * self.rng.uniform(0.1, 0.5))
        for c in (2, 3, 4):
            image[train_ids == c] += stripes[train_ids == c, None]
        return np.clip(image, 0, 255).astype(np.uint8), train_ids


def _draw_street(scene: _Scene) -> None:
    h, w, rng = scene.h, scene.w, scene.rng
    horizon = h * rng.uniform(0.3, 0.45)
    kerb = h * rng.uniform(0.58, 0.68)
    scene.fill(10, "rect", (0, 0, w, horizon + 2))                                   # sky
    x = 0.0
    while x < w:                                                                     # buildings along the street
        bw = w * rng.uniform(0.12, 0.3)
        top = horizon - h * rng.uniform(0.05, 0.25)
        scene.fill(2 if rng.random() < 0.8 else 3, "rect", (x, top, x + bw, kerb))
        x += bw
    for _ in range(rng.integers(1, 3)):                                              # trees
        cx, r = rng.uniform(0, w), h * rng.uniform(0.08, 0.16)
        cy = horizon + rng.uniform(-0.5, 0.5) * r
        scene.fill(8, "ellipse", (cx - 1.4 * r, cy - r, cx + 1.4 * r, cy + r))
    scene.fill(1, "rect", (0, kerb - h * 0.06, w, kerb + h * 0.04))                  # sidewalk
    scene.fill(0, "rect", (0, kerb + h * 0.04, w, h))                                # road
    if rng.random() < 0.6:                                                           # grass verge
        x0 = rng.uniform(0, 0.7) * w
        scene.fill(9, "rect", (x0, kerb - h * 0.09, x0 + w * rng.uniform(0.15, 0.3), kerb - h * 0.04))
    if rng.random() < 0.5:                                                           # fence on the verge
        x0 = rng.uniform(0, 0.7) * w
        scene.fill(4, "rect", (x0, kerb - h * 0.16, x0 + w * rng.uniform(0.15, 0.3), kerb - h * 0.06))
    for _ in range(rng.integers(1, 3)):                                              # poles with a light or sign
        px, top = rng.uniform(0.03, 0.97) * w, horizon - h * rng.uniform(0.0, 0.1)
        scene.fill(5, "rect", (px, top, px + max(2.0, w * 0.015), kerb))
        if rng.random() < 0.5:
            scene.fill(6, "rect", (px - 2, top - h * 0.1, px + 4, top))
        else:
            s = h * 0.06
            scene.fill(7, "polygon", [(px + 1 - s, top), (px + 1 + s, top), (px + 1, top - 1.6 * s)])
    for _ in range(rng.integers(1, 4)):                                              # road users
        _draw_object(scene, int(rng.choice(OBJECT_CLASSES)), kerb)


def _draw_object(scene: _Scene, train_id: int, kerb: float) -> None:
    """People are tall and thin, two-wheelers have two wheels, vehicles are boxes of class-typical proportions."""
    h, w, rng = scene.h, scene.w, scene.rng
    base = rng.uniform(kerb + 0.12 * h, h - 1)
    x = rng.uniform(0.05, 0.85) * w
    scale = h * rng.uniform(0.8, 1.1)
    if train_id in (11, 12):                                                         # person, rider
        bh = scale * (0.32 if train_id == 11 else 0.26)
        bw = bh * 0.3
        if train_id == 12:
            _wheels(scene, 18, x - bw, base, bh * 0.5)
        scene.fill(train_id, "ellipse", (x, base - bh, x + bw, base - (bh * 0.3 if train_id == 12 else 0)))
        return
    if train_id in (17, 18):                                                         # motorcycle, bicycle
        _wheels(scene, train_id, x, base, scale * (0.22 if train_id == 17 else 0.18), solid=train_id == 17)
        return
    length, height = {13: (0.45, 0.16), 14: (0.55, 0.3), 15: (0.8, 0.34), 16: (1.3, 0.32)}[train_id]
    x0 = x if train_id != 16 else rng.uniform(-0.3, 0.2) * w
    scene.fill(train_id, "rect", (x0, base - scale * height, x0 + scale * length, base))
    if train_id == 13:
        scene.fill(train_id, "rect", (x0 + scale * 0.1, base - scale * 0.26, x0 + scale * 0.33, base))


def _wheels(scene: _Scene, train_id: int, x: float, base: float, size: float, solid: bool = False) -> None:
    r = size * 0.3
    for cx in (x + r, x + size * 1.6 - r):
        scene.fill(train_id, "ellipse", (cx - r, base - 2 * r, cx + r, base))
    frame = [(x + r, base - r), (x + size * 0.8, base - size * (0.9 if solid else 0.7)), (x + size * 1.6 - r, base - r)]
    scene.fill(train_id, "polygon", frame)


def render(rng: np.random.Generator, tint: np.ndarray, height: int = 64, width: int = 128
           ) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (HxWx3 uint8 image, HxW uint8 Cityscapes labelIds; 0 = unlabeled where nothing was drawn)."""
    scene = _Scene(height, width, rng, tint)
    _draw_street(scene)
    image, train_ids = scene.render()
    lut = np.zeros(256, np.uint8)  # trainId -> labelId; 255 (nothing drawn) -> 0 "unlabeled"
    for train_id, label_id in TRAIN_TO_LABEL.items():
        lut[train_id] = label_id
    return image, lut[train_ids]


def _city_tint(seed: int, city: str) -> np.ndarray:
    return np.random.default_rng((seed, sum(map(ord, city)), len(city))).normal(0, 18, 3)


def generate(dest: Path, seed: int = 0, height: int = 64, width: int = 128, per_city: int = 30,
             per_val_city: int = 30) -> None:
    """Write the dataset into `dest` (not atomic by itself: see ensure_city_shapes)."""
    for split, cities, count in (("train", TRAIN_CITIES, per_city), ("val", VAL_CITIES, per_val_city)):
        for c, city in enumerate(cities):
            images, labels = dest / "leftImg8bit" / split / city, dest / "gtFine" / split / city
            images.mkdir(parents=True)
            labels.mkdir(parents=True)
            tint = _city_tint(seed, city)
            for frame in range(count):
                rng = np.random.default_rng((seed, split == "val", c, frame))
                image, label_ids = render(rng, tint, height, width)
                stem = f"{city}_000000_{frame:06d}"
                Image.fromarray(image).save(images / f"{stem}_leftImg8bit.png")
                Image.fromarray(label_ids, mode="L").save(labels / f"{stem}_gtFine_labelIds.png")


def ensure_city_shapes(root: Path, seed: int = 0, height: int = 64, width: int = 128, per_city: int = 30,
                       per_val_city: int = 30) -> Path:
    """<root>/city-shapes, generated first when missing (atomically: see generated.ensure_generated)."""
    meta = {"version": _VERSION, "seed": seed, "height": height, "width": width, "per_city": per_city,
            "per_val_city": per_val_city}
    return ensure_generated(Path(root) / "city-shapes", meta,
                            lambda dest: generate(dest, seed, height, width, per_city, per_val_city))

