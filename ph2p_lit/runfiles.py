"""Files of a run folder written so that a crash loses nothing already written: whole-line
appends that are fsynced, whole-file atomic replacement, and a reader that skips a torn line."""

import json
import os
from pathlib import Path


def append_line(path: Path, record: dict) -> None:
    """Append one JSON line in a single write and fsync it: a crash leaves whole lines only
    (at worst a torn last line, which `read_jsonl` skips)."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: a crash leaves the old file (or none), never half a new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a crash mid-write
    return rows
