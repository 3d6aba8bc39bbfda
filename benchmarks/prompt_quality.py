"""Prompt quality on held-out demo renders: strict accuracy, junk, repeats and cost, per variant.

python benchmarks/prompt_quality.py --n 100 --seed 6000 --out W [--jobs 4] [--variants NAME ...]
    [--extra --data.batch_size=50 --trainer.accelerator=gpu]

Each variant is `ph2p invert --config configs/demo.yaml` plus the options below, on the same n
renders (a render seed nobody tuned on). Strict: the true word is in the prompt and no other value
of its attribute is. Junk: a word that is neither a world word nor an English function word.
Cost: U-Net sample evaluations per image, as the run counts them (`unet_evals`). Holds: how often
the refined prompt, chosen on the image's refinement draws, also beats its start prompt on 32 fresh
draws, by the diffusion loss alone and by the objective (loss + prior). A finished variant's run folder is reused when W is given again.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from ph2p_lit.demo.evaluate import prompt_scores, summarise_prompt_scores, token_shares
from ph2p_lit.demo.world import CONTENT_ATTRIBUTES, export_imagefolder
from ph2p_lit.language_prior import LanguagePrior
from ph2p_lit.runs import read_jsonl

CHECK = ["--model.refinement.check_draws=32"]
NO_PRIOR = ["--model.refinement.language_model=null"]
NO_SEARCH = ["--model.refinement.budget=0", "--model.refinement.prune_tolerance=null"]  # the prior only selects
# The demo config spends about 1,500 U-Net evaluations per image (measured: the `evals` column);
# the variants below it get about the same by more steps (8 fixed draws scored every 5 steps count too).
VARIANTS = {
    # the demo config before the refinement (8611dbc): 40 PH2P steps, best by loss every 5 steps
    "before: 40 PH2P steps (8611dbc demo config)": ["--model.refinement=null", "--model.steps=40"],
    # four rows: refinement x language prior
    "PH2P alone": ["--model.refinement=null"],
    "PH2P, prior selects the best": NO_SEARCH,
    "PH2P + refinement, no prior": NO_PRIOR + CHECK,
    "PH2P + refinement + prior (demo config)": CHECK,
    # quality against compute, at about the demo config's budget
    "PH2P alone, 1.5k evals": ["--model.refinement=null", "--model.steps=68"],
    "refinement + prior from the initial prompt alone": ["--model.steps=1"] + CHECK,
    "Adam alone, 1.5k evals": ["--model.refinement=null", "--model.optimizer=adam", "--model.lr=0.05", "--model.steps=265"],
    "L-BFGS alone, 1.5k evals": ["--model.refinement=null", "--model.optimizer=lbfgs", "--model.lr=1.0", "--model.steps=68"],
    # how min_gain and pruning were chosen (docs/results.md)
    **{f"no prior, min_gain {g}, pruning 0.5%": NO_PRIOR + CHECK + [f"--model.refinement.min_gain={g}",
                                                                   "--model.refinement.prune_tolerance=0.005"]
       for g in (0, 0.005, 0.01, 0.02)},
    "demo config, min_gain 0, pruning 0.5%": CHECK + ["--model.refinement.min_gain=0",
                                                      "--model.refinement.prune_tolerance=0.005"],
    # more refinement draws: do choices hold better, at what cost?
    "demo config, 64 refinement draws": ["--model.refinement.draws=64"] + CHECK,
}


def run_variant(name: str, images: Path, run: Path, extra: list[str]) -> None:
    from ph2p_lit.lightning_cli import run_inversion as invert

    torch.set_num_threads(2)
    invert(["--config=configs/demo.yaml", f"--data.root={images}", f"--trainer.default_root_dir={run}",
            "--trainer.callbacks=[]", "--trainer.enable_progress_bar=false",
            *VARIANTS[name], *extra])


def summarise(rows: list[dict], truth: dict, prior: LanguagePrior) -> dict:
    truths = [truth[r["image_id"]] for r in rows]
    out = summarise_prompt_scores([prompt_scores(r["prompt"], t) for r, t in zip(rows, truths)])
    counts = [token_shares(r["prompt"]) for r in rows]
    tokens = sum(c["tokens"] for c in counts)
    out["junk"] = sum(c["junk"] for c in counts) / max(tokens, 1)
    out["repeats"] = sum(c["repeats"] for c in counts) / max(tokens, 1)
    out["content_repeats"] = sum(c["content_repeats"] for c in counts) / max(tokens, 1)
    out["length"] = tokens / len(rows)
    out["evals"] = float(np.mean([r["unet_evals"] for r in rows]))
    out["seconds"] = float(np.mean([r["seconds"] for r in rows]))
    out["perplexity"] = float(prior.perplexity([r["prompt"] for r in rows]).median())
    checks = [r["refinement"]["fresh_check"] for r in rows if "fresh_check" in r.get("refinement", {})]
    out["holds"] = float(np.mean([c["loss"] for c in checks])) if checks else None
    out["holds_objective"] = float(np.mean([c.get("objective", c["loss"]) for c in checks])) if checks else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=6000, help="render seed (training used 0-2, demo images 1000)")
    p.add_argument("--out", required=True)
    p.add_argument("--jobs", type=int, default=1, help="variants run at once, each in its own process")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this variant in this process
    args, extra = p.parse_known_args()
    work = Path(args.out)
    images = work / "images"
    if not (images / "metadata.jsonl").is_file():
        export_imagefolder(images, args.n, args.seed)
    if args.one:
        run_variant(args.one, images, work / args.one.replace(" ", "_"), extra)
        return
    todo = [v for v in args.variants if len(read_jsonl(work / v.replace(" ", "_") / "prompts.jsonl")
                                           if (work / v.replace(" ", "_") / "prompts.jsonl").is_file() else []) < args.n]
    running = []
    for name in todo:
        cmd = [sys.executable, __file__, f"--n={args.n}", f"--seed={args.seed}", f"--out={work}", f"--one={name}", *extra]
        running.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(work / f"{name.replace(' ', '_')}.log", "w")))
        if len(running) >= args.jobs:
            running.pop(0).wait()
    for proc in running:
        proc.wait()

    truth = {json.loads(l)["file_name"]: json.loads(l) for l in (images / "metadata.jsonl").read_text().splitlines()}
    prior = LanguagePrior.from_pretrained("demo")
    print(f"\n{args.n} held-out renders (seed {args.seed}), configs/demo.yaml + options; {' '.join(extra)}")
    print("| variant | colour / shape / background strict | all three | junk | repeats: any / content word | words | "
          "perplexity (caption LM, median) | U-Net evals / image | s / image | holds on fresh draws: loss / objective |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.variants:
        rows = read_jsonl(work / name.replace(" ", "_") / "prompts.jsonl")
        if not rows:
            print(f"| {name} | (no results) |")
            continue
        s = summarise(rows, truth, prior)
        strict = " / ".join(f"{100 * s[f'{a}_exact']:.0f}%" for a in CONTENT_ATTRIBUTES)
        holds = "–" if s["holds"] is None else f"{100 * s['holds']:.0f}% / {100 * s['holds_objective']:.0f}%"
        print(f"| {name} | {strict} | {100 * s['all_three_exact']:.0f}% | {100 * s['junk']:.1f}% | "
              f"{100 * s['repeats']:.1f}% / {100 * s['content_repeats']:.1f}% | {s['length']:.1f} | {s['perplexity']:.1f} | {s['evals']:.0f} | "
              f"{s['seconds']:.2f} | {holds} |")
    print(f"\nwork folder: {work}")


if __name__ == "__main__":
    main()
