"""SD 1.5, SD 2.1 and SDXL at their real size (random weights, published configs) through the
same `ph2p invert`, `reconstruct` and `generate` a user runs, on the CPU; prints one row per
model, dtype and memory tier.

python benchmarks/real_size.py [--models sd15 sd21 sdxl] [--dtypes float32 bfloat16] [--resolution 256]

Each pipeline is built once with random weights (ph2p_lit.architectures) and saved in the
diffusers layout under --folder, then every command loads it with `from_pretrained`, as it would
a downloaded model. Each row runs in a fresh process, so its peak memory (the peak resident set
while its image is inverted, `peak_memory_mb` in prompts.jsonl) is its own. The images are
--resolution pixels (not the models' 512 / 768 / 1024), which keeps a CPU run to minutes;
seconds per evaluation are one U-Net forward and backward to the prompt, timed separately
after the run.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ph2p_lit.architectures import build_pipeline, parameter_count
from ph2p_lit.backbone import Backbone

TIERS = {"none": [], "checkpointing": ["--model.gradient_checkpointing=true"], "offload": ["--model.offload=true"]}


def run(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ph2p_lit.cli", *command], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"ph2p {command[0]} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def seconds_per_evaluation(model: str, dtype: str, resolution: int, repeats: int = 2) -> float:
    """One U-Net forward and backward to a 77-token prompt at the given resolution (median)."""
    backbone = Backbone.from_pretrained(model, dtype=getattr(torch, dtype), local_files_only=True)
    embeds = backbone.token_table[backbone.tokenize(["a photo of a red bus on a street"])].clone().requires_grad_(True)
    latents = torch.randn(1, *backbone.latent_shape_at(resolution))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        loss = backbone.diffusion_loss(latents, torch.randn_like(latents), torch.tensor([600]),
                                       backbone.encode_embeddings(embeds))
        torch.autograd.grad(loss.sum(), embeds)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sd15", "sd21", "sdxl"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--tiers", nargs="+", default=list(TIERS), help="memory tiers, each with the first dtype")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--folder", default="models/random", help="where the random-weight pipelines are kept")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="real_size_"))
    images = work / "images"  # apart from the runs' outputs, which are images too
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(images / "photo.png")
    print("| model | dtype | tier | parameters (U-Net / text / VAE) | invert s/image | U-Net evals | "
          "peak RSS GiB | s per fwd+bwd | reconstruct s | generate s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model = Path(args.folder) / name
        if not (model / "model_index.json").is_file():
            build_pipeline(name, model, dtype=torch.bfloat16)  # half the disk; each run loads it in its own dtype
        counts = parameter_count(model)
        text = sum(v for k, v in counts.items() if k.startswith("text_encoder"))
        params = f"{counts['unet'] / 1e9:.2f} B / {text / 1e6:.0f} M / {counts['vae'] / 1e6:.0f} M"
        rows = [(dtype, "none") for dtype in args.dtypes] + [(args.dtypes[0], t) for t in args.tiers if t != "none"]
        for dtype, tier in rows:
            out = work / f"{name}-{dtype}-{tier}"
            common = [f"--model.model={model}", f"--model.dtype={dtype}", "--model.local_files_only=true"]
            run(["invert", *common, *TIERS[tier], "--model.prompt_length=8", "--model.steps=2", "--model.max_iter=1",
                 "--model.eval_draws=1", "--model.refinement=null", f"--data.root={images}",
                 f"--data.resolution={args.resolution}", f"--trainer.default_root_dir={out}",
                 "--trainer.enable_progress_bar=false",  # and no report: it would generate at full size
                 "--trainer.callbacks=[]"])
            (record,) = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
            reconstruct = generate = float("nan")
            if tier == "none":
                reconstruct = run(["reconstruct", *common, f"--data.prompts={out / 'prompts.jsonl'}", "--model.steps=2",
                                   f"--data.resolution={args.resolution}", "--model.lpips_backbone=random",
                                   f"--trainer.default_root_dir={out / 'reconstruct'}"])
                generate = run(["generate", f"--model={model}", f"--dtype={dtype}", "--local_files_only=true",
                                f"--prompts={out / 'prompts.jsonl'}", f"--out={out / 'generate'}", "--steps=2",
                                "--images_per_prompt=1", f"--resolution={args.resolution}"])
            per_eval = seconds_per_evaluation(str(model), dtype, args.resolution) if tier == "none" else float("nan")
            cells = [f"{per_eval:.2f}", f"{reconstruct:.0f}", f"{generate:.0f}"]
            cells = ["-" if c == "nan" else c for c in cells]  # a tier row times the inversion only
            print(f"| {name} | {dtype} | {tier} | {params} | {record['seconds']:.1f} | {record['unet_evals']} | "
                  f"{record['peak_memory_mb'] / 1024:.1f} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
