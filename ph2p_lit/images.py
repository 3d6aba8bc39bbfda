"""Images in and out: what a file on disk becomes for the model (`open_image` under a pixel
budget, `to_rgb`, `to_pixels`), what the model's output becomes for a person (`to_uint8`,
`image_grid`), and where the images and their captions are (`find_images`, `file_problem`,
`read_captions`). Every command converts through here."""

import base64
import functools
import io
import json
import os
import stat
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import InputError

DEMO_IMAGES = Path(__file__).parent / "demo" / "images"  # data.root: demo
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_KEYS = ("text", "caption", "prompt")
MAX_PIXELS = 100_000_000  # data.max_pixels: more than most cameras take; 300 MB decoded as RGB


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white, 16-bit is scaled down."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        # A 16-bit image is scaled by its format's range, not by its values: a dark one (all <= 255)
        # is dark, not bright. Mode "I" (32-bit) keeps the old guess, as it has no fixed range.
        scale = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / scale * 255.0, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "P", "PA") and ("transparency" in image.info or image.mode.endswith("A")):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def to_pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the shorter side, centre-crop, scale to [-1, 1]: (3, R, R)."""
    image = ImageOps.fit(to_rgb(image), (resolution, resolution), method=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def read_captions(root: Path) -> dict[str, str]:
    """Captions from an imagefolder's metadata.jsonl (file_name + text/caption/prompt). A number
    is taken as its text and null as no caption; anything else that is not text stops here with
    its line, before any image is inverted (its result line could not be written after)."""
    captions = {}
    meta = root / "metadata.jsonl"
    if meta.is_file():
        for number, line in enumerate(read_text(meta).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{meta}: line {number} is not JSON ({e.msg}); fix or delete it") from None
            if not isinstance(row, dict) or "file_name" not in row:
                raise InputError(f"{meta}: line {number} has no file_name; each line names an image and its caption")
            if not isinstance(row["file_name"], str):
                raise InputError(f"{meta}: line {number}: file_name must be a file name (text), not "
                                 f"{_json_kind(row['file_name'])}")
            key = next((k for k in CAPTION_KEYS if k in row), None)
            if key is None or row[key] is None:
                continue
            text = caption_text(row[key])
            if text is None:
                raise InputError(f"{meta}: line {number}: {key} is {_json_kind(row[key])}, not a caption; "
                                 "write the caption as a string")
            captions[row["file_name"]] = text
    return captions


def caption_text(value) -> str | None:
    """A caption as text: a string as it is, a number as its digits (2024 -> "2024"); None for
    anything else (null, true, a list, an object)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _json_kind(value) -> str:
    """How a JSON value is named in an error: "a list", "an object", "true", "null", "a number"."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), "a number")


def read_text(path: Path) -> str:
    """A caption or list file as text: UTF-8 (a byte order mark, as Windows editors write, is
    dropped), or Latin-1 where it is not UTF-8 (older tools write it)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def file_problem(path: str | Path) -> str | None:
    """Why `path` is not a file to open as an image (None: it is one), from its metadata only:
    opening a named pipe would wait for a writer for ever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"link to {os.path.realpath(path)}, which does not exist"
        return "no such file"
    except OSError as e:
        return f"{type(e).__name__}: cannot read it ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    kind = ("a folder" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device")
    return f"{kind}, not an image file"


class TooManyPixels(ValueError):
    """An image that declares more pixels than the run's budget (data.max_pixels)."""


def open_image(path: str | Path, max_pixels: int) -> Image.Image:
    """Image.open under a pixel budget: a file declaring more than `max_pixels` pixels is refused
    from its header, before decoding (a 47 KB PNG can declare 13,300 x 13,300 pixels and take
    2 GB to decode). The budget replaces PIL's own check, which only warns below twice its limit
    and would refuse a budget a user raised."""
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        image = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    pixels = image.width * image.height
    if pixels > max_pixels:
        image.close()
        raise TooManyPixels(f"{image.width}x{image.height} pixels ({pixels:,}) is more than "
                            f"data.max_pixels={max_pixels:,}; raise data.max_pixels to read it")
    return image


def find_images(root: Path) -> tuple[list[Path], list[dict]]:
    """Image files under `root`, recursively and sorted, following links to folders once each.

    What cannot be searched (an unreadable folder, a link back to a folder already searched, a
    link to a missing file) is returned as a failure to report, not dropped without a word.
    """
    paths, failures, seen = [], [], {os.path.realpath(root)}

    def fail(path: str, error: str) -> None:
        failures.append({"image_id": Path(path).relative_to(root).as_posix(), "source": path, "error": error})

    def unreadable(e: OSError) -> None:
        fail(e.filename, f"{type(e).__name__}: cannot list this folder ({e.strerror})")

    for folder, dirs, files in os.walk(root, onerror=unreadable, followlinks=True):
        for name in list(dirs):
            real = os.path.realpath(os.path.join(folder, name))
            if real in seen:  # a loop, or a second way to a folder: search it once
                dirs.remove(name)
                fail(os.path.join(folder, name), f"link to {real}, a folder already searched; not followed")
            seen.add(real)
        for name in files:
            path = Path(folder, name)
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            problem = file_problem(path)
            if problem is None:
                paths.append(path)
            else:
                fail(str(path), problem)
    return sorted(paths), failures


@functools.cache
def _postprocessor():
    """[-1, 1] -> [0, 1] -> 8 bits, as diffusers' pipelines hand images out."""
    from diffusers.image_processor import VaeImageProcessor  # loaded on first use: `--help` must not wait for diffusers

    return VaeImageProcessor()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] (B, 3, H, W) -> B RGB images."""
    return _postprocessor().postprocess(images.detach().float(), output_type="pil")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    return np.stack([np.asarray(image) for image in to_pil(images)])


def image_grid(tiles: list[Image.Image], min_tile: int = 128, gap: int = 0) -> Image.Image:
    """Tiles side by side, each scaled up (nearest) to at least `min_tile` pixels for viewing,
    `gap` white pixels apart (diffusers' make_image_grid neither scales nor spaces its tiles)."""
    side = max(tiles[0].width, min_tile)
    grid = Image.new("RGB", (side * len(tiles) + gap * (len(tiles) - 1), side), "white")
    for k, tile in enumerate(tiles):
        grid.paste(tile.resize((side, side), Image.Resampling.NEAREST), (k * (side + gap), 0))
    return grid


def data_uri(image: Image.Image, size: int | None = None) -> str:
    """A PNG as a data: URI (a page that embeds its images opens offline), scaled to size x size."""
    if size is not None:
        image = image.convert("RGB").resize((size, size), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
