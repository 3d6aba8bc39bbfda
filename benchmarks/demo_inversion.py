"""Inversion quality on held-out demo renders: are the true content words in the recovered prompt,
and does the oracle read the truth in images regenerated from it?

python benchmarks/demo_inversion.py --config configs/demo.yaml --n 50 [--model.KEY=VALUE ...]
Any further `--model.*` / `--data.*` / `--trainer.*` option goes to `ph2p invert`.
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch

from ph2p_lit.backbone import Backbone
from ph2p_lit.demo.evaluate import (
    agreement,
    oracle_reads,
    prompt_scores,
    summarise_prompt_scores,
)
from ph2p_lit.demo.oracle import AttributeOracle
from ph2p_lit.demo.world import CONTENT_ATTRIBUTES, export_imagefolder
from ph2p_lit.lightning_cli import run_inversion as invert
from ph2p_lit.runs import read_jsonl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--seed", type=int, default=3000, help="render seed (training used 0-2, demo images 1000)")
    p.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--no-oracle", action="store_true", help="skip regenerating images (prompt scores only)")
    args, extra = p.parse_known_args()
    torch.set_num_threads(2)
    work = Path(args.out or tempfile.mkdtemp(prefix="ph2p_eval_"))
    images = export_imagefolder(work / "images", args.n, args.seed)
    run = work / "run"
    invert([f"--config={args.config}", f"--data.root={images}", f"--trainer.default_root_dir={run}",
            *extra])

    truth = {json.loads(l)["file_name"]: json.loads(l) for l in (images / "metadata.jsonl").read_text().splitlines()}
    rows = sorted(read_jsonl(run / "prompts.jsonl"), key=lambda r: r["image_id"])
    truths = [truth[r["image_id"]] for r in rows]
    scores = summarise_prompt_scores([prompt_scores(r["prompt"], t) for r, t in zip(rows, truths)])
    print(f"\n{len(rows)} held-out renders (seed {args.seed}), config {args.config} {' '.join(extra)}")
    print("| measure | colour | shape | background | all content words |")
    print("|---|---|---|---|---|")
    for kind in ("present", "exact"):
        cells = [scores[f"{a}_{kind}"] for a in CONTENT_ATTRIBUTES] + [scores[f"content_words_{kind}"]]
        print(f"| true word {kind} in prompt | " + " | ".join(f"{100 * c:.0f}%" for c in cells) + " |")
    if not args.no_oracle:
        backbone, oracle = Backbone.from_pretrained("demo"), AttributeOracle.load()
        for name, prompts in (("recovered prompt", [r["prompt"] for r in rows]), ("true caption", [t["text"] for t in truths])):
            acc = agreement(oracle_reads(backbone, oracle, prompts, guidance=args.guidance), truths)
            cells = [acc[a] for a in CONTENT_ATTRIBUTES]
            print(f"| oracle on image from {name} | " + " | ".join(f"{100 * c:.0f}%" for c in cells)
                  + f" | {100 * sum(cells) / 3:.0f}% |")
    seconds = sum(r["seconds"] for r in rows) / len(rows)
    print(f"\nmean seconds per image: {seconds:.1f}; run folder: {run}")
    for r, t in list(zip(rows, truths))[:8]:
        print(f"  {t['text']:<55} -> {r['prompt']}")


if __name__ == "__main__":
    main()
