"""Needle images: procedural icons drawn in code, or a folder of real images with one sub-folder per class.

A class of a pool is an icon spec (shape, colour, texture) that no other class of that pool shares, so
classes are told apart by what they look like; an *instance* of a class is that icon drawn with its own
seed-driven jitter (scale, rotation, offset, colour, background). Instances of different seeds are
different pictures, which is what lets train and eval sets never share a needle instance (splits.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from duokit.data.synth.pools import POOLS
from duokit.data.synth.splits import split_of_file, tag_seed

SHAPES = ("circle", "square", "triangle", "diamond", "pentagon", "hexagon", "star", "cross", "heart", "ring")
COLOURS = (  # 12 hues far apart, so colour alone separates most classes
    (220, 40, 40), (245, 140, 20), (240, 220, 30), (150, 220, 40), (30, 160, 60), (20, 170, 160),
    (40, 200, 240), (40, 80, 220), (130, 60, 200), (220, 50, 200), (250, 150, 190), (130, 80, 40),
)
TEXTURES = ("solid", "stripes", "dots", "checker", "rings")
# Pools get different starting shapes, so the first fruit and the first object look different.
_POOL_SHAPE_OFFSET = {"fruit": 0, "object": 3, "landmark": 6}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class IconSpec:
    shape: str
    colour: tuple[int, int, int]
    texture: str


def icon_spec(pool: str, name: str) -> IconSpec:
    """The icon of a class: shape i%10 and colour i%12 make (shape, colour) unique for pools < 60 classes."""
    index = POOLS[pool].index(name)
    return IconSpec(
        shape=SHAPES[(index + _POOL_SHAPE_OFFSET[pool]) % len(SHAPES)],
        colour=COLOURS[index % len(COLOURS)],
        texture=TEXTURES[(index // 2) % len(TEXTURES)],
    )


def _outline(shape: str) -> list[tuple[float, float]]:
    """Vertices in [-1, 1]^2 (y down) of a shape's outline; "ring" is a circle with a hole cut later."""
    def regular(count, start=-math.pi / 2, radius=1.0):
        return [(radius * math.cos(start + 2 * math.pi * k / count),
                 radius * math.sin(start + 2 * math.pi * k / count)) for k in range(count)]

    if shape in ("circle", "ring"):
        return regular(48)
    if shape == "square":
        return [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]
    if shape == "triangle":
        return regular(3, radius=1.0)
    if shape == "diamond":
        return [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
    if shape == "pentagon":
        return regular(5)
    if shape == "hexagon":
        return regular(6, start=0)
    if shape == "star":
        outer, inner = regular(5), regular(5, start=-math.pi / 2 + math.pi / 5, radius=0.45)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        a, b = 0.33, 0.95
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a),
                (-b, -a), (-a, -a)]
    if shape == "heart":
        points = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((x / 17, -y / 17 + 0.1))
        return points
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, size: int) -> np.ndarray:
    """A [size, size] brightness factor in [0.55, 1] (darker marks on the base colour)."""
    coords = (np.arange(size) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(coords, coords, indexing="ij")
    period = 0.5  # icon-relative, so a texture looks the same at every size
    if texture == "solid":
        marks = np.zeros_like(x, dtype=bool)
    elif texture == "stripes":
        marks = ((x + y) / period) % 1 < 0.4
    elif texture == "dots":
        marks = ((x / period) % 1 - 0.5) ** 2 + ((y / period) % 1 - 0.5) ** 2 < 0.06
    elif texture == "checker":
        marks = (np.floor(x / period) + np.floor(y / period)) % 2 == 0
    elif texture == "rings":
        marks = (np.hypot(x, y) / (period / 2)) % 1 < 0.4
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return np.where(marks, 0.55, 1.0)


def draw_icon(spec: IconSpec, size: int, seed: int) -> np.ndarray:
    """An RGBA uint8 [size, size, 4] icon; `seed` sets this instance's scale, rotation and colour jitter."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.8, 0.95)
    angle = rng.uniform(-0.25, 0.25)  # radians, about ±15°
    jitter = rng.integers(-15, 16, size=3)
    supersample = 2 if size < 128 else 1  # anti-aliasing for small icons
    big = size * supersample
    cos, sin = math.cos(angle), math.sin(angle)
    points = [((x * cos - y * sin) * scale * big / 2 + big / 2, (x * sin + y * cos) * scale * big / 2 + big / 2)
              for x, y in _outline(spec.shape)]
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    draw.polygon(points, fill=255)
    if spec.shape == "ring":
        hole = scale * big / 2 * 0.5
        draw.ellipse([big / 2 - hole, big / 2 - hole, big / 2 + hole, big / 2 + hole], fill=0)
    alpha = np.asarray(mask.resize((size, size), Image.BILINEAR) if supersample > 1 else mask)
    colour = np.clip(np.array(spec.colour) + jitter, 0, 255)
    rgb = colour[None, None, :] * _texture(spec.texture, size)[:, :, None]
    return np.dstack([rgb.astype(np.uint8), alpha])


def composite(background: np.ndarray, rgba: np.ndarray, top: int, left: int) -> None:
    """Alpha-blend `rgba` onto `background` (uint8 [H, W, 3], in place) with its corner at (top, left)."""
    height, width = rgba.shape[:2]
    region = background[top:top + height, left:left + width].astype(np.float32)
    alpha = rgba[..., 3:4].astype(np.float32) / 255
    background[top:top + height, left:left + width] = (
        region * (1 - alpha) + rgba[..., :3].astype(np.float32) * alpha + 0.5).astype(np.uint8)


def _gradient(height: int, width: int, top_colour, bottom_colour) -> np.ndarray:
    weights = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    image = (1 - weights) * np.asarray(top_colour, np.float32) + weights * np.asarray(bottom_colour, np.float32)
    return np.broadcast_to(image, (height, width, 3)).astype(np.uint8)  # astype copies: writable


class ProceduralNeedle:
    """One instance of a class, drawn in code; `seed` (split-tagged) makes it this instance."""

    def __init__(self, pool: str, name: str, seed: int):
        self.pool, self.name, self.seed = pool, name, seed
        self.spec = icon_spec(pool, name)

    @property
    def source(self) -> str:
        return f"procedural:{self.pool}:{self.name}:{self.seed}"

    def sticker(self, size: int) -> np.ndarray:
        return draw_icon(self.spec, size, self.seed)

    def frame(self, height: int, width: int) -> np.ndarray:
        """A full-frame picture (read-only array): the icon large on a muted background."""
        return _procedural_frame(self.pool, self.name, self.seed, height, width)


@lru_cache(maxsize=64)  # a counting or training video repeats a picture; drawing it once is enough
def _procedural_frame(pool: str, name: str, seed: int, height: int, width: int) -> np.ndarray:
    """The icon of (pool, name) with `seed`'s jitter, large on a background (a sky and ground for landmarks)."""
    rng = np.random.default_rng([seed, 1])
    if pool == "landmark":
        sky = rng.integers(120, 230, size=3)
        image = _gradient(height, width, sky, sky * 0.6)
        ground = int(height * rng.uniform(0.7, 0.85))
        image[ground:] = rng.integers(40, 120, size=3)
    else:
        image = _gradient(height, width, rng.integers(40, 200, size=3), rng.integers(40, 200, size=3))
    side = int(min(height, width) * rng.uniform(0.6, 0.75))
    top = (height - side) // 2 + int(rng.integers(-1, 2) * (height - side) // 8)
    left = (width - side) // 2 + int(rng.integers(-1, 2) * (width - side) // 8)
    composite(image, draw_icon(icon_spec(pool, name), side, seed), top, left)
    image.setflags(write=False)
    return image


class FileNeedle:
    """One instance of a class from an image file of a `--needle-images` folder."""

    def __init__(self, pool: str, name: str, path: Path):
        self.pool, self.name, self.path = pool, name, path

    @property
    def source(self) -> str:
        return str(self.path)

    def _image(self) -> Image.Image:
        try:
            with Image.open(self.path) as image:
                return image.convert("RGBA")
        except OSError as err:
            raise ValueError(f"{self.path}: cannot read this needle image ({err}); remove or replace it") from err

    def sticker(self, size: int) -> np.ndarray:
        image = self._image()
        image.thumbnail((size, size), Image.BILINEAR)
        canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
        return np.asarray(canvas)

    def frame(self, height: int, width: int) -> np.ndarray:
        """The image letterboxed on black to the frame size (docs/synth.md), read-only."""
        image = self._image().convert("RGB")
        image.thumbnail((width, height), Image.BILINEAR)
        canvas = Image.new("RGB", (width, height), (0, 0, 0))
        canvas.paste(image, ((width - image.width) // 2, (height - image.height) // 2))
        return np.asarray(canvas)


class NeedleImages:
    """Where the needle images of each pool come from, for one split.

    Without a folder every pool is procedural. With `folder`, a pool whose every class has a sub-folder
    (named like the class, "_" for spaces, any case) takes its images from there; landmark classes are
    the sub-folders that name no fruit or object, used when there are at least 4 of them. Each class's
    files are split between train and eval by a hash of the file name (splits.py).
    """

    def __init__(self, folder: str | Path | None = None, split: str = "eval"):
        self.split = split
        self.folder = Path(folder) if folder is not None else None
        self.files: dict[str, dict[str, list[Path]]] = {}  # pool -> class -> files of this split
        if self.folder is not None:
            self._scan()

    def _scan(self) -> None:
        folder = self.folder
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: needle-image folder not found; give a folder with one "
                                    "sub-folder of images per class (e.g. apple/, banana/, ...)")
        by_class = {path.name.replace("_", " ").lower(): path for path in sorted(folder.iterdir()) if path.is_dir()}
        if not by_class:
            raise ValueError(f"{folder}: no class sub-folders; put each class's images in DIR/<class>/")
        known = {name.lower() for pool in ("fruit", "object") for name in POOLS[pool]}
        for pool in ("fruit", "object"):
            present = [name for name in POOLS[pool] if name.lower() in by_class]
            if present and len(present) < len(POOLS[pool]):
                missing = sorted(set(POOLS[pool]) - set(present))
                raise ValueError(f"{folder}: has sub-folders for {len(present)} of the {len(POOLS[pool])} "
                                 f"{pool} classes; add {missing} or remove the others")
            if present:
                self.files[pool] = {name: self._class_files(by_class[name.lower()]) for name in POOLS[pool]}
        landmarks = [key for key in by_class if key not in known]
        if len(landmarks) >= 4:
            self.files["landmark"] = {by_class[key].name.replace("_", " "): self._class_files(by_class[key])
                                      for key in landmarks}

    def _class_files(self, class_dir: Path) -> list[Path]:
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        mine = [p for p in files if split_of_file(p.name) == self.split]
        if not mine:
            raise ValueError(f"{class_dir}: none of its {len(files)} images falls in the {self.split} split "
                             f"(files are split by a hash of their name); add more images ({IMAGE_EXTENSIONS})")
        return mine

    def classes(self, pool: str) -> tuple[str, ...]:
        """The answer pool: the folder's classes for a folder-backed landmark pool, else pools.POOLS."""
        if pool in self.files:
            return tuple(self.files[pool])
        return POOLS[pool]

    def pick(self, pool: str, name: str, rng: np.random.Generator):
        """A random instance of class `name` in this split."""
        if pool in self.files:
            files = self.files[pool][name]
            return FileNeedle(pool, name, files[int(rng.integers(len(files)))])
        return ProceduralNeedle(pool, name, tag_seed(int(rng.integers(1 << 62)), self.split))
