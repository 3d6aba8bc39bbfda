"""The two DataModules: target images for `ph2p invert` (ImageDataModule) and images with their
prompts for `ph2p reconstruct` (PromptedImages).

Both take their images from image_sets (found, captioned, checked, decoded once per batch), skip
the images the run folder already has (runs.RunFolder), give each rank a disjoint stride slice,
and follow the module's `model` (and, for inversion, its `steps`).
"""

import hashlib
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Subset, default_collate

from .batching import RepeatedBatches, in_flight, rank_batches
from .errors import InputError, at_least
from .image_sets import (
    ImageFiles,
    file_items,
    hub_images,
    model_resolution,
    pair_negatives,
    prompted_items,
    readable,
)
from .images import MAX_PIXELS
from .runs import RunFolder


def parse_shard(shard: str) -> tuple[int, int]:
    """ "i/N" -> (i, N), or a one-line error naming data.shard."""
    index, _, count = str(shard).partition("/")
    if not (index.strip().isdigit() and count.strip().isdigit() and int(index) < int(count)):
        raise InputError(f"data.shard={shard!r}: give i/N with 0 <= i < N, e.g. 0/4 for the first of 4 jobs")
    return int(index), int(count)


def shard_name(shard: str | None) -> str | None:
    """The part of a run folder's file names that a shard job writes: "i-of-N"."""
    if shard is None:
        return None
    index, count = parse_shard(shard)
    return f"{index}-of-{count}"


class RunImages(L.LightningDataModule):
    """What both DataModules share: the images left to do in the run folder, this rank's share of
    them, and the settings that are the module's. Each DataModule names its results
    (`results_kind`: the run folder's lines that mark an image done) and says what skipping means
    (`done_means`)."""

    results_kind: str
    done_means: str

    def model_setting(self, key: str):
        """steps and model are the module's: the data follows them, and a value of its own must
        agree (set from Python, the two could otherwise differ without a word)."""
        own = self.hparams.get(key)
        module = self.trainer.lightning_module if self.trainer else None
        theirs = module.hparams.get(key) if module is not None else None
        if own is not None and theirs is not None and own != theirs:
            raise InputError(f"data.{key}={own} but model.{key}={theirs}: set model.{key} only (the data follows it)")
        return own if own is not None else theirs

    def resolution(self) -> int:
        hp = self.hparams
        return hp.resolution or model_resolution(self.model_setting("model") or "demo", hp.local_files_only)

    def found(self, images, failures: list[dict], where) -> None:
        """Keep the images found (a dataset) and the failures; no image at all is an error."""
        self.images, self.failures = images, failures
        if len(images) == 0:
            why = f" ({len(failures)} could not be read; first: {failures[0]['source']}: " \
                  f"{failures[0]['error']})" if failures else ""
            raise InputError(f"data: no readable images in {where}{why}")

    def item_key(self, i: int) -> tuple[str, str | None]:
        """What a result line must match to count image i as done: its id (an inversion's prompt
        does not depend on settings a rerun would change; a new run folder is a new run)."""
        return self.images.image_ids()[i], None

    def todo_indices(self, skip_done: bool = True) -> list[int]:
        """Indices of the images without a result in the run folder yet (all of them, if not skip_done)."""
        if not (skip_done and self.hparams.skip_done and self.trainer):
            return list(range(len(self.images)))
        done = RunFolder(self.trainer.default_root_dir).done_keys(self.results_kind)
        mine = [i for i in range(len(self.images)) if self.in_shard(self.item_key(i)[0])]
        todo = [i for i in mine if self.item_key(i) not in done]
        skipped = len(mine) - len(todo)
        if skipped and not getattr(self, "_said_skipped", False) and self._rank() == 0:
            self._said_skipped = True  # said once per run, however often the list is asked for
            print(f"{skipped} of {len(mine)} images " + self.done_means.format(
                dir=self.trainer.default_root_dir, todo=len(todo)))
        return todo

    def done_ids(self) -> set[str]:
        """Ids of the images the run folder already has a result for (none when not skipping)."""
        if not (self.hparams.skip_done and self.trainer):
            return set()
        return {image_id for image_id, settings in RunFolder(self.trainer.default_root_dir).done_keys(self.results_kind)
                if settings is None}

    def in_shard(self, image_id: str) -> bool:
        """Whether this job inverts the image: all of them, or with data.shard i/N those whose id
        hashes to i (stable across machines, runs and Python versions, unlike hash())."""
        shard = getattr(self.hparams, "shard", None)
        if shard is None:
            return True
        index, count = parse_shard(shard)
        return int(hashlib.sha1(image_id.encode()).hexdigest()[:12], 16) % count == index

    def rank_indices(self, skip_done: bool = True) -> list[int]:
        """This rank's images: a stride slice of those not done, so every image goes to exactly
        one rank."""
        return self.todo_indices(skip_done)[self._rank() :: self._world()]

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer else 0

    def _world(self) -> int:
        return self.trainer.world_size if self.trainer else 1



class ImageDataModule(RunImages):
    """Target images for inversion.

    Args:
        root: a folder of images (searched recursively, sorted; captions from metadata.jsonl);
            "demo": the 8 renders shipped with the package.
        files: a list of image paths, or one text file listing them.
        dataset: a Hugging Face dataset name or local path (for example an `imagefolder`).
        split: which split of `dataset`.
        image_column: the column of `dataset` holding the images.
        caption_column: the column of `dataset` holding captions (None, or absent: no captions).
        limit: only the first `limit` images (after sorting).
        batch_size: images inverted together.
        steps: optimiser steps per batch; None: model.steps (its home; a different value in both
            is an error).
        resolution: pixels per side; None reads the model's VAE config.
        model: the model whose resolution to use; None: model.model.
        local_files_only: never reach the hub for it (set from model.local_files_only).
        num_workers: DataLoader workers.
        skip_done: leave out images that already have a line in the run folder's prompts*.jsonl
            (trainer.default_root_dir), so a run started again resumes where it stopped.
        negatives: negative images (the paper's Algorithm 2; model.negative_weight): one image
            file for every target, a folder holding a negative under each target's relative
            name, or a .jsonl of {"image": target image_id, "negative": path} lines.
        max_pixels: an image file declaring more pixels (width x height) is not decoded and goes
            to failures.jsonl; raise it for larger images (100 megapixels take 300 MB as RGB).
        shard: "i/N": this job inverts share i of N (0 <= i < N, split by a hash of each image
            id), writing prompts.shard-i-of-N.jsonl in the same run folder, so N independent jobs
            (a SLURM array, pre-emptible machines) invert every image once; the last to end
            merges them into prompts.jsonl (or `ph2p merge RUN`).
    """

    results_kind = "prompts"
    done_means = "already have prompts in {dir}; inverting the other {todo} (a new trainer.default_root_dir starts afresh)"

    def __init__(
        self,
        root: str | None = None,
        files: list[str] | str | None = None,
        dataset: str | None = None,
        split: str = "train",
        image_column: str = "image",
        caption_column: str | None = "text",
        limit: int | None = None,
        batch_size: int = 1,
        steps: int | None = None,
        resolution: int | None = None,
        model: str | None = None,
        local_files_only: bool = False,
        num_workers: int = 0,
        skip_done: bool = True,
        negatives: str | None = None,
        max_pixels: int = MAX_PIXELS,
        shard: str | None = None,
    ):
        super().__init__()
        if shard is not None:
            parse_shard(shard)  # a bad value stops here, in one line
        if sum(x is not None for x in (root, files, dataset)) != 1:
            raise InputError("data: give exactly one of data.root (a folder), data.files or data.dataset")
        at_least("data", 1, batch_size=batch_size, steps=steps, limit=limit, resolution=resolution,
                 max_pixels=max_pixels)
        at_least("data", 0, num_workers=num_workers)
        if negatives is not None and dataset is not None:
            raise InputError("data.negatives: pair negatives with data.root or data.files, not data.dataset")
        if negatives is not None and not Path(negatives).exists():
            raise InputError(f"data.negatives={negatives}: no such file or folder")
        self.save_hyperparameters()
        self.failures: list[dict] = []

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        self.model_setting("steps")  # a disagreement stops here, before any work
        resolution = self.resolution()
        if hp.dataset is not None:
            self.found(hub_images(hp.dataset, hp.split, hp.image_column, hp.caption_column, hp.limit, resolution),
                       [], hp.dataset)
            return
        items, missing = file_items(hp.root, hp.files)
        items = [item for item in items[: hp.limit] if self.in_shard(item["image_id"])]  # other shards' unread
        if hp.negatives:
            items = pair_negatives(items, Path(hp.negatives))
        # Only the images left to do are opened to check them: a rerun of 100,000 done images
        # would otherwise decode them all again before finding there is nothing to do.
        done = self.done_ids()
        checked, unreadable = readable([item for item in items if item["image_id"] not in done], hp.max_pixels)
        keep = {item["image_id"] for item in checked} | done
        self.found(ImageFiles([item for item in items if item["image_id"] in keep], resolution, hp.max_pixels),
                   missing + unreadable, hp.root or hp.files)

    def resumed_batches(self) -> int:
        """Batches this epoch had consumed when the checkpoint being resumed from was written."""
        # `processed`, not `completed`: a checkpoint written at a batch's end counts it processed only.
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else 0

    def state_dict(self) -> dict:
        # Every rank's plan of image ids: a resumed run finds the images a checkpoint stopped inside
        # by position, even after images were added to or removed from the folder since.
        return {"plans": getattr(self, "_plans", None), "consumed": getattr(self, "_consumed", 0)}

    def load_state_dict(self, state: dict) -> None:
        self._saved = state

    def train_dataloader(self) -> DataLoader:
        steps, size, world = self.model_setting("steps"), self.hparams.batch_size, self._world()
        if steps is None:
            raise InputError("data.steps: not set and no model to follow; give model.steps")
        todo = self.todo_indices()
        consumed = self.resumed_batches()
        flying, repeats_left = self._in_flight_at_checkpoint(todo, consumed)
        ids_of = self.images.image_ids()
        index = {image_id: i for i, image_id in enumerate(ids_of)}
        flying_ids = {image_id for batch in flying for image_id in batch}
        rest = [i for i in todo if ids_of[i] not in flying_ids]
        plans = []
        for r in range(world):  # every rank's plan: each rank saves them all (rank 0's checkpoint is read by all)
            batches = rank_batches(rest, size, world, r) if rest else []
            # A rank with nothing in flight spends the in-flight repeats on its first batch, so the
            # ranks stay in lockstep; that batch then simply reaches its `steps` sooner.
            first = [index[i] for i in flying[r]] or (batches or [todo[-1:]])[0]
            head = [(first, repeats_left)] if repeats_left and first else []
            plans.append(head + [(batch, steps) for batch in batches])
        self._plans = [[([ids_of[i] for i in batch], n) for batch, n in plan] for plan in plans]
        self._consumed = consumed
        sampler = RepeatedBatches(plans[self._rank()], consumed=consumed)
        self.images.keep = size  # a batch is decoded once, not at each of its steps
        return DataLoader(self.images, batch_sampler=sampler, collate_fn=default_collate, num_workers=self.hparams.num_workers)

    def _in_flight_at_checkpoint(self, todo: list[int], consumed: int) -> tuple[list[list[str]], int]:
        """Per rank, the image ids of the batch the checkpoint stopped inside (only where it is still
        whole: every image present, none finished, so the checkpoint's soft prompts belong to it),
        and how many of its steps remain. Nothing when starting afresh."""
        world = self._world()
        flying, repeats_left = [[] for _ in range(world)], 0
        saved = getattr(self, "_saved", None) if consumed else None
        if not (saved and saved.get("plans") and len(saved["plans"]) == world):
            return flying, 0
        waiting = {self.images.image_ids()[i] for i in todo}
        for r, plan in enumerate(saved["plans"]):
            batch, used = in_flight(plan, consumed - saved["consumed"])
            flying[r] = batch if batch and set(batch) <= waiting else []
            repeats_left = max(repeats_left, self.model_setting("steps") - used if batch else 0)
        return flying, repeats_left


class PromptedImages(RunImages):
    """Images with their prompts, for `ph2p reconstruct`: one predict batch per `batch_size` images.

    Args:
        prompts: a prompts.jsonl from `ph2p invert`; each line names its image (`source`) and
            its recovered `prompt`; a line may add its own `edit` (it overrides model.edit).
        source_root: with `prompts`, the folder its images are read from, and only from: a
            relative `source` is taken from it, and an image moved with the folder is found under
            it. None: each line's own `source_root` (the folder invert found it in), else the
            prompts file's folder. Set it for a prompts file you did not write.
        prompt: instead, one text prompt for every image of `root` or `files`.
        root: with `prompt`, a folder of images (as ImageDataModule).
        files: with `prompt`, a list of image paths or a file listing them.
        limit: only the first `limit` images.
        resolution: pixels per side; None reads the model's VAE config.
        model: None: model.model.
        local_files_only: set from model.local_files_only.
        num_workers: DataLoader workers.
        batch_size: images per U-Net batch.
        skip_done: leave out images that already have a line in the run folder's reconstructions*.jsonl.
        max_pixels: an image file declaring more pixels (width x height) is not decoded and is
            skipped; raise it for larger images.
    """

    results_kind = "reconstructions"
    done_means = "already done with these settings in {dir}; reconstructing the other {todo}"

    def __init__(
        self,
        prompts: str | None = None,
        source_root: str | None = None,
        prompt: str | None = None,
        root: str | None = None,
        files: list[str] | str | None = None,
        limit: int | None = None,
        batch_size: int = 8,
        resolution: int | None = None,
        model: str | None = None,
        local_files_only: bool = False,
        num_workers: int = 0,
        skip_done: bool = True,
        max_pixels: int = MAX_PIXELS,
    ):
        at_least("data", 1, batch_size=batch_size, limit=limit, resolution=resolution, max_pixels=max_pixels)
        at_least("data", 0, num_workers=num_workers)
        if (prompts is None) == (prompt is None):
            raise InputError("data: give data.prompts (a prompts.jsonl from `ph2p invert`) or data.prompt "
                             "(one text prompt) with data.root or data.files")
        if prompt is not None and (root is None) == (files is None):
            raise InputError("data.prompt: give the images too, as data.root (a folder) or data.files")
        if prompts is not None and (root is not None or files is not None):
            raise InputError("data.prompts names each line's image; leave out data.root and data.files")
        if source_root is not None and (prompts is None or not Path(source_root).is_dir()):
            raise InputError(f"data.source_root={source_root}: " + ("no such folder" if prompts is not None else
                             "it says where data.prompts' images are; data.root and data.files name their own"))
        super().__init__()
        self.save_hyperparameters()
        self.failures: list[dict] = []

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if hp.prompt is not None:
            items, missing = file_items(hp.root, hp.files)
            items = [{**item, "prompt": hp.prompt, "edit": ""} for item in items]
        elif not Path(hp.prompts).is_file():
            raise InputError(f"data.prompts={hp.prompts}: no such file (give the prompts.jsonl of an invert run)")
        else:
            items, missing = prompted_items(Path(hp.prompts), hp.source_root, "data.source_root")
        items, unreadable = readable(items[: hp.limit], hp.max_pixels)
        self.found(ImageFiles(items, self.resolution(), hp.max_pixels), missing + unreadable,
                   hp.prompts or hp.root or hp.files)

    def item_key(self, i: int) -> tuple[str, str | None]:
        # Done means done with these settings: an edit, another negative or guidance is new work.
        item = self.images.items[i]
        return item["image_id"], self.trainer.lightning_module.settings_key(item.get("edit"))

    def result_keys(self) -> set[tuple[str, str | None]]:
        """(image id, settings key) of every result this run stands for, made now or before."""
        return {self.item_key(i) for i in range(len(self.images))}

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(Subset(self.images, self.rank_indices()), batch_size=self.hparams.batch_size,
                          collate_fn=default_collate, num_workers=self.hparams.num_workers)
