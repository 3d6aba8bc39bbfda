"""Evolutionary multi-concept composition (the paper's Fig. 5), written as one HTML page.

Invert concept A and concept B, join their prompts, generate, invert the generated image to get
one prompt for the pair, join it with concept C's prompt, generate again, and so on.
"""

import copy
import html
from pathlib import Path

import torch
from PIL import Image

from .api import invert, load_config
from .backbone import Backbone
from .errors import InputError
from .generate import generate
from .images import IMAGE_EXTENSIONS, data_uri, image_grid, to_pil
from .runs import write_text_atomic


def _invert(images: list[Path], run_dir: Path, config: str, settings: dict) -> list[dict]:
    """Invert these images (copied into run_dir/images); their rows, in order."""
    folder = run_dir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for k, path in enumerate(images):
        copies.append(folder / f"{k:03d}_{path.stem}.png")
        with Image.open(path) as image:
            image.convert("RGB").save(copies[-1])
    # Quiet: compose shows its own progress; each inversion's bar and report would repeat it.
    quiet = {"enable_progress_bar": False, "callbacks": []}
    return invert(copies, config=config, run_dir=run_dir, model=settings.get("model"), data=settings.get("data"),
                  trainer={**quiet, **settings.get("trainer", {})})


def _concept_images(concept: str) -> list[Path]:
    path = Path(concept)
    if path.is_dir():
        images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    else:
        images = [path] if path.is_file() else []
    if not images:
        raise InputError(f"concepts: {concept} is neither an image nor a folder with images")
    return images


def compose(
    concepts: list[str] | None = None,
    out: str = "runs/compose",
    config: str = "demo",
    model: str | None = None,
    invert_settings: dict | None = None,
    images_per_prompt: int = 4,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
) -> Path:
    """Compose concepts in order, A + B, then (A B) + C, into one HTML page.

    Writes out/compose.html (images embedded, opens offline) and returns its path.

    Args:
        concepts: two or more images or folders; a folder is a set whose best prompt (lowest
            loss) stands for it.
        config: the `ph2p invert` config used for every inversion (a file, or the name of one
            shipped with the package: demo, sd15, sd21, sdxl).
        model: the model that inverts and generates; None: the config's model.model.
        invert_settings: settings on top of the config's, by section, e.g.
            {"model": {"steps": 100}} (on the command line: --invert_settings '{model: {steps: 100}}').
        images_per_prompt: images generated from each joined prompt; the first is inverted next.
        out: the folder of the page and every stage's runs.
        steps: DDIM steps of each generation.
        guidance: classifier-free guidance scale of each generation.
        seed: the first generated image's seed.
    """
    if not concepts or len(concepts) < 2:
        raise InputError("concepts: give two or more images or folders (--concepts [a.png, b.png, c.png])")
    sets = [_concept_images(c) for c in concepts]
    out_dir, settings = Path(out), copy.deepcopy(invert_settings or {})
    if model is None:
        model = load_config(config).get("model", {}).get("model", "demo")
    settings.setdefault("model", {})["model"] = model
    n_images = sum(len(s) for s in sets)
    print(f"compose: inverting {n_images} concept image(s) into {out_dir / 'concepts'}", flush=True)
    rows = _invert([p for s in sets for p in s], out_dir / "concepts", config, settings)
    by_set, k = [], 0
    for s in sets:  # each set's rows, in the order they were copied
        by_set.append(min(rows[k : k + len(s)], key=lambda r: r.get("best_loss", r["final_loss"])))
        k += len(s)

    backbone = Backbone.from_pretrained(model, device="cuda" if torch.cuda.is_available() else "cpu")
    stages, carried = [], by_set[0]
    for n, concept in enumerate(by_set[1:], start=1):
        joined = f"{carried['prompt']} {concept['prompt']}"
        print(f"compose: stage {n} of {len(by_set) - 1}: generating from {joined!r}, then inverting the first image",
              flush=True)
        images = generate(backbone, [joined] * images_per_prompt, steps, guidance, seed + n)
        tiles = to_pil(images)
        stage_dir = out_dir / f"stage{n}"
        stage_dir.mkdir(parents=True, exist_ok=True)
        image_grid(tiles).save(stage_dir / "generated.png")
        tiles[0].save(stage_dir / "first.png")
        carried = _invert([stage_dir / "first.png"], stage_dir / "inverted", config, settings)[0]
        stages.append({"inputs": [stages[-1]["tiles"][0] if stages else Image.open(by_set[0]["source"]),
                                  Image.open(concept["source"])],
                       "prompts": [stages[-1]["evolved"] if stages else by_set[0]["prompt"], concept["prompt"]],
                       "joined": joined, "tiles": tiles, "evolved": carried["prompt"]})
    path = out_dir / "compose.html"
    write_text_atomic(path, _html(stages, concepts))
    print(f"\n{len(stages)} composition stage(s): {path}")
    for s in stages:
        print(f"  {s['prompts'][0]}  +  {s['prompts'][1]}  ->  {s['evolved']}")
    return path


def _html(stages: list[dict], concepts: list[str]) -> str:
    def img(image: Image.Image) -> str:
        return f'<img src="{data_uri(image, 128)}" width="128" height="128">'

    rows = []
    for n, s in enumerate(stages, start=1):
        inputs = "".join(f"<figure>{img(i)}<figcaption>{html.escape(p)}</figcaption></figure>"
                         for i, p in zip(s["inputs"], s["prompts"]))
        generated = "".join(img(t) for t in s["tiles"])
        rows.append(
            f"<section><h2>Stage {n}</h2><div class=row>{inputs}</div>"
            f"<p>joined prompt: <code>{html.escape(s['joined'])}</code></p><div class=row>{generated}</div>"
            f"<p>prompt recovered from the first generated image: <code>{html.escape(s['evolved'])}</code></p></section>"
        )
    style = ("body{font-family:sans-serif;max-width:900px;margin:2em auto}.row{display:flex;gap:8px;flex-wrap:wrap}"
             "figure{margin:0}figcaption{font-size:12px;max-width:128px}img{image-rendering:pixelated}")
    title = "Composition of " + html.escape(", ".join(concepts))
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{title}</title><style>{style}</style></head>"
            f"<body><h1>{title}</h1>{''.join(rows)}</body></html>\n")
