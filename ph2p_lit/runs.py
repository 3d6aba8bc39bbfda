"""The run folder: the one owner of the files a command writes per image.

What it owns: each image id's file name (`file_name`: one name per id, never shared), per-rank
result files and their merge (`RunFolder.append` / `merge`), whole-line appends that are fsynced
and repair a torn last line, whole-file atomic writes (`write_text_atomic`, `save_atomic`), the
set of finished images (`RunFolder.rows` / `done_keys`), the lock that keeps a second run out
(`RunLock`), and config.yaml, written by the lock's holder (`RunFolder.write_config`). Written so
that a crash loses nothing already written.
"""

import errno
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from .errors import InputError

_write = os.write  # one name for the tests' injected faults (a full disk mid-line)


def _end_of_whole_lines(fd: int) -> tuple[int, bytes]:
    """Where the next line goes, and what must come before it. A last line without its newline is
    kept if it is whole JSON (a tool that writes "\n".join(lines) leaves one, and read_jsonl already
    counts it as done): the next line then starts with the newline it lacks. Otherwise it is a
    write cut by a crash or a full disk, and is truncated (its image is simply not done)."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size, b""
    start = size
    while start > 0:
        chunk_start = max(0, start - 65536)
        newline = os.pread(fd, start - chunk_start, chunk_start).rfind(b"\n")
        if newline >= 0:
            start = chunk_start + newline + 1
            break
        start = chunk_start
    if _parses(os.pread(fd, size - start, start)):
        return size, b"\n"
    os.ftruncate(fd, start)
    return start, b""


def _parses(line: str | bytes) -> bool:
    """Whether a line is whole: it parses, as read_jsonl reads it (so reading and appending agree
    on what is done; a line cut short never parses, as a JSON object closes only at its end)."""
    try:
        json.loads(line)
    except ValueError:  # JSONDecodeError, or bytes cut inside a UTF-8 character
        return False
    return True


def append_line(path: Path, record: dict) -> None:
    """Append one JSON line and fsync it. A torn last line left by an earlier crash is cut off
    first, a whole one without its newline kept (see _end_of_whole_lines); a write that fails
    (full disk, read-only folder) is undone and reported in one line, so the file holds whole
    lines only."""
    line = (json.dumps(record) + "\n").encode()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        size, before = _end_of_whole_lines(fd)
        data = before + line
        try:
            os.lseek(fd, size, os.SEEK_SET)
            written = 0
            while written < len(data):  # os.write may write part of it
                written += _write(fd, data[written:])
            os.fsync(fd)
        except OSError as e:
            os.ftruncate(fd, size)
            raise _write_error(path, e) from None
    finally:
        os.close(fd)


def _write_error(path: Path, e: OSError) -> InputError:
    if e.errno == errno.ENOSPC:
        hint = "free some space and run the same command again: the finished images are kept"
    elif e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        hint = "the run folder is not writable: choose another trainer.default_root_dir"
    else:
        hint = "check the run folder (trainer.default_root_dir)"
    return InputError(f"{path}: cannot write ({e.strerror or e}); {hint}")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: a crash leaves the old file (or none), never half a new one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, e) from None


def save_atomic(path: Path, save: Callable[[Path], None]) -> None:
    """`save(tmp)` writes the file (an image, a tensor, an archive), then it takes `path`'s
    place in one rename: readers never see half a file, a killed run leaves the old one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")  # keeps the suffix: PIL picks the format by it
    try:
        save(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, e) from None


def file_name(image_id: str) -> str:
    """The file name an image's results are kept under: the id with "/" as "__", extension kept
    (a.png and a.jpg stay apart). Ids the plain rule could confuse ("a__b" vs "a/b", "a_/b" vs
    "a/_b"), hidden names and names too long for a file system get a hash of the id after "~"
    instead, so no two ids ever share a name."""
    name = image_id.replace("/", "__")
    ambiguous = any(s in image_id for s in ("__", "_/", "/_", "~")) or image_id.startswith(".")
    if ambiguous or len(name.encode()) > 200:
        digest = hashlib.sha1(image_id.encode()).hexdigest()[:10]
        name = f"{name.lstrip('.').encode()[:150].decode(errors='ignore')}~{digest}"
    return name


def merge_rank_files(final: Path, key) -> None:
    """Fold the other ranks' files (final's name with .rank<N> before .jsonl) into `final`. Run on
    one process too: a DDP run resumed on a single device finds the other ranks' files."""
    fold_into(final, sorted(final.parent.glob(f"{final.stem}.rank*.jsonl")), key)


def fold_into(final: Path, parts: list[Path], key) -> None:
    """`final` and `parts` as one file: sorted, one line per key(row) (a later file's line wins),
    written atomically, then the parts removed."""
    if not parts:
        return
    rows = {key(r): r for path in [final, *parts] if path.is_file() for r in read_jsonl(path)}
    write_text_atomic(final, "".join(json.dumps(rows[k]) + "\n" for k in sorted(rows)))
    for path in parts:
        path.unlink()


def read_jsonl(path: str | Path) -> list[dict]:
    """The file's whole lines, parsed; a line torn by a crash mid-write is left out (and cut
    before the next append: append_line keeps the same lines)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # torn by a crash mid-write; _parses is the same test
            continue
    return rows


class RunLock:
    """An exclusive lock on a run folder (flock on `run.lock`), held while a run writes there: a
    second run started on the same folder stops with one line instead of inverting every image
    again beside the first. The kernel drops the lock when the process dies, so a killed run
    leaves nothing to clean up."""

    remedy = "wait for it to finish or choose another trainer.default_root_dir"  # what the refusal tells to do

    def __init__(self, folder: Path, remedy: str | None = None, name: str = "run.lock", wait: float = 0.0):
        self.path, self.fd, self.remedy = Path(folder) / name, None, remedy or self.remedy
        self.wait = wait  # seconds to wait for a holder that only merges (shard jobs), not to refuse at once

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a read-only folder: the run's first write, so said here in one line
            raise _write_error(self.path, e) from None
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                os.close(fd)
                raise InputError(f"{self.path.parent}: another run is writing to this run folder "
                                 f"({self.path.name}); {self.remedy}") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RunFolder:
    """One command's run folder (trainer.default_root_dir): where its per-image results live.

    Results are `<kind>.jsonl` ("prompts", "reconstructions"): rank 0 writes that file, rank r
    `<kind>.rank<r>.jsonl`, and `merge` folds them into the first when a run starts (what a killed
    run left) and when it ends. Readers go through `rows`, which sees every rank's lines whether
    merged yet or not.
    """

    def __init__(self, path: str | Path, shard: str | None = None):
        self.path = Path(path)
        self.shard = shard  # "i-of-N": a job of a sharded run writes <kind>.shard-i-of-N.jsonl

    def results_file(self, kind: str, rank: int = 0) -> Path:
        stem = kind if self.shard is None else f"{kind}.shard-{self.shard}"
        return self.path / (f"{stem}.jsonl" if rank == 0 else f"{stem}.rank{rank}.jsonl")

    def append(self, kind: str, record: dict, rank: int = 0) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        append_line(self.results_file(kind, rank), record)

    def rows(self, kind: str) -> list[dict]:
        """Every rank's and shard's result lines, checked: a line without image_id is named, not skipped."""
        rows = []
        for path in [self.path / f"{kind}.jsonl", *self.part_files(kind)]:
            if not path.is_file():
                continue
            found = read_jsonl(path)
            if any(not isinstance(row, dict) or "image_id" not in row for row in found):
                raise InputError(f"{path}: a line without image_id; each line is one image's result: "
                                 "delete that line (its image is then done again)")
            rows += found
        return rows

    def done_keys(self, kind: str) -> set[tuple[str, str | None]]:
        """(image id, settings key) of every result already in the folder."""
        return {(row["image_id"], row.get("settings")) for row in self.rows(kind)}

    def add_failures(self, failures: list[dict]) -> None:
        """List the images that could not be read in failures.jsonl, each (image id, reason) once:
        a resumed run finds the same bad files again."""
        path = self.path / "failures.jsonl"
        listed = {(f.get("image_id"), f.get("error")) for f in read_jsonl(path)} if path.is_file() else set()
        for failure in failures:
            if (failure["image_id"], failure["error"]) not in listed:
                self.append("failures", failure)
                listed.add((failure["image_id"], failure["error"]))

    def part_files(self, kind: str) -> list[Path]:
        """The files ranks and shards write before a merge: <kind>.rank<r>.jsonl,
        <kind>.shard-i-of-N.jsonl and <kind>.shard-i-of-N.rank<r>.jsonl."""
        return sorted(self.path.glob(f"{kind}.rank*.jsonl")) + sorted(self.path.glob(f"{kind}.shard-*.jsonl"))

    def merge(self, kind: str, key=lambda row: row["image_id"]) -> None:
        """Fold this run's (or this shard's) rank files into its results file."""
        merge_rank_files(self.results_file(kind), key)

    def merge_shards(self, kind: str, key=lambda row: row["image_id"]) -> bool:
        """Fold every shard's and rank's files into <kind>.jsonl, when no job holds any of the
        folder's locks (run.lock, run.shard-*.lock): the last shard job to end, or `ph2p merge`.
        Returns whether it merged (False: a job is still writing; it merges when it ends)."""
        names = sorted({"run.lock", *(p.name for p in self.path.glob("run.shard-*.lock"))})
        held = []
        try:
            for name in names:  # in one order, so two merging jobs cannot hold half each for long
                lock = RunLock(self.path, name=name)
                lock.acquire()
                held.append(lock)
        except InputError:
            return False
        else:
            fold_into(self.path / f"{kind}.jsonl", self.part_files(kind), key)
            return True
        finally:
            for lock in held:
                lock.release()

    def image_file(self, folder: str, image_id: str, suffix: str) -> Path:
        """`<run>/<folder>/<file_name(image_id)><suffix>`, its folder made."""
        (self.path / folder).mkdir(parents=True, exist_ok=True)
        return self.path / folder / f"{file_name(image_id)}{suffix}"

    def lock(self, remedy: str | None = None) -> "RunLock":
        """The folder's lock, or a shard job's own (run.shard-i-of-N.lock: the shards of one run
        write side by side; a second job of the same shard is refused)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _write_error(self.path, e) from None
        if self.shard is None:
            return RunLock(self.path, remedy)
        return RunLock(self.path, remedy, name=f"run.shard-{self.shard}.lock", wait=30.0)  # a merge takes seconds

    def write_config(self, text: str) -> None:
        """config.yaml: the settings the folder's prompts are made with. Written by the run that holds
        the lock once it has images to invert, so a run refused by the lock, or a rerun with new
        settings that finds every image done, leaves the config of the prompts already there."""
        write_text_atomic(self.path / "config.yaml", text)


def merge_run(run: str) -> None:
    """Fold a sharded (or DDP) run's files into one prompts.jsonl: every shard's lines, one per
    image. Refused, in one line, while a job of the run is still writing.

    Args:
        run: the run folder (trainer.default_root_dir of the shard jobs).
    """
    folder = RunFolder(run)
    if not folder.path.is_dir():
        raise InputError(f"{run}: no such run folder")
    parts = folder.part_files("prompts")
    if not folder.merge_shards("prompts"):
        raise InputError(f"{run}: a job is still writing to this run folder (a run.*.lock is held); "
                         "merge when it ends (the last shard job merges by itself)")
    print(f"merged {len(parts)} files: {len(read_jsonl(folder.path / 'prompts.jsonl'))} prompts in "
          f"{folder.path / 'prompts.jsonl'}" if parts else f"{folder.path}: nothing to merge")
