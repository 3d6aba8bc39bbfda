"""HTMLReport: one static page per inversion run: target, recovered prompt, images generated from
it, losses, cost and measures with their means. Up to EMBED_UP_TO images are embedded, so the page
opens offline and can be mailed; a bigger run's page links thumbnails kept beside it, each made
again only when its image changed. A line's images are read inside its root (image_sets.source_file)."""

import hashlib
import html
import json
from pathlib import Path

import lightning as L
from PIL import Image, ImageOps
from tqdm import tqdm

from .generate import generate
from .image_sets import source_file
from .images import data_uri, image_grid, to_pil, to_rgb
from .runs import RunFolder, file_name, read_jsonl, save_atomic, write_text_atomic


class HTMLReport(L.Callback):
    """Write report.html in the run folder when the run ends (rank 0), from every rank's prompts,
    so a resumed run's report covers every image; a rerun with nothing left to invert writes it
    if it is missing or out of date. `ph2p evaluate` writes it again with its measures.

    images_per_prompt: images generated from each recovered prompt (0: none); they are kept in
        report/ (see `grid_path`), so a re-run generates only for new prompts.
    steps, guidance, seed: their DDIM sampling.
    """

    def __init__(self, images_per_prompt: int = 3, steps: int = 50, guidance: float = 7.5, seed: int = 0):
        self.images_per_prompt, self.steps, self.guidance, self.seed = images_per_prompt, steps, guidance, seed

    def on_fit_start(self, trainer, pl_module):
        # A rerun that finds every image done plans no batch, and Lightning then skips the training
        # hooks: the report a killed run did not finish (or that is out of date) is written here.
        if not trainer.datamodule.todo_indices():
            self.write_if_out_of_date(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.write_if_out_of_date(trainer, pl_module)

    def write_if_out_of_date(self, trainer, pl_module):
        trainer.strategy.barrier()  # every rank has written its results by now (merged or not)
        run_dir = Path(trainer.default_root_dir)
        rows = RunFolder(run_dir).rows("prompts") if trainer.is_global_zero else []
        if rows and not is_current(run_dir, rows):
            settings = {k: pl_module.hparams[k] for k in SETTINGS if k in pl_module.hparams}
            write_report(run_dir, pl_module.backbone, settings, self.images_per_prompt, self.steps, self.guidance,
                         self.seed)


SETTINGS = ("model", "prompt_length", "optimizer", "lr", "steps", "t_min", "t_max")


def write_report(run_dir: Path, backbone, settings: dict, images_per_prompt: int = 3, steps: int = 50,
                 guidance: float = 7.5, seed: int = 0, metrics: dict[str, dict] | None = None,
                 source_root: str | None = None) -> Path:
    """report.html from the run's prompts (every rank's); `metrics` (image_id -> measures) adds columns.
    `source_root`: the folder the lines' images are read from (None: each line's own)."""
    rows = sorted(RunFolder(run_dir).rows("prompts"), key=lambda r: r["image_id"])
    embed = len(rows) <= EMBED_UP_TO
    cells = [_cell(backbone, run_dir, r, images_per_prompt, steps, guidance, seed, embed, source_root)
             for r in tqdm(rows, desc="report", unit="prompt")]  # generates each prompt's images
    page = run_dir / "report.html"
    write_text_atomic(page, _page(run_dir, cells, settings, metrics or {}, embed))
    return page


def fingerprint(run_dir: Path, rows: list[dict]) -> str:
    """What a page shows (the prompts, the images that could not be read), in a word: the report
    carries it, so a rerun can tell whether it is current."""
    ordered = sorted(rows, key=lambda r: r["image_id"])
    failures = run_dir / "failures.jsonl"
    shown = [ordered, read_jsonl(failures) if failures.is_file() else []]
    return hashlib.sha1(json.dumps(shown, sort_keys=True).encode()).hexdigest()


def is_current(run_dir: Path, rows: list[dict]) -> bool:
    """Whether report.html shows exactly these prompts (then it is kept, with any measures that
    `ph2p evaluate` added to it)."""
    page = run_dir / "report.html"
    if not page.is_file():
        return False
    with open(page, encoding="utf-8", errors="replace") as f:
        head = f.read(4096)  # the fingerprint is in <head>
    return f'<meta name=ph2p-prompts content="{fingerprint(run_dir, rows)}">' in head


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


def _cell(backbone, run_dir: Path, row: dict, images_per_prompt: int, steps: int, guidance: float, seed: int,
          embed: bool, source_root: str | None) -> dict:
    targets = {key: _target(run_dir, row, key, backbone.resolution, embed, source_root)
               for key in ("source", "negative_source")}
    grid = None
    if images_per_prompt:
        path = grid_path(run_dir, row, images_per_prompt, steps, guidance, seed)
        if not path.is_file():
            save_grid(path, generate(backbone, [row["prompt"]] * images_per_prompt, steps, guidance, seed))
        grid = path
    return {"row": row, "target": targets["source"], "negative": targets["negative_source"], "grid": grid}


def _target(run_dir: Path, row: dict, key: str, side: int, embed: bool, source_root: str | None):
    """A line's image (`key`), centre-cropped as the model sees it (not squashed), 128 px: the
    image to embed, or for a big run its thumbnail's path beside the page, made only when missing or
    older than the image (a rerun of 100,000 rows reads none of them again). None: not found."""
    path, _ = source_file(row, source_root, run_dir, "source_root", key)
    if path is None:
        return None
    thumbnail = run_dir / "report" / "targets" / f"{file_name(row['image_id'] + _SUFFIX[key])}.png"
    if not embed and thumbnail.is_file() and thumbnail.stat().st_mtime_ns >= path.stat().st_mtime_ns:
        return thumbnail
    with Image.open(path) as image:
        fitted = ImageOps.fit(to_rgb(image), (side, side), method=Image.Resampling.BICUBIC)
    fitted = fitted.resize((128, 128), Image.Resampling.NEAREST)
    if embed:
        return fitted
    thumbnail.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(thumbnail, fitted.save)
    return thumbnail


_SUFFIX = {"source": "", "negative_source": ".negative"}  # a target's and its negative's thumbnails apart


def _img(image: Image.Image | Path | None, run_dir: Path, embed: bool) -> str:
    """An <img>: embedded (the page opens alone, can be mailed) or, for big runs, a file beside it."""
    if image is None:
        return ""
    if isinstance(image, Path):
        if not embed:
            return f'<img src="{html.escape(image.relative_to(run_dir).as_posix())}">'
        with Image.open(image) as opened:
            image = opened.copy()
    return f'<img src="{data_uri(image)}">'


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


def _page(run_dir: Path, cells: list[dict], settings: dict, metrics: dict[str, dict], embed: bool) -> str:
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;"
             "padding:6px;text-align:left;vertical-align:middle}img{image-rendering:pixelated;height:128px;margin:2px}"
             "code{font-size:14px}.measures{font-size:13px;white-space:nowrap}table.means td{padding:2px 10px}")
    negatives = any(c["negative"] for c in cells)
    head = (f"<tr><th>image</th><th>{'target, negative' if negatives else 'target'}</th><th>recovered prompt</th>"
            "<th>generated from it</th><th>caption</th><th>best loss</th><th>U-Net evals</th>"
            + ("<th>measures</th>" if metrics else "") + "</tr>")
    lines = []
    for c in cells:
        r = c["row"]
        images = _img(c["target"], run_dir, embed) + _img(c["negative"], run_dir, embed)
        loss = r.get("best_loss", r.get("final_loss"))
        loss = "" if loss is None else f"{loss:.4f}"
        measured = "<br>".join(f"{html.escape(k)} {v:.3f}" for k, v in metrics.get(r["image_id"], {}).items())
        lines.append(
            f"<tr><td>{html.escape(r['image_id'])}</td><td>{images}</td><td><code>{html.escape(r['prompt'])}</code></td>"
            f"<td>{_img(c['grid'], run_dir, embed)}</td><td>{html.escape(r.get('caption', ''))}</td>"
            f"<td>{loss}</td><td>{r.get('unet_evals', '')}</td>"
            + (f"<td class=measures>{measured}</td>" if metrics else "") + "</tr>")
    name, text = run_dir.name, ", ".join(f"{k}={v}" for k, v in settings.items())
    shown = fingerprint(run_dir, [c["row"] for c in cells])
    return (f'<!doctype html><html><head><meta charset=utf-8><meta name=ph2p-prompts content="{shown}">'
            f"<title>ph2p run {html.escape(name)}</title>"
            f"<style>{style}</style></head><body><h1>ph2p run {html.escape(name)}</h1><p>{html.escape(text)}</p>"
            f"{_summary(run_dir, cells, metrics)}<table>{head}{''.join(lines)}</table></body></html>\n")
