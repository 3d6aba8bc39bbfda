"""The run's bookkeeping at scale, without a model: list a folder of N images, check they open,
skip the ones a prompts.jsonl of N lines already has, plan the batches, look up the progress
bar's position at every step, and merge shard files of N lines. Prints seconds and peak Python
memory per stage and N, so growth worse than linear shows as a ratio above 10 per 10x.

    python benchmarks/bookkeeping.py --sizes 1000 10000 100000 --folder /tmp/bookkeeping
"""

import argparse
import io
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

from ph2p_lit.batching import RepeatedBatches, rank_batches
from ph2p_lit.image_sets import file_items, readable
from ph2p_lit.images import MAX_PIXELS
from ph2p_lit.runs import RunFolder, merge_rank_files

STEPS = 20  # optimiser steps per batch, as configs/demo.yaml
BATCH = 8


def make_folder(folder: Path, n: int) -> None:
    """n tiny PNGs in 100 sub-folders, and a metadata.jsonl per sub-folder (made once, reused)."""
    marker = folder / f".made{n}"
    folder.mkdir(parents=True, exist_ok=True)
    if marker.is_file():
        return
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="PNG")
    data = buffer.getvalue()
    for i in range(n):
        sub = folder / f"d{i % 100:02d}"
        sub.mkdir(exist_ok=True)
        (sub / f"img{i:07d}.png").write_bytes(data)
    marker.touch()


def stage(name: str, results: dict, fn):
    tracemalloc.start()
    started = time.perf_counter()
    out = fn()
    results[name] = (time.perf_counter() - started, tracemalloc.get_traced_memory()[1] / 2**20)
    tracemalloc.stop()
    return out


def measure(folder: Path, n: int, run: Path) -> dict:
    results = {}
    items, _ = stage("list the folder", results, lambda: file_items(str(folder), None))
    assert len(items) == n, (len(items), n)
    items, _ = stage("check each image opens", results, lambda: readable(items, MAX_PIXELS))

    run.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"image_id": it["image_id"], "prompt": "a red circle on a white background",
                                "token_ids": list(range(7)), "best_loss": 0.1}) + "\n" for it in items)
    (run / "prompts.jsonl").write_text(lines[: len(lines) // 2 + lines[len(lines) // 2:].find("\n") + 1])
    (run / "prompts.rank1.jsonl").write_text(lines)
    done = stage("read the done set (N lines)", results, lambda: RunFolder(run).done_keys("prompts"))
    ids = [it["image_id"] for it in items]
    todo = stage("skip the done images", results, lambda: [i for i, image_id in enumerate(ids)
                                                           if (image_id, None) not in done])
    assert todo == []
    plan = stage("plan the batches (all N)", results,
                 lambda: [(b, STEPS) for b in rank_batches(list(range(n)), BATCH, 1, 0)])
    sampler = RepeatedBatches(plan)

    def bar_positions():  # what the progress bar asks at every step of the run
        return [sampler.images_at(step) for step in range(0, len(sampler), max(1, len(sampler) // 20000))]

    stage("progress bar lookups (20,000 steps)", results, bar_positions)
    stage("merge shard files (2 x N lines)", results,
          lambda: merge_rank_files(run / "prompts.jsonl", key=lambda row: row["image_id"]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--folder", default="/tmp/ph2p_bookkeeping")
    args = parser.parse_args()
    table = {}
    for n in args.sizes:
        folder = Path(args.folder) / f"images{n}"
        make_folder(folder, n)
        table[n] = measure(folder, n, Path(args.folder) / f"run{n}")
    names = list(table[args.sizes[0]])
    print(f"\n{'stage':<38}" + "".join(f"{f'N={n:,}':>22}" for n in args.sizes))
    for name in names:
        cells = "".join(f"{table[n][name][0]:>10.3f} s {table[n][name][1]:>7.1f} MB" for n in args.sizes)
        print(f"{name:<38}{cells}")
    total = {n: sum(s for s, _ in table[n].values()) for n in args.sizes}
    print(f"{'total':<38}" + "".join(f"{total[n]:>10.3f} s {'':>10}" for n in args.sizes))


if __name__ == "__main__":
    main()
