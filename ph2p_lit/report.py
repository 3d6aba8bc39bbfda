"""HTMLReport: one static page per inversion run: target, recovered prompt, images generated from
it, losses, cost and measures with their means. Up to EMBED_UP_TO images are embedded, so the page
opens offline and can be mailed; a bigger run's page links thumbnails kept beside it."""

import hashlib
import html
import json
from pathlib import Path

import lightning as L
from PIL import Image, ImageOps
from tqdm import tqdm

from .generate import generate
from .images import data_uri, image_grid, to_pil, to_rgb
from .runs import RunFolder, file_name, read_jsonl, save_atomic, write_text_atomic


class HTMLReport(L.Callback):
    """Write report.html in the run folder when the run ends (rank 0), from every rank's prompts,
    so a resumed run's report covers every image. `ph2p evaluate` writes it
    again with its measures.

    images_per_prompt: images generated from each recovered prompt (0: none); they are kept in
        report/ (see `grid_path`), so a re-run generates only for new prompts.
    steps, guidance, seed: their DDIM sampling.
    """

    def __init__(self, images_per_prompt: int = 3, steps: int = 50, guidance: float = 7.5, seed: int = 0):
        self.images_per_prompt, self.steps, self.guidance, self.seed = images_per_prompt, steps, guidance, seed

    def on_train_end(self, trainer, pl_module):
        trainer.strategy.barrier()  # every rank has written its results by now (merged or not)
        run_dir = Path(trainer.default_root_dir)
        if trainer.is_global_zero and RunFolder(run_dir).rows("prompts"):
            settings = {k: pl_module.hparams[k] for k in SETTINGS if k in pl_module.hparams}
            write_report(run_dir, pl_module.backbone, settings, self.images_per_prompt, self.steps, self.guidance,
                         self.seed)


SETTINGS = ("model", "prompt_length", "optimizer", "lr", "steps", "t_min", "t_max")


def write_report(run_dir: Path, backbone, settings: dict, images_per_prompt: int = 3, steps: int = 50,
                 guidance: float = 7.5, seed: int = 0, metrics: dict[str, dict] | None = None) -> Path:
    """report.html from the run's prompts (every rank's); `metrics` (image_id -> measures) adds columns."""
    rows = sorted(RunFolder(run_dir).rows("prompts"), key=lambda r: r["image_id"])
    cells = [_cell(backbone, run_dir, r, images_per_prompt, steps, guidance, seed)
             for r in tqdm(rows, desc="report", unit="prompt")]  # generates each prompt's images
    page = run_dir / "report.html"
    write_text_atomic(page, _page(run_dir, cells, settings, metrics or {}))
    return page


def grid_path(run_dir: Path, row: dict, images: int, steps: int, guidance: float, seed: int) -> Path:
    """Where the report keeps the images generated from a row's prompt. The name carries the
    prompt and the sampling settings, so a changed prompt or setting never shows a stale grid."""
    key = hashlib.sha1(json.dumps([row["prompt"], images, steps, guidance, seed]).encode()).hexdigest()[:10]
    return run_dir / "report" / f"{file_name(row['image_id'])}.{key}.png"


def save_grid(path: Path, images) -> None:
    """(K, 3, H, W) in [-1, 1] -> one PNG of K tiles, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(path, image_grid(to_pil(images), gap=6).save)  # tiles apart


EMBED_UP_TO = 50  # images; past this the page links thumbnails beside it instead of embedding them

# Which way is better, by a measure's name (the legend under the means).
LOWER_IS_BETTER = ("lpips", "perplexity", "loss", "junk")


def _cell(backbone, run_dir: Path, row: dict, images_per_prompt: int, steps: int, guidance: float, seed: int) -> dict:
    side = backbone.resolution
    targets = {}
    for key in ("source", "negative_source"):
        if Path(row.get(key) or "").is_file():
            with Image.open(row[key]) as image:  # centre-cropped, as the model sees it (not squashed)
                targets[key] = ImageOps.fit(to_rgb(image), (side, side), method=Image.Resampling.BICUBIC)
    grid = None
    if images_per_prompt:
        path = grid_path(run_dir, row, images_per_prompt, steps, guidance, seed)
        if not path.is_file():
            save_grid(path, generate(backbone, [row["prompt"]] * images_per_prompt, steps, guidance, seed))
        grid = path
    return {"row": row, "target": targets.get("source"), "negative": targets.get("negative_source"), "grid": grid}


def _img(image: Image.Image | Path | None, run_dir: Path, name: str, embed: bool) -> str:
    """An <img>: embedded (the page opens alone, can be mailed) or, for big runs, a file beside it."""
    if image is None:
        return ""
    if isinstance(image, Path):
        src = data_uri(Image.open(image)) if embed else image.relative_to(run_dir).as_posix()
        return f'<img src="{html.escape(src)}">'
    image = image.resize((128, 128), Image.Resampling.NEAREST)
    if embed:
        return f'<img src="{data_uri(image)}">'
    path = run_dir / "report" / "targets" / f"{file_name(name)}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(path, image.save)
    return f'<img src="{html.escape(path.relative_to(run_dir).as_posix())}">'


def _direction(measure: str) -> str:
    return "lower is better" if any(word in measure for word in LOWER_IS_BETTER) else "higher is better"


def _summary(run_dir: Path, cells: list[dict], metrics: dict[str, dict]) -> str:
    """Means of every measure with which way is better, the run's total time, links to its files,
    the images that could not be read, and the whole config."""
    rows = [c["row"] for c in cells]
    measures = list(dict.fromkeys(k for m in metrics.values() for k in m))
    # Each mean says how many images it covers: a measure can be missing for some (no caption, an
    # image that could not be read, a run measured before the measure existed).
    means = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{sum(m[k] for m in metrics.values() if k in m) / sum(k in m for m in metrics.values()):.3f}</td>"
        f"<td>{_direction(k)}</td><td>{sum(k in m for m in metrics.values())} of {len(rows)} images</td></tr>"
        for k in measures)
    lpips = _lpips_setting(run_dir) if any("lpips" in k for k in measures) else ""
    if "random backbone" in lpips:
        means += (f"<tr><td colspan=4>LPIPS here is {html.escape(lpips)}: it ranks distortions, but it is not "
                  "the published metric (lpips_backbone: pretrained, with torchvision's weights, is)</td></tr>")
    seconds = sum(float(r.get("seconds") or 0) for r in rows)
    evals = [r["unet_evals"] for r in rows if "unet_evals" in r]
    links = " · ".join(f'<a href="{name}">{name}</a>' for name in ("prompts.jsonl", "config.yaml", "metrics.json",
                                                                      "failures.jsonl") if (run_dir / name).is_file())
    failures = read_jsonl(run_dir / "failures.jsonl") if (run_dir / "failures.jsonl").is_file() else []
    failed = "".join(f"<li>{html.escape(f.get('image_id', ''))}: {html.escape(f.get('error', ''))}</li>" for f in failures)
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    return (f"<p>{len(rows)} images, {seconds:.0f} s of inversion in all"
            + (f", {sum(evals) / len(evals):.0f} U-Net evaluations per image" if evals else "") + f". {links}</p>"
            + (f"<table class=means><tr><th>measure</th><th>mean</th><th></th><th>over</th></tr>{means}</table>" if means else "")
            + (f"<p>{len(failures)} image(s) could not be read:</p><ul>{failed}</ul>" if failures else "")
            + (f"<details><summary>the whole config</summary><pre>{html.escape(config)}</pre></details>" if config else ""))


def _lpips_setting(run_dir: Path) -> str:
    """The LPIPS network and backbone `ph2p evaluate` measured with (its metrics.json)."""
    path = run_dir / "metrics.json"
    return str(json.loads(path.read_text()).get("settings", {}).get("lpips", "")) if path.is_file() else ""


def _page(run_dir: Path, cells: list[dict], settings: dict, metrics: dict[str, dict]) -> str:
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;"
             "padding:6px;text-align:left;vertical-align:middle}img{image-rendering:pixelated;height:128px;margin:2px}"
             "code{font-size:14px}.measures{font-size:13px;white-space:nowrap}table.means td{padding:2px 10px}")
    embed = len(cells) <= EMBED_UP_TO
    negatives = any(c["negative"] for c in cells)
    head = (f"<tr><th>image</th><th>{'target, negative' if negatives else 'target'}</th><th>recovered prompt</th>"
            "<th>generated from it</th><th>caption</th><th>best loss</th><th>U-Net evals</th>"
            + ("<th>measures</th>" if metrics else "") + "</tr>")
    lines = []
    for c in cells:
        r = c["row"]
        images = _img(c["target"], run_dir, r["image_id"], embed) + _img(c["negative"], run_dir, r["image_id"] + ".negative", embed)
        loss = r.get("best_loss", r.get("final_loss"))
        loss = "" if loss is None else f"{loss:.4f}"
        measured = "<br>".join(f"{html.escape(k)} {v:.3f}" for k, v in metrics.get(r["image_id"], {}).items())
        lines.append(
            f"<tr><td>{html.escape(r['image_id'])}</td><td>{images}</td><td><code>{html.escape(r['prompt'])}</code></td>"
            f"<td>{_img(c['grid'], run_dir, r['image_id'], embed)}</td><td>{html.escape(r.get('caption', ''))}</td>"
            f"<td>{loss}</td><td>{r.get('unet_evals', '')}</td>"
            + (f"<td class=measures>{measured}</td>" if metrics else "") + "</tr>")
    name, text = run_dir.name, ", ".join(f"{k}={v}" for k, v in settings.items())
    return (f"<!doctype html><html><head><meta charset=utf-8><title>ph2p run {html.escape(name)}</title>"
            f"<style>{style}</style></head><body><h1>ph2p run {html.escape(name)}</h1><p>{html.escape(text)}</p>"
            f"{_summary(run_dir, cells, metrics)}<table>{head}{''.join(lines)}</table></body></html>\n")
