"""Side effects of an inversion run: hard-prompt logging, best-prompt tracking, result files, progress.

The module holds the math; these hold what is watched, kept and written. Each is a Lightning
callback switched on or off in the config's trainer.callbacks.
"""

import json
import os
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar


def append_line(path: Path, record: dict) -> None:
    """Append one JSON line in a single write and fsync it: a crash leaves whole lines only
    (at worst a torn last line, which `read_jsonl` skips)."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: a crash leaves the old file (or none), never half a new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a crash mid-write
    return rows


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
    """Keep, per image, the best projected prompt seen; it replaces the final prompt in the
    results (the final one is kept as `final_prompt`).

    Scored every `every_n_steps` and at the last step. `select_by`:
    - "loss" (default): the lowest loss on the image's fixed (t, noise) set; costs one U-Net batch.
    - "clip": the highest CLIP similarity between the target and an image generated from the
      prompt (the authors' criterion; `clip_model` names the CLIPModel).
    - "oracle": the same with the demo world's attribute oracle in CLIP's place.
    The image-based criteria generate with `generation_steps` DDIM steps and CFG `guidance`, from
    the same noise for every prompt, so they cost a generation per scoring.
    `patience` > 0 stops an image early once its best score has not improved for that many
    scorings (a plateau).
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        patience: int = 0,
        min_delta: float = 0.0,
        select_by: Literal["loss", "clip", "oracle"] = "loss",
        clip_model: str = "openai/clip-vit-large-patch14",
        generation_steps: int = 20,
        guidance: float = 7.5,
        local_files_only: bool = False,
    ):
        self.every_n_steps, self.patience, self.min_delta = every_n_steps, patience, min_delta
        self.select_by, self.clip_model, self.local_files_only = select_by, clip_model, local_files_only
        self.generation_steps, self.guidance = generation_steps, guidance
        self.similarity = None
        self.best: dict[str, dict] = {}

    def setup(self, trainer, pl_module, stage):
        if self.select_by != "loss" and self.similarity is None:
            from .similarity import load_similarity

            self.similarity = load_similarity(self.select_by, self.clip_model, pl_module.device, self.local_files_only)

    def _scores(self, pl_module, ids: torch.Tensor, losses: torch.Tensor, targets: torch.Tensor) -> list[float]:
        """Lower is better: the loss, or minus the target-generated similarity."""
        if self.select_by == "loss":
            return losses.tolist()
        from .generate import generate

        prompts = [pl_module.vocab.decode(row) for row in ids.tolist()]
        generated = generate(pl_module.backbone, prompts, self.generation_steps, self.guidance, shared_noise=True)
        return (-self.similarity(targets[: len(prompts)], generated)).tolist()

    def _update(self, pl_module, targets: torch.Tensor) -> None:
        ids = pl_module.current_ids()
        losses = pl_module.score(ids)
        scores = self._scores(pl_module, ids, losses, targets)
        for image_id, row, loss, score in zip(pl_module.image_ids, ids, losses.tolist(), scores):
            best = self.best.get(image_id)
            if best is None or score < best["score"] - self.min_delta:
                self.best[image_id] = {"score": score, "loss": loss, "ids": row.tolist(),
                                       "step": pl_module.step_in_batch, "stale": 0}
            else:
                best["stale"] += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # A plateau on every image of the batch: skip its remaining steps.
        if self.patience and pl_module.image_ids == list(batch["image_id"]) and all(
            self.best.get(i, {}).get("stale", 0) >= self.patience for i in pl_module.image_ids
        ):
            pl_module.step_in_batch = pl_module.hparams.steps - 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not outputs:
            return
        if pl_module.step_in_batch % self.every_n_steps == 0 or pl_module.step_in_batch == 1 or outputs["finished"]:
            self._update(pl_module, batch["pixels"])
        for record in outputs["finished"]:
            best = self.best.pop(record["image_id"])
            record.update(
                prompt=pl_module.vocab.decode(best["ids"]),
                token_ids=best["ids"],
                best_loss=best["loss"],
                best_step=best["step"],
            )
            if self.select_by != "loss":
                record.update(selected_by=self.select_by, best_similarity=-best["score"])

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = {k: {"score": v["loss"], **v} for k, v in state_dict["best"].items()}  # "score" is newer


class ResultsWriter(L.Callback):
    """Write `prompts.jsonl` (one line per image, as each finishes), `failures.jsonl` and the
    textual-inversion file of the soft prompts into the run folder.

    dirpath: the run folder; None uses the trainer's default_root_dir.
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    def setup(self, trainer, pl_module, stage):
        self.run_dir = Path(self.dirpath or trainer.default_root_dir)
        if trainer.is_global_zero:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def on_train_start(self, trainer, pl_module):
        failures = getattr(trainer.datamodule, "failures", []) if trainer.datamodule else []
        if trainer.is_global_zero:
            for failure in failures:
                append_line(self.run_dir / "failures.jsonl", failure)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not outputs or not outputs["finished"]:
            return
        keys = [k for k in ("source", "caption", "negative_source") if k in batch]
        by_id = {image_id: k for k, image_id in enumerate(batch["image_id"])}
        for record in outputs["finished"]:
            k = by_id[record["image_id"]]
            append_line(self.prompts_path(trainer), {**record, **{key: batch[key][k] for key in keys}})

    def on_train_end(self, trainer, pl_module):
        """Fold the other ranks' files into prompts.jsonl (sorted, one line per image), atomically."""
        trainer.strategy.barrier()
        if not trainer.is_global_zero or trainer.world_size == 1:
            return
        final = self.run_dir / "prompts.jsonl"
        rank_files = sorted(self.run_dir.glob("prompts.rank*.jsonl"))
        rows = {r["image_id"]: r for path in [final, *rank_files] if path.is_file() for r in read_jsonl(path)}
        write_text_atomic(final, "".join(json.dumps(rows[k]) + "\n" for k in sorted(rows)))
        for path in rank_files:
            path.unlink()

    def prompts_path(self, trainer) -> Path:
        # One file per rank while running; rank 0's name is the plain one.
        rank = trainer.global_rank
        return self.run_dir / ("prompts.jsonl" if rank == 0 else f"prompts.rank{rank}.jsonl")


class PromptProgressBar(TQDMProgressBar):
    """The progress bar with image k of n and the current hard prompt of the first image."""

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        loader = trainer.train_dataloader
        if loader is not None:
            n_images = sum(len(b) for b in loader.batch_sampler.batches)
            batch_index = trainer.fit_loop.epoch_loop.batch_progress.current.completed // max(pl_module.hparams.steps, 1)
            first = min(batch_index * pl_module.hparams.batch_size + 1, n_images)
            metrics["image"] = f"{first}/{n_images}"
        if pl_module.image_ids:
            with torch.no_grad():
                ids = pl_module.project(pl_module.soft_prompt[:1])[0]
            metrics["prompt"] = pl_module.vocab.decode(ids.tolist())[:60]
        return metrics
