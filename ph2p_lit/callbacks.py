"""What an inversion run writes and shows: the results writer, the hard-prompt trace, progress.

The module holds the algorithm (PromptInversion: the prompts, their losses, the best, early
stopping, refinement, selection); these only observe it and write or show what it returns, so
their order in trainer.callbacks does not matter.
"""

import io
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import TQDMProgressBar
from safetensors.torch import save_file

from .data import shard_name
from .runs import RunFolder, append_line, file_name, save_atomic
from .terminal import one_line


class PromptLogger(L.Callback):
    """Every `every_n_steps`, project the soft prompts and append the hard prompts with their
    current loss and U-Net evaluations to `trace.rank<r>.jsonl` in the run folder (logger-independent, readable while running)."""

    def __init__(self, every_n_steps: int = 50):
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not outputs or pl_module.step_in_batch % self.every_n_steps:
            return
        ids = pl_module.current_ids()
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        evals = pl_module.unet_evals.tolist()
        for image_id, row, loss, spent in zip(pl_module.image_ids, ids, outputs["losses"].tolist(), evals):
            record = {"image_id": image_id, "step": pl_module.step_in_batch, "loss": loss,
                      "prompt": pl_module.vocab.decode(row.tolist()), "unet_evals": spent}
            append_line(run_dir / f"trace.rank{trainer.global_rank}.jsonl", record)


class RunFolderWriter(L.Callback):
    """A callback that writes into the run folder (`self.run`) and holds its lock from set-up to
    tear-down (rank 0), so a second run started on the same folder stops with one line instead of
    doing every image again beside the first."""

    lock = None  # taken in setup; an error before it has nothing to release

    def setup(self, trainer, pl_module, stage):
        self.run = self.run_folder(trainer)
        self.lock = self.run.lock() if trainer.is_global_zero else None
        if self.lock is not None:
            self.lock.acquire()

    def run_folder(self, trainer) -> RunFolder:
        return RunFolder(trainer.default_root_dir)

    def teardown(self, trainer, pl_module, stage):
        if self.lock is not None:
            self.lock.release()

    def on_exception(self, trainer, pl_module, exception):
        if self.lock is not None:
            self.lock.release()  # a run that stops on an error frees its folder for the rerun


class ResultsWriter(RunFolderWriter):
    """Write each finished image's line in `prompts.jsonl` (one file per rank while running,
    merged when a run starts and when it ends), its continuous prompt as a textual-inversion file in `embeddings/`, and
    the images that could not be read in `failures.jsonl`; hold the run folder's lock.

    The module adds this callback itself (configure_callbacks), so a trainer.callbacks list
    without it still writes every result.

    The embedding file is diffusers' format: `{"<token>": (L, D)}` for one text encoder,
    `{"clip_l": ..., "clip_g": ...}` for SDXL's two; `pipe.load_textual_inversion(path)` adds the
    token `<file name of the image>`, which then stands for the image's L soft vectors in a prompt.
    """

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if self.lock is not None:
            # What a run killed before its end left unmerged (a DDP run killed while rank 0 wrote
            # the report) is merged now: a rerun that finds every image done has no training end.
            # No rank writes before the barrier that ends set-up, so nothing is appended meanwhile.
            # Failures too are listed here, not at the training start a rerun may not have.
            self.run.merge("prompts")
            self.run.add_failures(getattr(trainer.datamodule, "failures", []) if trainer.datamodule else [])

    def run_folder(self, trainer) -> RunFolder:
        """The run folder, as one shard of it when data.shard is set (its own files and lock)."""
        shard = getattr(trainer.datamodule, "hparams", {}).get("shard") if trainer.datamodule else None
        return RunFolder(trainer.default_root_dir, shard=shard_name(shard))

    def teardown(self, trainer, pl_module, stage):
        super().teardown(trainer, pl_module, stage)
        if trainer.is_global_zero and self.run.shard is not None and self.lock is not None:
            # Its own lock released, a shard job folds every shard's lines into prompts.jsonl if no
            # other job is writing: the last one to end leaves one file. Else the others will.
            merged = self.run.merge_shards("prompts")
            print(f"shard {self.run.shard}: " + ("every shard's prompts merged into prompts.jsonl" if merged else
                  "other shards are still running; the last to end merges (or `ph2p merge RUN`)"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not outputs or not outputs["finished"]:
            return
        keys = [k for k in ("source", "source_root", "caption", "negative_source") if k in batch]
        by_id = {image_id: k for k, image_id in enumerate(batch["image_id"])}
        for j, record in enumerate(outputs["finished"]):
            k = by_id[record["image_id"]]
            embedding = self.save_embedding(pl_module.backbone, record["image_id"], outputs["soft_prompts"][j])
            self.run.append("prompts", {**record, **{key: batch[key][k] for key in keys}, "embedding": embedding},
                            trainer.global_rank)

    def save_embedding(self, backbone, image_id: str, soft_prompt: torch.Tensor) -> str:
        path = self.run.image_file("embeddings", image_id, ".safetensors")
        parts = [p.contiguous().clone() for p in backbone.per_encoder(soft_prompt.float())]
        tensors = {f"<{file_name(image_id)}>": parts[0]} if len(parts) == 1 else {"clip_l": parts[0], "clip_g": parts[1]}
        save_atomic(path, lambda tmp: save_file(tensors, tmp))
        return path.relative_to(self.run.path).as_posix()

    def on_train_end(self, trainer, pl_module):
        """Fold the other ranks' files into prompts.jsonl (sorted, one line per image), atomically.
        Also on one process: a DDP run resumed on a single device finds the other ranks' files."""
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            self.run.merge("prompts")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written whole or not at all: into a temporary file beside the checkpoint, then
    renamed over it. Lightning's own save moves a temporary from the system's temp folder, which
    across file systems is a copy that a full disk cuts to a 0-byte `.ckpt`; here a full disk or a
    read-only folder is one line and the previous checkpoint is kept. The invert command sets it as
    `trainer.plugins`, so a `--trainer.callbacks+=ModelCheckpoint` writes through it."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        # Serialised in memory first (a checkpoint here is kilobytes: soft prompts, optimiser state):
        # torch's file writer reports a full disk as a RuntimeError, Python's file as the OSError it is.
        serialised = io.BytesIO()
        torch.save(checkpoint, serialised)

        def save(tmp: Path) -> None:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(serialised.getvalue())

        save_atomic(Path(path), save)


class PromptProgressBar(TQDMProgressBar):
    """The progress bar with image k of n, the current hard prompt of the first image, and the
    U-Net sample evaluations spent per image of the batch so far (the cost unit)."""

    @property
    def train_description(self) -> str:
        return "invert"

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        # One epoch is the whole run here (each step is an optimiser step on the current images),
        # so no "Epoch 0" in place of what the bar counts.
        self.train_progress_bar.set_description(self.train_description)

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        loader = trainer.train_dataloader
        if loader is not None:
            sampler = loader.batch_sampler
            first, last = sampler.images_at(trainer.fit_loop.epoch_loop.batch_progress.current.completed)
            metrics["image"] = f"{first}/{sampler.n_images()}" if first == last else f"{first}-{last}/{sampler.n_images()}"
        if pl_module.image_ids:
            metrics["prompt"] = one_line(pl_module.first_prompt())[:60]  # a model's tokens are text from outside
            metrics["unet/img"] = int(pl_module.unet_evals[: len(pl_module.image_ids)].float().mean())
        return metrics
