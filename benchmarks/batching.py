"""Images per second at batch size 1 vs B on the demo model, and whether the prompts agree.

python benchmarks/batching.py [--images 8] [--steps 10] [--batch 8]

Both runs use configs/demo.yaml's model settings on the bundled images, one after the other in
one process; the ratio is the number to read (absolute times on a shared CPU are noisy).
"""

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml

from ph2p_lit.backbone import DEMO_MODEL
from ph2p_lit.callbacks import ResultsWriter
from ph2p_lit.data import ImageDataModule
from ph2p_lit.inversion import PromptInversion
from ph2p_lit.runs import read_jsonl


def run(batch_size: int, images: int, steps: int, out: Path) -> tuple[float, dict]:
    model_cfg = yaml.safe_load(Path("configs/demo.yaml").read_text())["model"]
    module = PromptInversion(**{**model_cfg, "steps": steps, "batch_size": batch_size})
    data = ImageDataModule(root=str(Path(DEMO_MODEL).parent / "images"), batch_size=batch_size, steps=steps,
                           limit=images)
    trainer = L.Trainer(default_root_dir=out, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ResultsWriter()])
    module.setup("fit")  # load the model outside the timed part
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    return seconds, {r["image_id"]: r["token_ids"] for r in read_jsonl(out / "prompts.jsonl")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="ph2p_batching_"))
    results = {b: run(b, args.images, args.steps, work / f"b{b}") for b in (1, args.batch)}
    base = results[1][0]
    print("| batch size | seconds | seconds per image | image-steps per second | speed-up |")
    print("|---|---|---|---|---|")
    for b, (seconds, _) in results.items():
        print(f"| {b} | {seconds:.1f} | {seconds / args.images:.2f} | {args.images * args.steps / seconds:.1f} | "
              f"{base / seconds:.2f}x |")
    same = results[1][1] == results[args.batch][1]
    print(f"\n{args.images} demo images, {args.steps} steps, configs/demo.yaml; "
          f"prompts at batch {args.batch} equal those at batch 1: {same}")


if __name__ == "__main__":
    main()
