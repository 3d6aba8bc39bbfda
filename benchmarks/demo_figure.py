"""The README picture: each target render, its recovered prompt, and images generated from it.

python benchmarks/demo_figure.py --run runs/demo [--out runs/figures/demo.png] [--samples 3]

The README's picture is this with --out docs/demo.png; by default the clone's tracked files stay as they are.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from ph2p_lit.backbone import Backbone
from ph2p_lit.cli import quiet_libraries
from ph2p_lit.generate import generate
from ph2p_lit.runs import read_jsonl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run", default="runs/demo")
    p.add_argument("--out", default="runs/figures/demo.png")
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--guidance", type=float, default=7.5)
    args = p.parse_args()
    quiet_libraries()  # as the ph2p commands: no weight-loading bars
    rows = sorted(read_jsonl(Path(args.run) / "prompts.jsonl"), key=lambda r: r["image_id"])
    backbone = Backbone.from_pretrained("demo")
    n, k = len(rows), args.samples
    fig, axes = plt.subplots(n, k + 1, figsize=(1.3 * (k + 1) + 4.2, 1.3 * n))
    for i, row in enumerate(rows):
        target = Image.open(row["source"]).convert("RGB")
        generated = generate(backbone, [row["prompt"]] * k, guidance=args.guidance, seed=i)
        pictures = [np.asarray(target)] + [((g.permute(1, 2, 0) + 1) * 127.5).byte().numpy() for g in generated]
        for j, picture in enumerate(pictures):
            axes[i, j].imshow(picture, interpolation="nearest")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        axes[i, 0].set_ylabel(f"#{i}", rotation=0, labelpad=12)
        axes[i, k].text(1.08, 0.62, f"caption: {row['caption']}", transform=axes[i, k].transAxes, fontsize=8)
        axes[i, k].text(1.08, 0.25, f"prompt:  {row['prompt']}", transform=axes[i, k].transAxes, fontsize=8,
                        weight="bold")
    axes[0, 0].set_title("target", fontsize=9)
    for j in range(1, k + 1):
        axes[0, j].set_title(f"seed {j}", fontsize=9)
    fig.text(0.35, 0.985, "generated from the recovered prompt", ha="center", va="top", fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.55, top=0.94, bottom=0.01, wspace=0.05, hspace=0.08)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
