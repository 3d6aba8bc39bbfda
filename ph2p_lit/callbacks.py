"""Side effects of an inversion run: hard-prompt logging, best-prompt tracking, result files, progress.

The module holds the math; these hold what is watched, kept and written. Each is a Lightning
callback switched on or off in the config's trainer.callbacks.
"""

from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from .generate import generate
from .runfiles import RunLock, append_line, merge_rank_files, read_jsonl
from .similarity import load_similarity


class PromptLogger(L.Callback):
    """Every `every_n_steps`, project the soft prompts and append the hard prompts with their
    current loss to `trace.jsonl` in the run folder (logger-independent, readable while running)."""

    def __init__(self, every_n_steps: int = 50):
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not outputs or pl_module.step_in_batch % self.every_n_steps:
            return
        ids = pl_module.current_ids()
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        for image_id, row, loss in zip(pl_module.image_ids, ids, outputs["losses"].tolist()):
            record = {"image_id": image_id, "step": pl_module.step_in_batch, "loss": loss,
                      "prompt": pl_module.vocab.decode(row.tolist())}
            append_line(run_dir / f"trace.rank{trainer.global_rank}.jsonl", record)


class BestPromptTracker(L.Callback):
    """Choose each image's prompt by the image generated from it, as the authors' code does,
    instead of by the loss (the module keeps the lowest-loss prompt itself).

    Every `every_n_steps` (and at the first and last step) the projected prompts are scored by
    `select_by`: "clip", the CLIP similarity between the target and an image generated from the
    prompt (`clip_model` names the CLIPModel), or "oracle", the demo world's attribute oracle in
    CLIP's place. Generation uses `generation_steps` DDIM steps and CFG `guidance` from the same
    noise for every prompt, so each scoring costs a generation. The chosen prompt replaces
    `prompt`; the module's (refined) one is kept as `loss_prompt`.
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        select_by: Literal["clip", "oracle"] = "clip",
        clip_model: str = "openai/clip-vit-large-patch14",
        generation_steps: int = 20,
        guidance: float = 7.5,
        local_files_only: bool = False,
    ):
        self.every_n_steps, self.select_by, self.clip_model = every_n_steps, select_by, clip_model
        self.generation_steps, self.guidance, self.local_files_only = generation_steps, guidance, local_files_only
        self.similarity = None
        self.best: dict[str, dict] = {}

    def setup(self, trainer, pl_module, stage):
        if self.similarity is None:
            self.similarity = load_similarity(self.select_by, self.clip_model, pl_module.device, self.local_files_only)

    def _update(self, pl_module, targets: torch.Tensor) -> None:
        ids = pl_module.current_ids()
        prompts = [pl_module.vocab.decode(row) for row in ids.tolist()]
        generated = generate(pl_module.backbone, prompts, self.generation_steps, self.guidance, shared_noise=True)
        similarity = self.similarity(targets[: len(prompts)], generated).tolist()
        for image_id, row, score in zip(pl_module.image_ids, ids.tolist(), similarity):
            best = self.best.get(image_id)
            if best is None or score > best["similarity"]:
                self.best[image_id] = {"similarity": score, "ids": row, "step": pl_module.step_in_batch}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not outputs:
            return
        if pl_module.step_in_batch % self.every_n_steps == 0 or pl_module.step_in_batch == 1 or outputs["finished"]:
            self._update(pl_module, batch["pixels"])
        for record in outputs["finished"]:
            best = self.best.pop(record["image_id"])
            record.update(prompt=pl_module.vocab.decode(best["ids"]), token_ids=best["ids"], loss_prompt=record["prompt"],
                          selected_by=self.select_by, best_similarity=best["similarity"], selected_step=best["step"])

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict["best"]


class ResultsWriter(L.Callback):
    """Write `prompts.jsonl` (one line per image, as each finishes), `failures.jsonl` and the
    textual-inversion file of the soft prompts into the run folder.

    dirpath: the run folder; None uses the trainer's default_root_dir.
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self.lock: RunLock | None = None

    def setup(self, trainer, pl_module, stage):
        self.run_dir = Path(self.dirpath or trainer.default_root_dir)
        self.lock = RunLock(self.run_dir)
        if trainer.is_global_zero:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()

    def teardown(self, trainer, pl_module, stage):
        if self.lock is not None:
            self.lock.release()

    def on_exception(self, trainer, pl_module, exception):
        if self.lock is not None:
            self.lock.release()  # a run that stops on an error frees its folder for the rerun

    def on_train_start(self, trainer, pl_module):
        failures = getattr(trainer.datamodule, "failures", []) if trainer.datamodule else []
        if trainer.is_global_zero:
            path = self.run_dir / "failures.jsonl"
            listed = {(f.get("image_id"), f.get("error")) for f in read_jsonl(path)} if path.is_file() else set()
            for failure in failures:  # a resumed run finds the same bad files again: list each once
                if (failure["image_id"], failure["error"]) not in listed:
                    append_line(path, failure)
                    listed.add((failure["image_id"], failure["error"]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not outputs or not outputs["finished"]:
            return
        keys = [k for k in ("source", "caption", "negative_source") if k in batch]
        by_id = {image_id: k for k, image_id in enumerate(batch["image_id"])}
        for record in outputs["finished"]:
            k = by_id[record["image_id"]]
            append_line(self.prompts_path(trainer), {**record, **{key: batch[key][k] for key in keys}})

    def on_train_end(self, trainer, pl_module):
        """Fold the other ranks' files into prompts.jsonl (sorted, one line per image), atomically.
        Also on one process: a DDP run resumed on a single device finds the other ranks' files."""
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            merge_rank_files(self.run_dir / "prompts.jsonl", key=lambda row: row["image_id"])

    def prompts_path(self, trainer) -> Path:
        # One file per rank while running; rank 0's name is the plain one.
        rank = trainer.global_rank
        return self.run_dir / ("prompts.jsonl" if rank == 0 else f"prompts.rank{rank}.jsonl")


class PromptProgressBar(TQDMProgressBar):
    """The progress bar with image k of n, the current hard prompt of the first image, and the
    U-Net sample evaluations spent per image of the batch so far (the cost unit)."""

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        # One epoch is the whole run here (each step is an optimiser step on the current images).
        self.train_progress_bar.set_description("invert")

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        loader = trainer.train_dataloader
        if loader is not None:
            sampler = loader.batch_sampler
            first, last = sampler.images_at(trainer.fit_loop.epoch_loop.batch_progress.current.completed)
            metrics["image"] = f"{first}/{sampler.n_images()}" if first == last else f"{first}-{last}/{sampler.n_images()}"
        if pl_module.image_ids:
            with torch.no_grad():
                ids = pl_module.project(pl_module.soft_prompt[:1])[0]
            metrics["prompt"] = pl_module.vocab.decode(ids.tolist())[:60]
            metrics["unet/img"] = int(pl_module.unet_evals[: len(pl_module.image_ids)].float().mean())
        return metrics
