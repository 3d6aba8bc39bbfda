"""Framework overhead: the pipeline's time per step over a bare PyTorch loop doing the same math.

python benchmarks/overhead.py [--steps 20] [--repeats 2]

The bare loop calls the module's own math (projection, diffusion loss, the ph2p update) from a
plain `for` loop; the pipeline runs it through Lightning's Trainer, first with no callbacks but the
results writer the module always adds, then
with configs/demo.yaml's callbacks (best-prompt scoring every 5 steps, results, trace, progress
bar). Same 8 bundled images in one batch, same process, alternating runs, best of `repeats`.
"""

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from torch.utils.data import default_collate

from ph2p_lit.backbone import DEMO_MODEL
from ph2p_lit.callbacks import PromptLogger, PromptProgressBar
from ph2p_lit.data import ImageDataModule
from ph2p_lit.inversion import PromptInversion

ROOT = str(Path(DEMO_MODEL).parent / "images")


def module_for(steps: int) -> PromptInversion:
    config = yaml.safe_load(Path("configs/demo.yaml").read_text())["model"]
    # The continuous phase only: the bare loop has no refinement to compare with.
    module = PromptInversion(**{**config, "steps": steps, "batch_size": 8, "refinement": None})
    module.setup("fit")
    return module


def bare_loop(module: PromptInversion, batch: dict) -> float:
    hp = module.hparams
    start = time.perf_counter()
    module.load_images(batch)  # the module's public per-batch set-up: latents and fixed draws
    for image_id in module.image_ids:
        module.sampler.reset(image_id)
    soft = module.token_embeds(module.initial_ids()).clone().requires_grad_(True)
    for _ in range(hp.steps):
        for _ in range(hp.max_iter):
            t, noise = module.step_draws()
            projected = module.token_embeds(module.project(soft.detach()))
            loss = module.prompt_losses(module.full_prompt(projected + (soft - soft.detach())), module.latents, t,
                                        noise).sum()
            (grad,) = torch.autograd.grad(loss, soft)
            with torch.no_grad():
                soft -= hp.lr * grad
    module.score(module.project(soft.detach()))  # the pipeline scores the final prompts once too
    return time.perf_counter() - start


def pipeline(module: PromptInversion, callbacks: list, out: Path) -> float:
    data = ImageDataModule(root=ROOT, batch_size=8, steps=module.hparams.steps)
    bar = any(isinstance(c, PromptProgressBar) for c in callbacks)
    trainer = L.Trainer(default_root_dir=out, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=bar, callbacks=callbacks)
    module.image_ids = []  # a fresh start for the same images
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(2)
    module = module_for(args.steps)
    data = ImageDataModule(root=ROOT, batch_size=8, steps=args.steps)
    data.setup()
    batch = default_collate([data.images[i] for i in range(len(data.images))])
    work = Path(tempfile.mkdtemp(prefix="ph2p_overhead_"))
    times = {"bare loop": [], "Trainer, no callbacks": [], "Trainer, demo callbacks": []}
    for r in range(args.repeats):
        times["bare loop"].append(bare_loop(module, batch))
        times["Trainer, no callbacks"].append(pipeline(module, [], work / f"plain{r}"))
        demo_callbacks = [PromptLogger(every_n_steps=10),
                          PromptProgressBar()]
        times["Trainer, demo callbacks"].append(pipeline(module, demo_callbacks, work / f"demo{r}"))
    base = min(times["bare loop"])
    print("| run | seconds per step (best of %d) | over the bare loop |" % args.repeats)
    print("|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {min(seconds) / args.steps:.3f} | {100 * (min(seconds) / base - 1):+.1f}% |")
    print(f"\n8 bundled images in one batch, {args.steps} steps x {module.hparams.max_iter} evaluations, CPU.")


if __name__ == "__main__":
    main()
