"""`ph2p evaluate`: the paper's measures over a run's prompts.jsonl.

Per prompt, K images are generated; then
- CLIP image-image similarity, target vs each generated image (transformers CLIPModel, named);
- LPIPS distance target vs generated (lower: closer) and LPIPS diversity among the generated;
- BERTScore precision / recall / F1 of the prompt against the caption, where there is one;
- on the demo model: content-word precision / recall / F1 against the caption's attributes, and
  how often the oracle reads the caption's attributes in the generated images.
Writes metrics.jsonl (per image and settings, appended as each is done; other settings' lines are
kept) and metrics.json (the means of these settings' lines, the settings and how many images) next to
the prompts, holding the run folder's lock.
"""

import hashlib
import itertools
import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from tqdm import tqdm

from .backbone import Backbone, check_weights_here
from .demo.world import CONTENT_ATTRIBUTES, attributes_in_text
from .errors import InputError
from .generate import generate
from .image_sets import prompted_items
from .images import to_pixels
from .language_prior import LanguagePrior
from .reconstruction import load_lpips, lpips_weights_missing
from .report import SETTINGS, grid_path, save_grid, write_report
from .runs import RunFolder, append_line, read_jsonl, write_text_atomic
from .similarity import ClipSimilarity, OracleSimilarity, load_offline
from .terminal import one_line


def content_word_scores(prompt: str, caption: str) -> dict[str, float]:
    """Precision / recall / F1 of the demo world's content words in the prompt vs the caption."""
    named, truth = attributes_in_text(prompt), attributes_in_text(caption)
    predicted = {(a, v) for a in CONTENT_ATTRIBUTES for v in named[a]}
    true = {(a, v) for a in CONTENT_ATTRIBUTES for v in truth[a]}
    hits = len(predicted & true)
    precision = hits / len(predicted) if predicted else 0.0
    recall = hits / len(true) if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"word_precision": precision, "word_recall": recall, "word_f1": f1}


def evaluate(
    prompts: str | None = None,
    source_root: str | None = None,
    model: str = "demo",
    images_per_prompt: int = 4,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
    clip_model: str | None = "openai/clip-vit-large-patch14",
    bert_model: str | None = "roberta-large",
    bert_layers: int | None = 17,
    lpips_net: Literal["alex", "vgg", "squeeze"] = "alex",
    lpips_backbone: Literal["pretrained", "random"] = "pretrained",
    demo_measures: bool | None = None,
    language_model: str | None = None,
    local_files_only: bool = False,
    device: str = "auto",
) -> dict:
    """Measure a run's recovered prompts and write metrics.jsonl and metrics.json beside them.

    Returns the means written to metrics.json.

    Args:
        prompts: the run's prompts.jsonl; metrics.jsonl and metrics.json go beside it.
        source_root: the folder the prompts' images are read from, and only from (as
            reconstruct's data.source_root); None: each line's own source_root, else the prompts
            file's folder. Set it for a prompts file you did not write.
        model: the model that generates (the one the prompts were recovered with).
        images_per_prompt: K images generated per prompt, seeds seed .. seed + K - 1.
        steps: DDIM steps of the generation.
        guidance: classifier-free guidance scale of the generation.
        seed: the first image's seed.
        clip_model: a CLIPModel (hub id or folder); null skips CLIP similarity.
        bert_model: BERTScore's model (torchmetrics); null skips BERTScore.
        bert_layers: BERTScore's layer (roberta-large layer 17 is BERTScore's default).
        lpips_net: LPIPS network, as for `ph2p reconstruct`.
        lpips_backbone: LPIPS backbone weights ("random" offline), as for `ph2p reconstruct`.
        demo_measures: content-word P/R/F1 and oracle agreement; None: on when model is "demo".
        language_model: a causal LM (e.g. gpt2; "demo": the demo world's caption model) under
            which each prompt's perplexity is measured, the field's readability measure; null skips it.
        local_files_only: never reach the hub when loading models.
        device: "auto" takes the GPU when there is one.
    """
    if not prompts or not Path(prompts).is_file():
        raise InputError(f"prompts={prompts}: give an invert run's prompts.jsonl")
    if source_root is not None and not Path(source_root).is_dir():
        raise InputError(f"source_root={source_root}: no such folder")
    items, missing = prompted_items(Path(prompts), source_root, "source_root")
    if not items and not missing:
        raise InputError(f"prompts={prompts}: no prompts in it yet; let the invert run finish an image first")
    out_dir = Path(prompts).parent
    # The run folder's lock (invert's, reconstruct's), taken before any model loads: a busy folder is said at once.
    with RunFolder(out_dir).lock(remedy="wait for it to finish, then evaluate"):
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        demo = model == "demo" if demo_measures is None else demo_measures
        settings = {"model": model, "images_per_prompt": images_per_prompt, "steps": steps, "guidance": guidance,
                    "seed": seed, "clip_model": clip_model, "bert_model": bert_model, "bert_layers": bert_layers,
                    "lpips": lpips_net + ("" if lpips_backbone == "pretrained" else ", random backbone"),
                    "demo_measures": demo, "language_model": language_model}
        check_weights_here({"model": model, "clip_model": clip_model, "bert_model": bert_model,
                            "language_model": language_model}, local_files_only,
                           lpips_weights_missing(lpips_net, lpips_backbone, "lpips_backbone"))
        measures = _Measures(settings, lpips_net, lpips_backbone, device, local_files_only)
        prior = LanguagePrior.from_pretrained(language_model, device, local_files_only) if language_model else None
        backbone = Backbone.from_pretrained(model, device=device, local_files_only=local_files_only)
        key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        shown, listed = min(images_per_prompt, 3), len(items) + len(missing)
        records = _measure(out_dir, items, missing, key, measures, prior, backbone, images_per_prompt, steps,
                           guidance, seed)

        names = [k for r in records.values() for k in r if k not in ("image_id", "prompt", "settings")]
        means = {k: float(np.mean([r[k] for r in records.values() if k in r])) for k in dict.fromkeys(names)}
        # metrics.json says what it covers: these settings (and their key in metrics.jsonl) and how
        # many of the file's images; written whole at the end, so a killed run leaves the last one.
        summary = {"images": len(records), "of_images": listed, "settings_key": key, "settings": settings,
                   "means": means, "missing": missing}
        write_text_atomic(out_dir / "metrics.json", json.dumps(summary, indent=2))
        measured = {k: {m: v for m, v in r.items() if m not in ("image_id", "prompt", "settings")}
                    for k, r in records.items()}
        report = write_report(out_dir, backbone, _run_settings(out_dir), shown, steps, guidance, seed, measured,
                              source_root)
    _print(summary, out_dir)
    print(f"report with these measures: {report}")
    return summary


def _measure(out_dir: Path, items: list[dict], missing: list[dict], key: str, measures, prior, backbone,
             images_per_prompt: int, steps: int, guidance: float, seed: int) -> dict[str, dict]:
    """image id -> its measures under these settings (`key`): those in metrics.jsonl already, the
    others measured now and appended as each is done (a run that dies loses at most one image's
    work). Lines of other settings or of an earlier prompt are kept: going back to them measures
    nothing again. An image that does not decode is added to `missing`."""
    per_image = out_dir / "metrics.jsonl"
    prompt_of = {item["image_id"]: item["prompt"] for item in items}
    records = {r["image_id"]: r for r in (read_jsonl(per_image) if per_image.is_file() else [])
               if r.get("settings") == key and r.get("image_id") in prompt_of and r.get("prompt") == prompt_of[r["image_id"]]}
    shown = min(images_per_prompt, 3)
    for failure in missing:
        tqdm.write(f"skipping {one_line(failure['image_id'])}: {one_line(failure['error'])}")
    for item in tqdm(items, desc="evaluate", unit="image"):  # generation and measures: minutes on a CPU
        if item["image_id"] in records:
            continue
        try:
            with Image.open(item["source"]) as image:
                target = to_pixels(image, backbone.resolution)[None].to(backbone.device)
        except (OSError, ValueError) as e:  # unreadable: measure the others, list it
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
            missing.append({"image_id": item["image_id"], "source": item["source"], "error": reason})
            tqdm.write(f"skipping {one_line(item['image_id'])}: {one_line(reason)}")
            continue
        generated = generate(backbone, [item["prompt"]] * images_per_prompt, steps, guidance, seed).to(backbone.device)
        # The report shows (the first few of) the images that were measured, not another sample.
        save_grid(grid_path(out_dir, item, shown, steps, guidance, seed), generated[:shown])
        record = {"image_id": item["image_id"], "prompt": item["prompt"], "settings": key}
        record.update(measures(target, generated, item["prompt"], item["caption"]))
        if prior is not None:
            record["prompt_perplexity"] = float(prior.perplexity([item["prompt"]])[0])
        append_line(per_image, record)
        records[item["image_id"]] = record
    return records


def _run_settings(run_dir: Path) -> dict:
    """The inversion settings, from the run's config.yaml (LightningCLI writes it) when there is one."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return {}
    model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
    return {k: model[k] for k in SETTINGS if k in model}


class _Measures:
    """Every measure of one target, its K generated images, its prompt and caption."""

    def __init__(self, settings: dict, lpips_net: str, lpips_backbone: str, device, local_files_only: bool):
        self.clip = ClipSimilarity(settings["clip_model"], device, local_files_only) if settings["clip_model"] else None
        self.bert = None
        if settings["bert_model"]:
            from torchmetrics.text.bert import BERTScore

            def bertscore(name: str, local_files_only: bool):
                if not Path(name).is_dir():  # BERTScore itself would go to the network: resolve it first
                    from huggingface_hub import snapshot_download

                    name = snapshot_download(name, local_files_only=local_files_only)
                return BERTScore(model_name_or_path=name, num_layers=settings["bert_layers"], device=device)

            self.bert = load_offline("bert_model", settings["bert_model"], bertscore, local_files_only)
        self.lpips = load_lpips(lpips_net, lpips_backbone).to(device)
        self.oracle = OracleSimilarity(device) if settings["demo_measures"] else None

    def __call__(self, target: torch.Tensor, generated: torch.Tensor, prompt: str, caption: str) -> dict:
        out = _image_measures(target, generated, self.clip, self.lpips)
        if self.bert is not None and caption:
            score = self.bert([prompt], [caption])
            out.update({f"bertscore_{k}": float(score[k]) for k in ("precision", "recall", "f1")})
        if self.oracle is not None:
            out["oracle_similarity"] = float(self.oracle(target.expand_as(generated), generated).mean())
            if caption:
                out.update(content_word_scores(prompt, caption))
                truth = attributes_in_text(caption)
                reads = self.oracle.oracle.read(generated.float())
                out["oracle_agreement"] = float(np.mean([r[a] in truth[a] for r in reads for a in CONTENT_ATTRIBUTES]))
        return out


def _image_measures(target: torch.Tensor, generated: torch.Tensor, clip, lpips) -> dict:
    def lp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape[-1] < 64:  # AlexNet's pooling needs 64 px
            a, b = (F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False) for x in (a, b))
        return lpips(a, b).flatten()

    k = generated.shape[0]
    out = {"lpips_to_target": float(lp(target.expand(k, -1, -1, -1), generated).mean())}
    pairs = list(itertools.combinations(range(k), 2))
    if pairs:
        i, j = (list(x) for x in zip(*pairs))
        out["lpips_diversity"] = float(lp(generated[i], generated[j]).mean())
    if clip is not None:
        out["clip_similarity"] = float((clip.embed(generated) @ clip.embed(target).T).mean())
    return out


def _print(summary: dict, out_dir: Path) -> None:
    s = summary["settings"]
    print(f"\n{summary['images']} prompts, {s['images_per_prompt']} images each (DDIM {s['steps']}, CFG {s['guidance']}); "
          f"CLIP: {s['clip_model']}; BERTScore: {s['bert_model']}; LPIPS: {s['lpips']}")
    print("| measure | mean |\n|---|---|")
    for k, v in summary["means"].items():
        print(f"| {k} | {v:.4f} |")
    print(f"\nper image: {out_dir / 'metrics.jsonl'}; summary: {out_dir / 'metrics.json'}")
