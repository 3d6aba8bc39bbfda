"""HTMLReport: one static page per inversion run: target, recovered prompt, images generated from
it, losses and time. Images are embedded, so the page opens offline and can be mailed."""

import base64
import hashlib
import html
import io
import json
import os
from pathlib import Path

import lightning as L
from PIL import Image
from tqdm import tqdm

from .runfiles import read_jsonl, write_text_atomic
from .data import to_rgb
from .generate import generate, image_grid, to_uint8


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class HTMLReport(L.Callback):
    """Write report.html in the run folder when the run ends (rank 0, after the results merge),
    from prompts.jsonl, so a resumed run's report covers every image. `ph2p evaluate` writes it
    again with its measures.

    images_per_prompt: images generated from each recovered prompt (0: none); they are kept in
        report/ (see `grid_path`), so a re-run generates only for new prompts.
    steps, guidance, seed: their DDIM sampling.
    """

    def __init__(self, images_per_prompt: int = 3, steps: int = 50, guidance: float = 7.5, seed: int = 0):
        self.images_per_prompt, self.steps, self.guidance, self.seed = images_per_prompt, steps, guidance, seed

    def on_train_end(self, trainer, pl_module):
        trainer.strategy.barrier()  # every rank's results are merged into prompts.jsonl by now
        run_dir = Path(trainer.default_root_dir)
        if trainer.is_global_zero and (run_dir / "prompts.jsonl").is_file():
            settings = {k: pl_module.hparams[k] for k in SETTINGS if k in pl_module.hparams}
            write_report(run_dir, pl_module.backbone, settings, self.images_per_prompt, self.steps, self.guidance,
                         self.seed)


SETTINGS = ("model", "prompt_length", "optimizer", "lr", "steps", "t_min", "t_max")


def write_report(run_dir: Path, backbone, settings: dict, images_per_prompt: int = 3, steps: int = 50,
                 guidance: float = 7.5, seed: int = 0, metrics: dict[str, dict] | None = None) -> Path:
    """report.html from the run's prompts.jsonl; `metrics` (image_id -> measures) adds columns."""
    rows = sorted(read_jsonl(run_dir / "prompts.jsonl"), key=lambda r: r["image_id"])
    cells = [_cell(backbone, run_dir, r, images_per_prompt, steps, guidance, seed)
             for r in tqdm(rows, desc="report", unit="prompt")]  # generates each prompt's images
    page = run_dir / "report.html"
    write_text_atomic(page, _page(run_dir.name, cells, settings, metrics or {}))
    return page


def grid_path(run_dir: Path, row: dict, images: int, steps: int, guidance: float, seed: int) -> Path:
    """Where the report keeps the images generated from a row's prompt. The name carries the
    prompt and the sampling settings, so a changed prompt or setting never shows a stale grid."""
    key = hashlib.sha1(json.dumps([row["prompt"], images, steps, guidance, seed]).encode()).hexdigest()[:10]
    return run_dir / "report" / f"{row['image_id'].replace('/', '__').rsplit('.', 1)[0]}.{key}.png"


def save_grid(path: Path, images) -> None:
    """(K, 3, H, W) in [-1, 1] -> one PNG of K tiles, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid([Image.fromarray(a) for a in to_uint8(images)]).save(path.with_suffix(".tmp.png"))
    os.replace(path.with_suffix(".tmp.png"), path)


def _cell(backbone, run_dir: Path, row: dict, images_per_prompt: int, steps: int, guidance: float, seed: int) -> dict:
    side = backbone.resolution
    target = None
    if Path(row.get("source", "")).is_file():
        with Image.open(row["source"]) as image:
            target = to_rgb(image).resize((side, side), Image.Resampling.BICUBIC)
    grid = None
    if images_per_prompt:
        path = grid_path(run_dir, row, images_per_prompt, steps, guidance, seed)
        if not path.is_file():
            save_grid(path, generate(backbone, [row["prompt"]] * images_per_prompt, steps, guidance, seed))
        grid = Image.open(path)
    return {"row": row, "target": target, "grid": grid}


def _page(name: str, cells: list[dict], settings: dict, metrics: dict[str, dict]) -> str:
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;"
             "padding:6px;text-align:left;vertical-align:middle}img{image-rendering:pixelated;height:128px}"
             "code{font-size:14px}")
    measures = list(dict.fromkeys(k for m in metrics.values() for k in m))
    head = ("<tr><th>image</th><th>target</th><th>recovered prompt</th><th>generated from it</th>"
            "<th>caption</th><th>best loss</th><th>steps</th><th>s / image</th>"
            + "".join(f"<th>{html.escape(k)}</th>" for k in measures) + "</tr>")
    lines = []
    for c in cells:
        r = c["row"]
        target = f'<img src="{data_uri(c["target"].resize((128, 128), Image.Resampling.NEAREST))}">' if c["target"] else ""
        grid = f'<img src="{data_uri(c["grid"])}">' if c["grid"] else ""
        loss = r.get("best_loss", r.get("final_loss"))
        loss = "" if loss is None else f"{loss:.4f}"
        measured = metrics.get(r["image_id"], {})
        extra = "".join(f"<td>{measured[k]:.3f}</td>" if k in measured else "<td></td>" for k in measures)
        lines.append(
            f"<tr><td>{html.escape(r['image_id'])}</td><td>{target}</td><td><code>{html.escape(r['prompt'])}</code></td>"
            f"<td>{grid}</td><td>{html.escape(r.get('caption', ''))}</td><td>{loss}</td>"
            f"<td>{r.get('steps', '')}</td><td>{r.get('seconds', '')}</td>{extra}</tr>"
        )
    text = ", ".join(f"{k}={v}" for k, v in settings.items())
    return (f"<!doctype html><html><head><meta charset=utf-8><title>ph2p run {html.escape(name)}</title>"
            f"<style>{style}</style></head><body><h1>ph2p run {html.escape(name)}</h1>"
            f"<p>{len(cells)} images; {html.escape(text)}</p><table>{head}{''.join(lines)}</table></body></html>\n")
