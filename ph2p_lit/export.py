"""`ph2p export`: a run's prompts in the files training tools read (a `.txt` per image, an
imagefolder `metadata.jsonl`, a CSV), from a finished or a running run.

Every file is written whole or not at all, and a rerun writes only what changed. A caption file
the user wrote is never replaced without `overwrite`; the ones an earlier export wrote are
recorded in the run folder (`exports.json`), so a rerun may update them.
"""

import csv
import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Literal

from .errors import InputError
from .image_sets import source_file
from .runs import RunFolder, file_name, write_text_atomic

COLUMNS = ("file_name", "prompt", "caption", "image_id")  # imagefolder and CSV columns, in this order


def export(
    run: str,
    format: Literal["txt", "imagefolder", "csv"] = "txt",
    out: str | None = None,
    overwrite: bool = False,
    source_root: str | None = None,
) -> Path:
    """Write the prompts of an invert run for other tools.

    Args:
        run: the run folder of `ph2p invert` (the one holding prompts.jsonl).
        format: "txt": one UTF-8 `.txt` per image holding its prompt, beside the image (the
            caption files LoRA and fine-tuning trainers read); "imagefolder": the images and a
            `metadata.jsonl` that `datasets.load_dataset("imagefolder", data_dir=OUT)` loads,
            with `prompt` (and `caption`, `image_id`) as columns; "csv": one UTF-8 CSV with a
            row per image.
        out: txt: a folder to mirror the input tree in (default: beside each image);
            imagefolder: the dataset's folder (default RUN/imagefolder); csv: the file (default
            RUN/prompts.csv).
        overwrite: replace `.txt` files that an earlier export of this run did not write
            (a caption the user made); without it they are kept and counted.
        source_root: the folder the images are read from (and their `.txt` written beside),
            when they moved or the prompts came from someone else; default: each line's own
            `source_root`. A line naming a file outside it is skipped.
    """
    folder = RunFolder(run)
    rows = _rows(folder)
    images = {row["image_id"]: source_file(row, source_root, folder.path, "--source_root")[0] for row in rows}
    if format == "txt":
        where = _write_txt(folder, rows, images, Path(out) if out else None, overwrite)
    elif format == "imagefolder":
        where = _write_imagefolder(rows, images, Path(out) if out else folder.path / "imagefolder")
    elif format == "csv":
        where = _write_csv(rows, Path(out) if out else folder.path / "prompts.csv")
    else:
        raise InputError(f"format={format!r}: use txt, imagefolder or csv")
    return where


def _rows(folder: RunFolder) -> list[dict]:
    if not (folder.results_file("prompts").is_file() or folder.part_files("prompts")):  # ranks', shards' lines too
        raise InputError(f"{folder.path}: no prompts.jsonl here; give the run folder of `ph2p invert` "
                         "(its trainer.default_root_dir)")
    rows = {row["image_id"]: row for row in folder.rows("prompts")}  # every rank's lines, merged or not
    return [rows[k] for k in sorted(rows)]


def mirror_path(image_id: str) -> Path:
    """An image's place in a mirror of the input tree: its id when that is a relative path inside
    the tree (folder runs: the path under data.root), else its run-folder file name (one level)."""
    path = Path(image_id)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return Path(file_name(image_id))
    return path


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _write_txt(folder: RunFolder, rows: list[dict], images: dict[str, Path | None], out: Path | None,
               overwrite: bool) -> Path:
    manifest_path = folder.path / "exports.json"
    written = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    counts = {"written": 0, "unchanged": 0, "kept": 0, "missing": 0, "clash": 0}
    taken = set()
    for row in rows:
        image = images[row["image_id"]]
        if out is None and image is None:  # gone, or outside the images' root: nothing written there
            counts["missing"] += 1
            continue
        # a.png's caption is a.txt, the name trainers look for (a.png and a.jpg share it: the first wins)
        target = image.with_suffix(".txt") if out is None else out / mirror_path(row["image_id"]).with_suffix(".txt")
        key = str(target.resolve())
        if key in taken:
            counts["clash"] += 1
            continue
        taken.add(key)
        text = str(row.get("prompt", "")) + "\n"
        if target.is_file():
            current = target.read_text(encoding="utf-8", errors="replace")
            if current == text:
                counts["unchanged"] += 1
                continue
            ours = written.get(key) == _digest(current)  # an earlier export wrote it, unchanged since
            if not (ours or overwrite):
                counts["kept"] += 1
                continue
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, text)
        written[key] = _digest(text)
        counts["written"] += 1
    write_text_atomic(manifest_path, json.dumps(written, indent=0, sort_keys=True) + "\n")
    where = out if out is not None else "beside each image"
    note = f"; {counts['kept']} existing caption files kept (--overwrite true replaces them)" if counts["kept"] else ""
    note += f"; {counts['missing']} images not found (moved? --source_root names their folder)" \
        if counts["missing"] else ""
    note += f"; {counts['clash']} images share a .txt name with another (a.png, a.jpg): the first kept it" \
        if counts["clash"] else ""
    print(f"export txt: {counts['written']} written, {counts['unchanged']} unchanged, {where}{note}")
    return Path(out) if out is not None else folder.path


def _write_imagefolder(rows: list[dict], images: dict[str, Path | None], out: Path) -> Path:
    """Each image linked (copied across file systems) under its relative name, and
    metadata.jsonl beside them, so the dataset is one self-contained folder."""
    lines, missing = [], 0
    for row in rows:
        image, name = images[row["image_id"]], mirror_path(row["image_id"])
        target = out / name
        if image is None:
            missing += 1
            continue
        if not (target.is_file() and target.stat().st_size == image.stat().st_size):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.link(image, tmp)
            except OSError:
                shutil.copyfile(image, tmp)
            os.replace(tmp, target)
        record = {"file_name": name.as_posix(), "prompt": row.get("prompt", ""),
                  "caption": row.get("caption", ""), "image_id": row["image_id"]}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "metadata.jsonl", "".join(lines))
    note = f"; {missing} images not found (moved? --source_root names their folder)" if missing else ""
    print(f"export imagefolder: {len(lines)} images and metadata.jsonl in {out}{note}")
    return out


def _write_csv(rows: list[dict], out: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image_id", "source", "prompt", "caption"])
    for row in rows:
        writer.writerow([row["image_id"], row.get("source", ""), row.get("prompt", ""), row.get("caption", "")])
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, buffer.getvalue())
    print(f"export csv: {len(rows)} rows in {out}")
    return out
