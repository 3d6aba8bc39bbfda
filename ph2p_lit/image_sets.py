"""Which images a run has, as datasets: one way to find them (a folder, a file list, a Hugging
Face dataset), their captions and negatives, the files that do not open set aside as failures,
and a dataset that decodes each image once per batch."""

import logging
from collections import OrderedDict
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from .backbone import resolve_model
from .errors import InputError
from .images import DEMO_IMAGES, find_images, read_captions, read_text, to_pixels
from .runs import read_jsonl

log = logging.getLogger(__name__)


class DecodedOnce(Dataset):
    """Images with ids (`self.ids`, one per item) that keep their most recently loaded items: a
    batch is asked for once per optimiser step, and decoding a large image at every step costs
    more than the step."""

    keep = 64  # items kept; the DataModule sets it to its batch size
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def image_ids(self) -> list[str]:
        return self.ids

    def __getitem__(self, i: int) -> dict:
        cache = self.__dict__.setdefault("_recent", OrderedDict())
        if i in cache:
            cache.move_to_end(i)
            return cache[i]
        item = cache[i] = self.load(i)
        while len(cache) > self.keep:
            cache.popitem(last=False)
        return item

    def load(self, i: int) -> dict:
        raise NotImplementedError


class ImageFiles(DecodedOnce):
    """Images on disk with optional captions; ids are paths relative to their root."""

    def __init__(self, items: list[dict], resolution: int):
        self.items, self.resolution = items, resolution
        self.ids = [item["image_id"] for item in items]  # built once: planning reads it per image

    def load(self, i: int) -> dict:
        item = self.items[i]
        with Image.open(item["source"]) as image:
            pixels = to_pixels(image, self.resolution)
        if "negative_source" not in item:
            return {**item, "pixels": pixels}
        with Image.open(item["negative_source"]) as image:
            return {**item, "pixels": pixels, "negative_pixels": to_pixels(image, self.resolution)}


class HFImages(DecodedOnce):
    """A Hugging Face `datasets` dataset with an image column and an optional caption column."""

    def __init__(self, dataset, image_column: str, caption_column: str | None, name: str, resolution: int):
        self.dataset, self.image_column, self.caption_column = dataset, image_column, caption_column
        self.name, self.resolution = name, resolution
        self.ids, self.sources = self._names()

    def _names(self) -> tuple[list[str], list[str]]:
        """Each image's file where the dataset keeps one (an imagefolder does): its name is the id
        and its path the source, so the report, `reconstruct` and `generate` find the image.
        Otherwise (images stored as bytes) the row number and `name[row]`."""
        import datasets  # loaded only for a dataset source: it takes a second to import

        rows = range(len(self.dataset))
        try:
            column = self.dataset.cast_column(self.image_column, datasets.Image(decode=False))[self.image_column]
            paths = [cell.get("path") if isinstance(cell, dict) else None for cell in column]
        except (ValueError, TypeError):  # not an image feature
            paths = [None] * len(self.dataset)
        if all(p and Path(p).is_file() for p in paths):
            names = [Path(p).name for p in paths]
            ids = names if len(set(names)) == len(names) else [Path(p).as_posix() for p in paths]
            return ids, [str(p) for p in paths]
        return [f"{i:06d}" for i in rows], [f"{self.name}[{i}]" for i in rows]

    def load(self, i: int) -> dict:
        row = self.dataset[i]
        caption = row.get(self.caption_column) if self.caption_column else None
        return {
            "image_id": self.ids[i],
            "source": self.sources[i],
            "caption": caption or "",
            "pixels": to_pixels(row[self.image_column], self.resolution),
        }


def file_items(root: str | None, files: list[str] | str | None) -> tuple[list[dict], list[dict]]:
    """(items, failures) of a folder (searched recursively; "demo": the shipped renders) or a file
    list (paths, or a text file of them). Each item: image_id (the path relative to the folder,
    or as listed), source, caption (metadata.jsonl, else a .txt beside the image, else "")."""
    failures = []
    if root is not None:
        folder = Path(DEMO_IMAGES if root == "demo" else root)
        if not folder.is_dir():
            raise InputError(f"data.root={root}: no such folder")
        paths, failures = find_images(folder)
        captions = read_captions(folder)
    else:
        if isinstance(files, str):
            listing = Path(files)
            if not listing.is_file():
                raise InputError(f"data.files={files}: no such list file")
            files = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        paths, folder, captions = [Path(f) for f in files], None, {}
        for parent in {path.parent for path in paths}:  # each listed file's folder's metadata.jsonl
            captions |= {(parent / name).as_posix(): text for name, text in read_captions(parent).items()}
    items = []
    for path in paths:
        rel = path.relative_to(folder).as_posix() if folder else path.as_posix()
        beside = path.with_suffix(".txt")
        caption = captions.get(rel) or (read_text(beside).strip() if beside.is_file() else "")
        items.append({"image_id": rel, "source": str(path), "caption": caption})
    return items, failures


def pair_negatives(items: list[dict], negatives: Path) -> list[dict]:
    """Give every target its negative image (Algorithm 2); a target without one is an error."""
    if negatives.is_dir():
        pairs = {item["image_id"]: negatives / item["image_id"] for item in items}
    elif negatives.suffix == ".jsonl":
        pairs = {row["image"]: Path(row["negative"]) for row in read_jsonl(negatives)}
    else:
        pairs = {item["image_id"]: negatives for item in items}
    for item in items:
        path = pairs.get(item["image_id"])
        if path is None or not path.is_file():
            raise InputError(f"data.negatives={negatives}: no negative image for {item['image_id']}"
                             + (f" (expected {path})" if path else ""))
        item["negative_source"] = str(path)
    return items


def readable(items: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the items whose images open, a failure for each other): one bad file never stops a run."""
    good, failures = [], []
    for item in items:
        try:
            for key in ("source", "negative_source"):
                if key in item:
                    with Image.open(item[key]) as image:
                        # verify() reads no pixels: a truncated or corrupt file passes it and
                        # then stops the run at every restart. Decoding it here costs one read.
                        image.load()
            good.append(item)
        except Exception as e:  # PIL raises many types for broken files
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
            failures.append({"image_id": item["image_id"], "source": item["source"], "error": reason})
            log.warning("skipping %s: %s", item["source"], reason)
    return good, failures


def hub_images(name: str, split: str, image_column: str, caption_column: str | None, limit: int | None,
               resolution: int) -> HFImages:
    """A Hugging Face dataset (hub id, cache or local folder) as images with captions."""
    import datasets  # loaded only for a dataset source: it takes a second to import

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # hub, network and file errors of many types; all say the same to a user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"data.dataset={name!r}: cannot load it ({reason}); give a dataset id "
                         "on the hub or in the local cache, or a local folder") from None
    if image_column not in ds.column_names:
        raise InputError(f"data.image_column={image_column!r} not in {name} ({ds.column_names})")
    caption = caption_column if caption_column in ds.column_names else None
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    return HFImages(ds, image_column, caption, name, resolution)


def model_resolution(model: str, local_files_only: bool) -> int:
    """The model's native resolution, from its VAE config (no weights are read)."""
    from diffusers import AutoencoderKL  # loaded here, not at import: `invert --help` must not wait for it

    try:
        config = AutoencoderKL.load_config(resolve_model(model), subfolder="vae", local_files_only=local_files_only)
    except OSError as e:
        if Path(resolve_model(model)).is_dir():
            raise InputError(f"data.model={model!r}: cannot read its vae/config.json to find the resolution; "
                             "set data.resolution or give a complete model folder") from None
        raise InputError(f"model {model!r}: not in the local Hugging Face cache and the hub did not answer "
                         f"({str(e).strip().splitlines()[0][:150] if str(e).strip() else type(e).__name__}); "
                         f"download it first (`hf download {model}`) or give a local folder") from None
    return int(config["sample_size"])
