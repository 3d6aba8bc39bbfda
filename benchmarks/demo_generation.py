"""Can the demo model draw what a caption asks? Oracle accuracy of DDIM + CFG samples.

python benchmarks/demo_generation.py [--n 200] [--steps 50] [--guidance 3 5 7.5]
"""

import argparse

import torch

from ph2p_lit.backbone import Backbone
from ph2p_lit.demo.evaluate import generation_check
from ph2p_lit.demo.oracle import AttributeOracle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0, 5.0, 7.5])
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(2)
    backbone, oracle = Backbone.from_pretrained("demo"), AttributeOracle.load()
    header = None
    for guidance in args.guidance:
        result = generation_check(backbone, oracle, n=args.n, seed=args.seed, steps=args.steps, guidance=guidance)
        if header is None:
            header = list(result)
            print(f"| guidance | {' | '.join(header)} |")
            print("|---" * (len(header) + 1) + "|")
        print(f"| {guidance} | " + " | ".join(f"{100 * result[k]:.1f}%" for k in header) + " |")
    print(f"\n{args.n} random captions (seed {args.seed}), DDIM {args.steps} steps, oracle read.")


if __name__ == "__main__":
    main()
