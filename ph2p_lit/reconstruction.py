"""Reconstruction and editing with recovered prompts (NPI) in Lightning's predict step.

`ph2p reconstruct` = Trainer.predict over PromptedImages with this module; ReconstructionWriter
writes the images, one JSON line per image with PSNR and LPIPS against the target, token
attention maps on request, and the table at the end.
"""

import hashlib
import html
import json
import time
import warnings
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio

from .attention import heat_grid, prompt_tokens, token_attention
from .backbone import Backbone, check_weights_here
from .callbacks import RunFolderWriter
from .errors import InputError
from .generate import strength_steps
from .images import to_uint8
from .inversion import _DTYPES
from .npi import apply_edit, ddim_invert, reconstruct
from .runs import RunFolder, save_atomic, write_text_atomic
from .terminal import one_line

LPIPS_WEIGHTS = {  # torchvision backbones lpips loads; offline they must already be in torch's hub cache
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def lpips_weights_missing(net: str, backbone_weights: Literal["pretrained", "random"], setting: str) -> list[str]:
    """torchvision's backbone weights LPIPS loads, described with what to do if they are not in
    torch's hub cache (lpips would fetch them, with a traceback offline)."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_WEIGHTS[net]
    if backbone_weights == "random" or path.is_file():
        return []
    return [f"LPIPS ({net}) needs torchvision's {LPIPS_WEIGHTS[net]} in {path.parent} (fetch it once online), "
            f"or set {setting}=random"]


def load_lpips(net: str, backbone_weights: Literal["pretrained", "random"]):
    """LPIPS (the `lpips` package; its linear layers ship with it). "random" uses a randomly
    initialised backbone (lpips' pnet_rand): it still ranks distortions, but it is not the
    published metric, and numbers from it are labelled so."""
    import lpips

    check_weights_here({}, False, lpips_weights_missing(net, backbone_weights, "lpips_backbone"))
    # A random backbone is the same one every run; seeded in a forked RNG so the caller's random
    # stream is left as it was.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(0)
        warnings.simplefilter("ignore", UserWarning)  # lpips calls torchvision's deprecated `pretrained=`
        metric = lpips.LPIPS(net=net, pnet_rand=backbone_weights == "random", verbose=False)
    return metric.eval().requires_grad_(False)


class Reconstruction(L.LightningModule):
    """Negative-prompt inversion of each image with its prompt, then reconstruction or an edit.

    Args:
        model: diffusers-layout SD checkpoint (folder or hub id); "demo" is the shipped model.
        steps: DDIM steps of the inversion and of the reverse pass.
        strength: the fraction of those steps used: 1 inverts to pure noise (the paper); less
            stops the inversion part-way, so an edit keeps more of the image's layout.
        guidance: classifier-free guidance scale of the reverse pass.
        negative: "prompt" is NPI (the source prompt is the negative); "empty" is the baseline
            NPI improves on (DDIM inversion with the empty prompt as the negative).
        edit: None reconstructs; word substitutions "red->green, star->heart" or a full prompt
            make an edit (condition: the edited prompt; negative: as `negative` says).
        attention_maps: also write each token's cross-attention map (PNG grid and .npz arrays).
        attention_t_min: start of the timestep window the maps are averaged over.
        attention_t_max: end of that window, exclusive.
        attention_timesteps: timesteps in the window the maps are averaged over.
        lpips_net: LPIPS network.
        lpips_backbone: LPIPS's backbone weights: "pretrained" (torchvision's), or "random" offline.
        latent_cache: folder keeping DDIM-inverted latents for repeated edits (None: the run
            folder's inverted/).
        dtype: the frozen model's dtype.
        offload: keep the VAE and text encoder on the CPU except while they run.
        local_files_only: never reach the hub when loading `model`.
    """

    def __init__(
        self,
        model: str = "demo",
        steps: int = 50,
        strength: float = 1.0,
        guidance: float = 7.5,
        negative: Literal["prompt", "empty"] = "prompt",
        edit: str | None = None,
        attention_maps: bool = False,
        attention_t_min: int = 500,
        attention_t_max: int = 900,
        attention_timesteps: int = 8,
        lpips_net: Literal["alex", "vgg", "squeeze"] = "alex",
        lpips_backbone: Literal["pretrained", "random"] = "pretrained",
        latent_cache: str | None = None,
        dtype: Literal["float32", "float16", "bfloat16"] = "float32",
        offload: bool = False,
        local_files_only: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        # Bad settings fail here, before any model or image is loaded.
        if edit is not None:
            apply_edit("", edit)
        strength_steps(steps, strength)
        check_weights_here({"model.model": model}, local_files_only,
                           lpips_weights_missing(lpips_net, lpips_backbone, "model.lpips_backbone"))
        self.backbone: Backbone | None = None

    def setup(self, stage: str) -> None:
        if self.backbone is None:
            hp = self.hparams
            self.lpips = load_lpips(hp.lpips_net, hp.lpips_backbone).to(self.device)
            self.lpips_name = hp.lpips_net + ("" if hp.lpips_backbone == "pretrained" else ", random backbone")
            self.backbone = Backbone.from_pretrained(hp.model, dtype=_DTYPES[hp.dtype], device=self.device,
                                                     local_files_only=hp.local_files_only, offload=hp.get("offload", False))

    def settings_key(self, edit: str | None) -> str:
        """Everything a result depends on besides its image and prompt: a line with the same image
        and key is this reconstruction done already; any other (another edit, negative, seed of
        the sampling settings) is not."""
        hp = self.hparams
        fields = [hp.model, hp.dtype, hp.steps, hp.strength, hp.guidance, hp.negative, edit or hp.edit or ""]
        return hashlib.sha1(json.dumps(fields).encode()).hexdigest()[:12]

    # ---------------------------------------------------------------- inverted latents, cached
    def _cache_path(self, image_id: str, prompt: str) -> Path:
        hp = self.hparams
        key = hashlib.sha1(f"{hp.model}|{hp.dtype}|{hp.steps}|{hp.strength}|{image_id}|{prompt}".encode()).hexdigest()[:16]
        folder = Path(hp.latent_cache or Path(self.trainer.default_root_dir) / "inverted")
        return folder / f"{key}.pt"

    def inverted_latents(self, latents: torch.Tensor, cond: torch.Tensor, image_ids, prompts) -> torch.Tensor:
        """x_T per image: read from the cache, or DDIM-inverted (together) and written to it."""
        paths = [self._cache_path(i, p) for i, p in zip(image_ids, prompts)]
        self.cache_hit = all(p.is_file() for p in paths)
        if self.cache_hit:
            return torch.stack([torch.load(p, map_location=self.device) for p in paths])
        inverted = ddim_invert(self.backbone, latents, cond, self.hparams.steps, self.hparams.strength)
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        for path, x in zip(paths, inverted):
            save_atomic(path, lambda tmp, x=x: torch.save(x.clone().cpu(), tmp))
        return inverted

    # ---------------------------------------------------------------- predict
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        hp, bb = self.hparams, self.backbone
        started = time.perf_counter()
        b = len(batch["image_id"])
        targets = batch["pixels"].to(self.device)
        latents = bb.encode_images(targets).float()
        source = bb.encode_text(batch["prompt"])
        inverted = self.inverted_latents(latents, source, batch["image_id"], batch["prompt"])
        edits = [e or hp.edit for e in batch.get("edit", [None] * b)]  # a line's own edit wins
        prompts = [apply_edit(p, e) if e else p for p, e in zip(batch["prompt"], edits)]
        target = bb.encode_text(prompts) if any(edits) else None
        negative = bb.encode_text([""] * b) if hp.negative == "empty" else None
        images = bb.decode_latents(reconstruct(bb, inverted, source, target, negative, hp.guidance, hp.steps, hp.strength))
        seconds = (time.perf_counter() - started) / b
        psnr = peak_signal_noise_ratio((images + 1) / 2, (targets.float() + 1) / 2, data_range=1.0,
                                       reduction="none", dim=(1, 2, 3))
        lpips = self.lpips_distance(images, targets.float())
        records = [  # edit_applied: the edit changed the prompt (a substitution may match no word of it)
            {"image_id": i, "source_prompt": p, "prompt": q, "edit": e or "", "edit_applied": q != p,
             "negative": hp.negative, "guidance": hp.guidance, "steps": hp.steps, "strength": hp.strength,
             "settings": self.settings_key(e),
             "cached_inversion": self.cache_hit, "psnr": round(float(s), 3), "lpips": round(float(d), 4),
             "lpips_net": self.lpips_name, "seconds": round(seconds, 3)}
            for i, p, q, e, s, d in zip(batch["image_id"], batch["prompt"], prompts, edits, psnr, lpips)
        ]
        out = {"records": records, "images": to_uint8(images), "targets": to_uint8(targets)}
        if hp.attention_maps:
            hidden = bb.encode_text(prompts)
            maps = token_attention(bb, latents, hidden, hp.attention_t_min, hp.attention_t_max, hp.attention_timesteps)
            out["attention"] = [self._token_maps(m, q) for m, q in zip(maps.cpu().numpy(), prompts)]
        return out

    def lpips_distance(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per image; images under 64 px are up-sampled to 64 first (AlexNet's pooling needs it)."""
        if images.shape[-1] < 64:
            images, targets = (F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
                               for x in (images, targets))
        return self.lpips(images, targets).flatten()

    def _token_maps(self, maps: np.ndarray, prompt: str) -> dict:
        tokens = prompt_tokens(self.backbone, prompt)
        return {"tokens": [t for _, t in tokens], "maps": maps[[p for p, _ in tokens]]}


class ReconstructionProgressBar(TQDMProgressBar):
    """The bar of `ph2p reconstruct`, named for it. Listed before ReconstructionWriter, so it is
    closed before the writer prints the table (callbacks' on_predict_end run in list order; the
    bar Lightning adds by itself comes last and drew its final frame below the table)."""

    @property
    def predict_description(self) -> str:
        return "reconstruct"

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        # Lightning's own renames the bar "... DataLoader 0" here; there is one loader.
        if self.has_dataloader_changed(dataloader_idx):
            self.predict_progress_bar.reset(total=convert_inf(self.total_predict_batches_current_dataloader))


class ReconstructionWriter(BasePredictionWriter, RunFolderWriter):
    """Per image: images/<id>.<settings>.png (the result; one file per edit or negative, so runs
    with other settings in one folder keep theirs), targets/<id>.png (the image as the model saw
    it), a line in reconstructions.jsonl naming both and, with attention maps,
    attention/<id>.<settings>.png + .npz; the images that could not be read in failures.jsonl.
    At the end: the table of this run's settings and reconstruct.html. Holds the run folder's lock."""

    def __init__(self):
        super().__init__(write_interval="batch")

    def setup(self, trainer, pl_module, stage):
        BasePredictionWriter.setup(self, trainer, pl_module, stage)  # neither calls the other's
        RunFolderWriter.setup(self, trainer, pl_module, stage)
        self.run_dir = self.run.path

    def on_predict_start(self, trainer, pl_module):
        if trainer.is_global_zero and trainer.datamodule:
            self.run.add_failures(getattr(trainer.datamodule, "failures", []))

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        for k, record in enumerate(prediction["records"]):
            image_id, settings = record["image_id"], record["settings"]
            result = self.run.image_file("images", image_id, f".{settings}.png")
            target = self.run.image_file("targets", image_id, ".png")
            record = {**record, "image": result.relative_to(self.run_dir).as_posix(),
                      "target": target.relative_to(self.run_dir).as_posix()}
            save_atomic(result, Image.fromarray(prediction["images"][k]).save)
            save_atomic(target, Image.fromarray(prediction["targets"][k]).save)
            if "attention" in prediction:
                att = prediction["attention"][k]
                save_atomic(self.run.image_file("attention", image_id, f".{settings}.png"),
                            heat_grid(prediction["targets"][k], att["maps"], att["tokens"]).save)
                save_atomic(self.run.image_file("attention", image_id, f".{settings}.npz"),
                            lambda tmp: np.savez_compressed(tmp, maps=att["maps"], tokens=np.array(att["tokens"])))
            self.run.append("reconstructions", {**record, "source": batch["source"][k], "caption": batch["caption"][k]},
                            trainer.global_rank)

    def on_predict_end(self, trainer, pl_module):
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            # One line per image and setting, every rank's, in reconstructions.jsonl.
            self.run.merge("reconstructions", key=lambda r: (r["image_id"], r.get("settings", "")))
            data = trainer.datamodule
            print_reconstructions(self.run_dir, data.result_keys() if hasattr(data, "result_keys") else None)
            page = write_reconstruct_page(self.run_dir)
            if page:
                print(f"page: {page}")


def write_reconstruct_page(run_dir: Path) -> Path | None:
    """reconstruct.html: per image and setting, the target, the result, PSNR / LPIPS and the prompts.
    Images are linked files beside the page (not embedded), so it stays small for any number."""
    rows = sorted((r for r in RunFolder(run_dir).rows("reconstructions") if "image" in r),
                  key=lambda r: (r["image_id"], r.get("edit", ""), r.get("negative", "")))
    if not rows:
        return None
    esc = html.escape
    cells = "".join(
        f"<tr><td>{esc(r['image_id'])}</td><td><img src='{esc(r['target'])}'></td><td><img src='{esc(r['image'])}'></td>"
        f"<td>{r['psnr']:.2f}</td><td>{r['lpips']:.4f}</td><td>{esc(r['source_prompt'])}</td>"
        f"<td>{esc(r.get('edit', ''))}</td><td>{esc(r['prompt'])}</td><td>{esc(r.get('negative', ''))}</td></tr>"
        for r in rows)
    page = run_dir / "reconstruct.html"
    write_text_atomic(page, (
        "<!doctype html><meta charset='utf-8'><title>reconstruct</title><style>body{font-family:sans-serif}"
        "td,th{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left}img{width:128px;image-rendering:pixelated}"
        "</style><h1>Reconstructions</h1><p>PSNR: higher is better; LPIPS: lower is better. "
        f"{len(rows)} results; <a href='reconstructions.jsonl'>reconstructions.jsonl</a></p><table><tr><th>image</th>"
        "<th>target</th><th>result</th><th>PSNR dB</th><th>LPIPS</th><th>source prompt</th><th>edit</th><th>prompt</th>"
        f"<th>negative</th></tr>{cells}</table>"))
    return page


def print_reconstructions(run_dir: Path, keys: set[tuple[str, str]] | None = None) -> None:
    """Per-image PSNR / LPIPS of this run's results (`keys`: their (image id, settings); None: all
    in the folder), from every rank's reconstructions*.jsonl; each setting's rows, then their mean
    and what the setting was, so a folder holding NPI, an edit and the baseline never mixes them.
    An edit that left a prompt as it was (no word matched) is said in one line."""
    rows = {(r["image_id"], r.get("settings")): r for r in RunFolder(run_dir).rows("reconstructions")}
    rows = [r for k, r in sorted(rows.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))) if keys is None or k in keys]
    if not rows:
        return
    width = max(len(one_line(r["image_id"])) for r in rows + [{"image_id": "image"}])
    print(f"\n{'image':<{width}}  {'PSNR dB':>7}  {'LPIPS':>6}  {'s/img':>6}  prompt")
    for settings in dict.fromkeys(r.get("settings") for r in rows):
        group = [r for r in rows if r.get("settings") == settings]
        for r in group:  # file names, prompts and edits as they are safe to print
            print(f"{one_line(r['image_id']):<{width}}  {r['psnr']:>7.2f}  {r['lpips']:>6.4f}  {r['seconds']:>6.2f}  "
                  f"{one_line(r['prompt'])}")
        mean = {k: float(np.mean([r[k] for r in group])) for k in ("psnr", "lpips", "seconds")}
        print(f"{'mean':<{width}}  {mean['psnr']:>7.2f}  {mean['lpips']:>6.4f}  {mean['seconds']:>6.2f}  "
              f"({len(group)} images; {_settings_text(group[0])})")
    unchanged = [r["image_id"] for r in rows if r.get("edit") and r.get("edit_applied") is False]
    if unchanged:
        named = ", ".join(map(one_line, unchanged[:3])) + (", ..." if len(unchanged) > 3 else "")
        print(f"warning: the edit matched no word in {len(unchanged)} of {sum(bool(r.get('edit')) for r in rows)} "
              f"prompts ({named}); those images are reconstructions, edit_applied: false in reconstructions.jsonl")
    print(f"results in {run_dir / 'reconstructions.jsonl'}")


def _settings_text(row: dict) -> str:
    edit = f", edit {one_line(row['edit'])}" if row.get("edit") else ""
    return (f"negative={row['negative']}, guidance {row['guidance']}, {row['steps']} steps, strength "
            f"{row.get('strength', 1.0)}{edit}; LPIPS: {row.get('lpips_net', 'alex')}")
