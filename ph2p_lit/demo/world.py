"""The demo world: seeded, procedurally rendered, captioned images whose ground truth is known.

One coloured shape on a plain background; every content word of a caption is one CLIP BPE token,
so a recovered prompt can be scored word by word against the attributes that drew the image.
"""

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "pink": (250, 170, 200),
}
SIZES = ("small", "large")
POSITIONS = ("left", "center", "right")

# The attributes a caption always names, and those only some templates name.
ATTRIBUTE_VALUES = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "background": tuple(BACKGROUNDS),
    "size": SIZES,
    "position": POSITIONS,
}
CONTENT_ATTRIBUTES = ("colour", "shape", "background")

TEMPLATES = (
    "a {colour} {shape} on a {background} background",
    "a {size} {colour} {shape} on a {background} background",
    "a {colour} {shape} on the {position} of a {background} background",
    "a {size} {colour} {shape} on the {position} of a {background} background",
)

IMAGE_SIZE = 32
_SUPERSAMPLE = 4  # anti-aliasing: shapes are drawn on a 4x grid and box-filtered down
_RADIUS = {"small": 5.0, "large": 8.0}  # pixels at IMAGE_SIZE
_CENTRE_X = {"left": 9.0, "center": 16.0, "right": 23.0}


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    size: str
    position: str
    template: int

    @property
    def caption(self) -> str:
        return TEMPLATES[self.template].format(**asdict(self))


def sample_scene(rng: np.random.Generator) -> Scene:
    return Scene(
        colour=str(rng.choice(list(COLOURS))),
        shape=str(rng.choice(SHAPES)),
        background=str(rng.choice(list(BACKGROUNDS))),
        size=str(rng.choice(SIZES)),
        position=str(rng.choice(POSITIONS)),
        template=int(rng.integers(len(TEMPLATES))),
    )


def _star_polygon() -> np.ndarray:
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_STAR = _star_polygon()


def _inside_polygon(u: np.ndarray, v: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd rule over all points at once."""
    inside = np.zeros(u.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(polygon, np.roll(polygon, -1, axis=0)):
        crosses = (y0 > v) != (y1 > v)
        x_at_v = x0 + (v - y0) * (x1 - x0) / (y1 - y0 + 1e-12)
        inside ^= crosses & (u < x_at_v)
    return inside


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of `shape` in coordinates scaled by its radius (v points down)."""
    if shape == "circle":
        return u**2 + v**2 <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.82) & (np.abs(v) <= 0.82)
    if shape == "triangle":
        return (v <= 0.75) & (np.abs(u) <= (v + 1.0) / 1.75 * 1.0)
    if shape == "star":
        return _inside_polygon(u, v, _STAR)
    if shape == "heart":
        x, y = u * 1.25, -(v * 1.25 - 0.15)
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    if shape == "cross":
        return ((np.abs(u) <= 0.32) & (np.abs(v) <= 0.95)) | ((np.abs(u) <= 0.95) & (np.abs(v) <= 0.32))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw a scene: (image uint8 (H, W, 3), object coverage float32 (H, W) in [0, 1]).

    Size and position jitter, and a little colour jitter, vary between renders of one scene.
    """
    n = IMAGE_SIZE * _SUPERSAMPLE
    radius = _RADIUS[scene.size] * rng.uniform(0.9, 1.1)
    cx = _CENTRE_X[scene.position] + rng.uniform(-1.5, 1.5)
    cy = IMAGE_SIZE / 2 + rng.uniform(-3.0, 3.0)
    grid = (np.arange(n) + 0.5) / _SUPERSAMPLE
    x, y = np.meshgrid(grid, grid)
    mask = shape_mask(scene.shape, (x - cx) / radius, (y - cy) / radius)
    coverage = mask.reshape(IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE).mean(axis=(1, 3))
    coverage = coverage.astype(np.float32)[..., None]
    fg = np.clip(np.array(COLOURS[scene.colour]) + rng.normal(0, 6, 3), 0, 255)
    bg = np.clip(np.array(BACKGROUNDS[scene.background]) + rng.normal(0, 6, 3), 0, 255)
    image = fg * coverage + bg * (1 - coverage)
    return np.round(image).astype(np.uint8), coverage[..., 0]


def make_renders(n: int, seed: int, masks: bool = False) -> tuple:
    """n renders of random scenes: (images uint8 (n, H, W, 3), scenes[, object coverage (n, H, W)])."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    drawn = [render(scene, rng) for scene in scenes]
    images = np.stack([image for image, _ in drawn])
    return (images, scenes, np.stack([cover for _, cover in drawn])) if masks else (images, scenes)


def export_imagefolder(root: str | os.PathLike, n: int, seed: int) -> Path:
    """Write n renders as a Hugging Face `imagefolder`: PNGs plus metadata.jsonl with captions."""
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    images, scenes = make_renders(n, seed)
    with open(root / "metadata.jsonl", "w") as meta:
        for i, (image, scene) in enumerate(zip(images, scenes)):
            name = f"render_{seed}_{i:05d}.png"
            Image.fromarray(image).save(root / name)
            meta.write(json.dumps({"file_name": name, "text": scene.caption, **asdict(scene)}) + "\n")
    return root


def world_words() -> list[str]:
    """Every word a caption of this world can contain."""
    words = {w for values in ATTRIBUTE_VALUES.values() for w in values}
    words |= {w for template in TEMPLATES for w in template.split() if not w.startswith("{")}
    return sorted(words)


def attributes_in_text(text: str) -> dict[str, set[str]]:
    """Which values of each attribute a text names, word by word."""
    words = set(text.lower().replace(",", " ").split())
    return {name: words.intersection(values) for name, values in ATTRIBUTE_VALUES.items()}
