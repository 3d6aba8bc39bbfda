"""Which images a run has, as datasets: one way to find them (a folder, a file list, a Hugging
Face dataset, a prompts file), their captions and negatives, the files that do not open set aside
as failures, and a dataset that decodes each image once per batch.

Every item names its image file as `source` (absolute, so a result line written from it is found
from any folder) and `source_root`, the folder holding the files it names; a prompts file's images
are read back only inside a root (`source_file`), as the file may come from someone else.
"""

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path

from torch.utils.data import Dataset

from .backbone import resolve_model
from .errors import InputError
from .images import (
    DEMO_IMAGES,
    TooManyPixels,
    file_problem,
    find_images,
    open_image,
    read_captions,
    read_text,
    to_pixels,
)
from .runs import read_jsonl
from .terminal import one_line

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

    def __init__(self, items: list[dict], resolution: int, max_pixels: int):
        self.items, self.resolution, self.max_pixels = items, resolution, max_pixels
        self.ids = [item["image_id"] for item in items]  # built once: planning reads it per image

    def load(self, i: int) -> dict:
        item = self.items[i]
        with open_image(item["source"], self.max_pixels) as image:
            pixels = to_pixels(image, self.resolution)
        if "negative_source" not in item:
            return {**item, "pixels": pixels}
        with open_image(item["negative_source"], self.max_pixels) as image:
            return {**item, "pixels": pixels, "negative_pixels": to_pixels(image, self.resolution)}


class HFImages(DecodedOnce):
    """A Hugging Face `datasets` dataset with an image column and an optional caption column."""

    def __init__(self, dataset, image_column: str, caption_column: str | None, name: str, resolution: int):
        self.dataset, self.image_column, self.caption_column = dataset, image_column, caption_column
        self.name, self.resolution = name, resolution
        self.ids, self.sources = self._names()
        self.source_root = common_folder(self.sources) if self.sources and Path(self.sources[0]).is_absolute() else None

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
            return ids, [os.path.abspath(p) for p in paths]
        return [f"{i:06d}" for i in rows], [f"{self.name}[{i}]" for i in rows]

    def load(self, i: int) -> dict:
        row = self.dataset[i]
        caption = row.get(self.caption_column) if self.caption_column else None
        item = {
            "image_id": self.ids[i],
            "source": self.sources[i],
            "caption": "" if caption is None else str(caption),  # a column of numbers: their text
            "pixels": to_pixels(row[self.image_column], self.resolution),
        }
        return item if self.source_root is None else {**item, "source_root": self.source_root}


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
            files = [line.strip() for line in read_text(listing).splitlines() if line.strip()]
        paths, folder, captions = [Path(f) for f in files], None, {}
        for parent in {path.parent for path in paths}:  # each listed file's folder's metadata.jsonl
            captions |= {(parent / name).as_posix(): text for name, text in read_captions(parent).items()}
    source_root = os.path.abspath(folder) if folder else common_folder(paths)
    items = []
    for path in paths:
        rel = path.relative_to(folder).as_posix() if folder else path.as_posix()
        beside = path.with_suffix(".txt")
        caption = captions.get(rel) or (read_text(beside).strip() if beside.is_file() else "")
        items.append({"image_id": rel, "source": os.path.abspath(path), "source_root": source_root, "caption": caption})
    return each_file_once(items), failures


def each_file_once(items: list[dict]) -> list[dict]:
    """The items with each file once, under the first name it was listed by: `a.png`, `./a.png`,
    its absolute path or a link to it would otherwise be two results for one image (or two with
    one image id)."""
    kept, first_id, repeated = [], {}, []
    for item in items:
        real = os.path.realpath(item["source"])
        if real in first_id:
            repeated.append((item["image_id"], first_id[real]))
            continue
        first_id[real] = item["image_id"]
        kept.append(item)
    if repeated:
        log.warning("data: %d listed image(s) repeat a file listed before (first: %s is %s); each file is used "
                    "once, under the first name it is listed by", len(repeated), *map(one_line, repeated[0]))
    return kept


def common_folder(paths) -> str:
    """The deepest folder holding every one of these files (absolute): a line's `source_root`."""
    return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]) if paths else ""


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
        item["negative_source"] = os.path.abspath(path)
        item["source_root"] = os.path.commonpath([item["source_root"], os.path.dirname(item["negative_source"])])
    return items


def readable(items: list[dict], max_pixels: int) -> tuple[list[dict], list[dict]]:
    """(the items whose images open within `max_pixels`, a failure for each other): one bad file
    never stops a run."""
    good, failures = [], []
    for item in items:
        reason = next(filter(None, (image_problem(item[key], max_pixels)
                                    for key in ("source", "negative_source") if key in item)), None)
        if reason is None:
            good.append(item)
            continue
        failures.append({"image_id": item["image_id"], "source": item["source"], "error": reason})
        log.warning("skipping %s: %s", one_line(item["source"]), one_line(reason))
    return good, failures


def image_problem(path: str, max_pixels: int) -> str | None:
    """Why the image at `path` cannot be used (None: it can): not a file (a pipe is never opened),
    more pixels than the budget (refused from its header), or a file that does not decode."""
    problem = file_problem(path)
    if problem is not None:
        return problem
    try:
        with open_image(path, max_pixels) as image:
            # verify() reads no pixels: a truncated or corrupt file passes it and then stops the
            # run at every restart. Decoding it here costs one read.
            image.load()
    except TooManyPixels as e:
        return str(e)
    except Exception as e:  # PIL raises many types for broken files
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


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
    if caption is not None and not isinstance(ds.features[caption], datasets.Value):
        raise InputError(f"data.caption_column={caption!r}: in {name} it holds {type(ds.features[caption]).__name__} "
                         "values, not text; name a column of captions (or null for none)")
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


# A prompts file's lines: what each key must be, and whether a line must have it.
PROMPT_LINE_KEYS = {"image_id": True, "prompt": True, "source": False, "source_root": False, "caption": False,
                    "edit": False}


def prompted_items(prompts: Path, source_root: str | None, option: str) -> tuple[list[dict], list[dict]]:
    """(items, failures) of a prompts.jsonl (an invert run's, or one written by hand or by someone
    else): one item per image id (a later line wins), image_id, source (found by `source_file`),
    caption, prompt and edit, sorted by id. A line that is not a result line stops here with one
    line naming the file, the line and the key; an image that is not found (gone, not a regular
    file, outside the root) is a failure with the reason, and the others go on. `option` is the
    setting that states the root (data.source_root, --source_root), named in the reasons."""
    rows = {}
    for number, row in _numbered_lines(prompts):
        _check_prompt_line(prompts, number, row)
        rows[row["image_id"]] = row
    items, failures = [], []
    for image_id in sorted(rows):
        row = rows[image_id]
        path, why = source_file(row, source_root, prompts.parent, option)
        if path is None:
            failures.append({"image_id": image_id, "source": row.get("source") or "", "error": why})
            log.warning("skipping %s: %s", one_line(image_id), one_line(why))
            continue
        items.append({"image_id": image_id, "source": str(path), "caption": row.get("caption") or "",
                      "prompt": row["prompt"], "edit": row.get("edit") or ""})
    return items, failures


def _numbered_lines(path: Path):
    """(line number, parsed JSON) of each non-blank line; a last line without its newline that is
    not JSON is a line still being written (or torn by a crash) and is left out."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}); give a prompts.jsonl of `ph2p invert`") from None
    lines = text.split("\n")  # not splitlines(): a JSON string may hold U+2028 and the like
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                return
            raise InputError(f"{path}: line {number} is not JSON ({e.msg}); fix or delete it") from None


def _check_prompt_line(path: Path, number: int, row) -> None:
    where = f"{path}: line {number}"
    if not isinstance(row, dict):
        raise InputError(f"{where} is not a JSON object; each line is one image's result: fix or delete it")
    for key, required in PROMPT_LINE_KEYS.items():
        value = row.get(key)
        if value is None and not required:
            continue
        if not isinstance(value, str) or "\x00" in value or (key == "image_id" and not value):
            found = "missing" if key not in row else json.dumps(value)[:60]
            kind = "a non-empty text" if key == "image_id" else "a text"
            raise InputError(f"{where}: {key} is {found}; it must be {kind} without NUL: fix or delete the line")


def source_file(row: dict, stated_root: str | None, default_root: Path, option: str,
                key: str = "source") -> tuple[Path | None, str]:
    """Where a result line's image (`key`: source or negative_source) is, read only inside a root.

    The line's path is taken from its own source_root (invert writes the folder it found the
    images in; a relative path is relative to it), else from the root the user states (`option`),
    else from `default_root` (the prompts file's folder). It is read only inside the stated root,
    else inside that same folder; with a stated root, a file under the line's source_root but
    outside the stated one is looked for at the same place under it (the images moved). Paths are
    compared as written: a link inside the root is followed, as when the images were found.
    Returns (the file, "") or (None, why not)."""
    value, recorded = row.get(key), row.get("source_root")
    recorded = os.path.abspath(recorded) if isinstance(recorded, str) and recorded and "\x00" not in recorded else None
    if not isinstance(value, str) or not value or "\x00" in value:
        return None, f"the line names no {key} file"
    base = recorded or os.path.abspath(stated_root or default_root)
    root = Path(os.path.abspath(stated_root) if stated_root else base)
    path = Path(os.path.normpath(Path(base) / value))  # an absolute value stays as it is
    if not path.is_relative_to(root) and stated_root and recorded and path.is_relative_to(recorded):
        path = root / path.relative_to(recorded)
    if not path.is_relative_to(root):
        return None, (f"{value} is outside {root}, the folder this line's images are read from; if you trust "
                      f"this prompts file, set {option} to a folder that holds it")
    if not path.is_file():
        return None, f"{path}: " + ("not a regular file" if path.exists() else "no such file")
    return path, ""
