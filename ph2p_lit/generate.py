"""Images from prompts: DDIM sampling with classifier-free guidance on the frozen backbone.

`denoise` is the reverse DDIM pass that generation, NPI reconstruction and editing share; only
the starting latents and the negative embedding differ.
"""

import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from tqdm import tqdm

from .backbone import Backbone
from .errors import InputError
from .images import image_grid, to_pil, to_rgb
from .runs import append_line, file_name, read_jsonl, save_atomic


def strength_steps(steps: int, strength: float) -> int:
    """How many of `steps` DDIM steps an inversion / edit of this strength runs (at least 1)."""
    if not 0.0 < strength <= 1.0:
        raise InputError(f"strength={strength}: must be in (0, 1]")
    return max(1, round(steps * strength))


def ddim_scheduler(backbone: Backbone, steps: int):
    from diffusers import DDIMScheduler  # loaded with the model, not at import: `--help` must not wait for diffusers

    # "trailing" spacing starts at t = T - 1, where the model last saw almost pure noise.
    scheduler = DDIMScheduler.from_config(backbone.scheduler.config, timestep_spacing="trailing")
    scheduler.set_timesteps(steps, device=backbone.device)
    return scheduler


@torch.no_grad()
def denoise(
    backbone: Backbone,
    latents: torch.Tensor,
    cond: torch.Tensor,
    negative: torch.Tensor,
    guidance: float = 7.5,
    steps: int = 50,
    strength: float = 1.0,
) -> torch.Tensor:
    """Reverse DDIM from `latents` (B, C, h, w): prediction = neg + guidance * (cond - neg).

    When the negative equals the condition (NPI reconstruction) or guidance is 1, the prediction
    is the conditional one and the U-Net runs once a step instead of twice.
    strength < 1 starts from the noise level of the last round(steps * strength) steps (latents
    inverted that far, see npi.ddim_invert).
    """
    scheduler = ddim_scheduler(backbone, steps)
    single = guidance == 1.0 or torch.equal(cond, negative)
    for t in scheduler.timesteps[steps - strength_steps(steps, strength):]:
        x = latents.to(backbone.dtype)
        if single:
            pred = backbone.predict(x, t, cond).float()
        else:
            both = backbone.predict(torch.cat([x, x]), t, torch.cat([negative, cond]))
            pred_neg, pred_cond = both.float().chunk(2)
            pred = pred_neg + guidance * (pred_cond - pred_neg)
        latents = scheduler.step(pred, t, latents.float()).prev_sample
    return latents


@torch.no_grad()
def generate(
    backbone: Backbone,
    prompts: list[str],
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
    negative_prompt: str = "",
    shared_noise: bool = False,
    resolution: int | None = None,
) -> torch.Tensor:
    """One image per prompt, in [-1, 1]: (B, 3, H, W). Seeded per call, so reproducible.
    shared_noise: every prompt starts from the same noise, so an image does not depend on the
    others in the batch (for comparing prompts). resolution: pixels per side (the model's by default)."""
    g = torch.Generator().manual_seed(seed)
    shape = backbone.latent_shape_at(resolution or backbone.resolution)
    latents = torch.randn((1 if shared_noise else len(prompts), *shape), generator=g)
    latents = latents.expand(len(prompts), -1, -1, -1).to(backbone.device)
    cond = backbone.encode_text(prompts)
    negative = backbone.encode_text([negative_prompt] * len(prompts))
    return backbone.decode_latents(denoise(backbone, latents, cond, negative, guidance, steps))


def read_prompts(prompts: list[str] | str) -> list[dict]:
    """A prompts.jsonl of an invert run (each row: image_id, prompt, source), or prompt texts."""
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(texts) == 1 and texts[0].endswith(".jsonl"):
        path = Path(texts[0])
        if not path.is_file():
            raise InputError(f"prompts={texts[0]}: no such file (give an invert run's prompts.jsonl or prompt texts)")
        rows = read_jsonl(path)
        if not rows or any("prompt" not in r for r in rows):
            raise InputError(f"prompts={texts[0]}: expected one JSON object with a 'prompt' per line")
        return rows
    return [{"image_id": f"prompt_{k:03d}", "prompt": text} for k, text in enumerate(texts)]


def generate_grids(
    prompts: list[str] | str | None = None,
    out: str = "runs/generate",
    model: str = "demo",
    images_per_prompt: int = 4,
    seed: int = 0,
    steps: int = 50,
    guidance: float = 7.5,
    negative_prompt: str = "",
    device: str = "auto",
    dtype: Literal["float32", "float16", "bfloat16"] = "float32",
    resolution: int | None = None,
    offload: bool = False,
    local_files_only: bool = False,
) -> None:
    """Generate a grid of images from each prompt, the target image first when it is known.

    One PNG per prompt in `out`, and generated.jsonl naming each grid with its settings.

    Args:
        prompts: an invert run's prompts.jsonl, or one or more prompt texts.
        out: output folder; a prompt whose grid exists with these settings is skipped (a rerun resumes).
        model: diffusers folder or hub id ("demo": the shipped model).
        images_per_prompt: images (seeds) per prompt; image k of a prompt is reproducible from `seed`.
        seed: the first image's seed; image k uses seed + k.
        steps: DDIM steps.
        guidance: classifier-free guidance scale.
        negative_prompt: the negative prompt of the guidance ("" the unconditional one).
        device: "auto" takes the GPU when there is one.
        dtype: the frozen model's dtype.
        resolution: pixels per side; None: the model's (its VAE config's sample_size).
        offload: keep the VAE and text encoders on the CPU except while they run.
        local_files_only: never reach the hub when loading `model`.
    """
    if not prompts:
        raise InputError("prompts: give an invert run's prompts.jsonl or prompt texts (--prompts ...)")
    rows = read_prompts(prompts)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    backbone = Backbone.from_pretrained(model, dtype=dtypes[dtype], device=device, local_files_only=local_files_only,
                                        offload=offload)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Done means done with these settings: another seed, count or sampler setting is new work.
    settings = hashlib.sha1(json.dumps([model, dtype, images_per_prompt, seed, steps, guidance, negative_prompt,
                                        resolution]).encode()).hexdigest()[:12]
    listing = out_dir / "generated.jsonl"
    done = {(r.get("image_id"), r.get("prompt"), r.get("settings")) for r in read_jsonl(listing)} if listing.is_file() else set()
    skipped = 0
    for row in tqdm(rows, desc="generate", unit="prompt"):  # what it does, how far, an ETA
        path = out_dir / f"{file_name(row['image_id'])}.png"  # a.png -> a.png.png: a.jpg keeps its own
        if path.is_file() and (row["image_id"], row["prompt"], settings) in done:
            skipped += 1
            continue
        images = generate(backbone, [row["prompt"]] * images_per_prompt, steps, guidance, seed, negative_prompt,
                          resolution=resolution)
        tiles = to_pil(images)
        if row.get("source") and Path(row["source"]).is_file():
            with Image.open(row["source"]) as target:
                tiles.insert(0, to_rgb(target).resize((tiles[0].width, tiles[0].height), Image.Resampling.BICUBIC))
        save_atomic(path, image_grid(tiles).save)
        append_line(listing, {"image_id": row["image_id"], "prompt": row["prompt"], "grid": path.name, "seed": seed,
                              "images": images_per_prompt, "settings": settings})
        tqdm.write(f"{path}  {row['prompt']}")
    if skipped:
        print(f"{skipped} of {len(rows)} prompts already have a grid with these settings in {out_dir}; not redone")
