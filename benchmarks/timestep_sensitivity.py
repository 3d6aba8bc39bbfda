"""The paper's Fig. 2b on the demo model: loss under the true vs a wrong caption per timestep bucket.

python benchmarks/timestep_sensitivity.py [--images 20] [--noise 8] [--plot runs/figures/timestep_sensitivity.png]

docs/timestep_sensitivity.png is this with --plot docs/timestep_sensitivity.png.
"""

import argparse
from pathlib import Path

import torch

from ph2p_lit.backbone import Backbone
from ph2p_lit.demo.evaluate import timestep_sensitivity


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--noise", type=int, default=8)
    p.add_argument("--plot", default="runs/figures/timestep_sensitivity.png")
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = timestep_sensitivity(Backbone.from_pretrained("demo"), n_images=args.images, n_noise=args.noise)
    print("| t bucket | loss, true caption | loss, wrong caption | gap (wrong - true) | images with true lower |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bucket']} | {r['loss_true']:.4f} | {r['loss_wrong']:.4f} | {r['gap']:.4f} | "
              f"{100 * r['true_lower']:.0f}% |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x = [int(r["bucket"].split(",")[0][1:]) + 50 for r in rows]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(x, [r["loss_true"] for r in rows], "o-", label="true caption")
        ax.plot(x, [r["loss_wrong"] for r in rows], "s-", label="wrong colour, shape, background")
        ax.set_xlabel("timestep t")
        ax.set_ylabel("diffusion loss")
        ax.set_title(f"Demo model: loss vs t ({args.images} images x {args.noise} noises)")
        ax.legend()
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
