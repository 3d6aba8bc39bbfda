"""Negative-image prompting (the paper's Algorithm 2) on demo pairs: does the attribute the
negative image shares with the target drop out of the recovered prompt?

python benchmarks/demo_negative.py [--n 20] [--shared colour] [--weight 1.0] [--margin 0.05]

Each target render gets a negative render with the same `shared` attribute and different values
of the other two content attributes. Both runs use configs/demo.yaml; the second adds
--data.negatives (a folder of negatives under the targets' names).
"""

import argparse
import json
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ph2p_lit import invert
from ph2p_lit.demo.world import (
    ATTRIBUTE_VALUES,
    CONTENT_ATTRIBUTES,
    attributes_in_text,
    render,
    sample_scene,
)
from ph2p_lit.runs import read_jsonl


def write_pairs(root: Path, n: int, seed: int, shared: str) -> list[dict]:
    """Targets in root/targets, negatives under the same names in root/negatives."""
    rng = np.random.default_rng(seed)
    rows = []
    for folder in ("targets", "negatives"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        target = sample_scene(rng)
        changes = {a: str(rng.choice([v for v in ATTRIBUTE_VALUES[a] if v != getattr(target, a)]))
                   for a in CONTENT_ATTRIBUTES if a != shared}
        negative = replace(target, **changes)
        name = f"pair_{i:03d}.png"
        Image.fromarray(render(target, rng)[0]).save(root / "targets" / name)
        Image.fromarray(render(negative, rng)[0]).save(root / "negatives" / name)
        rows.append({"file_name": name, "text": target.caption, "negative_text": negative.caption, **asdict(target)})
    (root / "targets" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--seed", type=int, default=5000)
    p.add_argument("--shared", choices=CONTENT_ATTRIBUTES, default="colour")
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--margin", default="0.05", help="negative_margin; 'null' for the paper's unguarded objective")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    work = Path(args.out or tempfile.mkdtemp(prefix="ph2p_negative_"))
    pairs = {r["file_name"]: r for r in write_pairs(work, args.n, args.seed, args.shared)}
    margin = None if args.margin == "null" else float(args.margin)
    runs = {"without negative": {}, "with negative": {
        "data": {"negatives": str(work / "negatives")},
        "model": {"negative_weight": args.weight, "negative_margin": margin}}}
    named = {}
    for name, extra in runs.items():
        out = work / (name.replace(" ", "_") + (f"_w{args.weight}_m{args.margin}" if extra else ""))
        if not (out / "prompts.jsonl").is_file():
            invert(work / "targets", config="demo", run_dir=out, **extra)
        rows = sorted(read_jsonl(out / "prompts.jsonl"), key=lambda r: r["image_id"])
        named[name] = [(attributes_in_text(r["prompt"]), pairs[r["image_id"]], r["prompt"]) for r in rows]

    others = [a for a in CONTENT_ATTRIBUTES if a != args.shared]
    print(f"\n{args.n} target renders (seed {args.seed}); each negative shares the {args.shared} and differs in "
          f"{' and '.join(others)}; weight {args.weight}, margin {args.margin}")
    print(f"| run | shared {args.shared} word in prompt | " + " | ".join(f"{a} word in prompt" for a in others) + " |")
    print("|---|---|" + "---|" * len(others))
    for name, rows in named.items():
        cells = [np.mean([truth[a] in words[a] for words, truth, _ in rows]) for a in (args.shared, *others)]
        print(f"| {name} | " + " | ".join(f"{100 * c:.0f}%" for c in cells) + " |")
    for (words, truth, without), (_, _, with_neg) in list(zip(named["without negative"], named["with negative"]))[:6]:
        print(f"  {truth['text']:<50} | negative: {truth['negative_text']:<50}\n      without: {without}\n      with:    {with_neg}")
    print(f"\nwork folder: {work}")


if __name__ == "__main__":
    main()
