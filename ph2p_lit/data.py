"""ImageDataModule: target images from a folder, a file list or a Hugging Face dataset.

Images are resized and centre-cropped to the model's resolution. Each rank gets a disjoint,
stable slice of the images; each batch is repeated `steps` times, one optimiser step each.
"""

import logging
from collections import OrderedDict
from pathlib import Path

import lightning as L
from diffusers import AutoencoderKL
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate

from .backbone import resolve_model
from .errors import InputError
from .images import DEMO_IMAGES, find_images, read_captions, read_text, to_pixels
from .runs import RunFolder, read_jsonl

log = logging.getLogger(__name__)

class DecodedOnce(Dataset):
    """A dataset that keeps its most recently loaded items: a batch is asked for once per
    optimiser step, and decoding a large image at every step costs more than the step."""

    keep = 64  # items kept; the DataModule sets it to its batch size

    def __getitem__(self, i: int) -> dict:
        cache = self.__dict__.setdefault("_recent", OrderedDict())
        if i in cache:
            cache.move_to_end(i)
            return cache[i]
        item = cache[i] = self.load(i)
        while len(cache) > self.keep:
            cache.popitem(last=False)
        return item

    def load(self, i: int) -> dict:
        raise NotImplementedError


class ImageFiles(DecodedOnce):
    """Images on disk with optional captions; ids are paths relative to their root."""

    def __init__(self, items: list[dict], resolution: int):
        self.items, self.resolution = items, resolution
        self.ids = [item["image_id"] for item in items]  # built once: planning reads it per image

    def __len__(self) -> int:
        return len(self.items)

    def image_ids(self) -> list[str]:
        return self.ids

    def load(self, i: int) -> dict:
        item = self.items[i]
        with Image.open(item["source"]) as image:
            pixels = to_pixels(image, self.resolution)
        if "negative_source" not in item:
            return {**item, "pixels": pixels}
        with Image.open(item["negative_source"]) as image:
            return {**item, "pixels": pixels, "negative_pixels": to_pixels(image, self.resolution)}


class HFImages(DecodedOnce):
    """A Hugging Face `datasets` dataset with an image column and an optional caption column."""

    def __init__(self, dataset, image_column: str, caption_column: str | None, name: str, resolution: int):
        self.dataset, self.image_column, self.caption_column = dataset, image_column, caption_column
        self.name, self.resolution = name, resolution
        self.ids, self.sources = self._names()

    def _names(self) -> tuple[list[str], list[str]]:
        """Each image's file where the dataset keeps one (an imagefolder does): its name is the id
        and its path the source, so the report, `reconstruct` and `generate` find the image.
        Otherwise (images stored as bytes) the row number and `name[row]`."""
        import datasets

        rows = range(len(self.dataset))
        try:
            column = self.dataset.cast_column(self.image_column, datasets.Image(decode=False))[self.image_column]
            paths = [cell.get("path") if isinstance(cell, dict) else None for cell in column]
        except (ValueError, TypeError):  # not an image feature
            paths = [None] * len(self.dataset)
        if all(p and Path(p).is_file() for p in paths):
            names = [Path(p).name for p in paths]
            ids = names if len(set(names)) == len(names) else [Path(p).as_posix() for p in paths]
            return ids, [str(p) for p in paths]
        return [f"{i:06d}" for i in rows], [f"{self.name}[{i}]" for i in rows]

    def __len__(self) -> int:
        return len(self.dataset)

    def image_ids(self) -> list[str]:
        return self.ids

    def load(self, i: int) -> dict:
        row = self.dataset[i]
        caption = row.get(self.caption_column) if self.caption_column else None
        return {
            "image_id": self.ids[i],
            "source": self.sources[i],
            "caption": caption or "",
            "pixels": to_pixels(row[self.image_column], self.resolution),
        }


class RepeatedBatches(Sampler):
    """A plan of (batch of indices, repeats) pairs: each batch yielded `repeats` times in a row,
    one optimiser step each.

    consumed: items the run had already consumed before a restart from a checkpoint. Lightning
    restores its batch count and expects only the remaining ones, so they count in len() but are
    not yielded again.
    """

    def __init__(self, plan: list[tuple[list[int], int]], consumed: int = 0):
        self.plan, self.consumed = plan, consumed

    def __iter__(self):
        for batch, repeats in self.plan:
            for _ in range(repeats):
                yield batch

    def __len__(self) -> int:
        return self.consumed + sum(repeats for _, repeats in self.plan)

    def n_images(self) -> int:
        return len({i for batch, _ in self.plan for i in batch})

    def images_at(self, consumed: int) -> tuple[int, int]:
        """(first, last) ordinal of the images being inverted after `consumed` items, from 1."""
        seen, position = set(), self.consumed
        for batch, repeats in self.plan:
            if consumed < position + repeats:
                first = len(seen) + 1
                return first, first + len(set(batch) - seen) - 1
            seen |= set(batch)
            position += repeats
        return len(seen), len(seen)


def rank_batches(items: list, batch_size: int, world: int, rank: int) -> list[list]:
    """Rank `rank`'s stride slice of `items` in batches. Under DDP ranks step in lockstep, so every
    rank gets the longest shard's batch count: a shorter one repeats its last batch (a repeat of a
    finished batch costs nothing), and a rank left without items repeats the last item (the merge of
    the rank files keeps one line per image)."""
    shards = [items[r::world] for r in range(world)]
    n_batches = max(-(-len(shard) // batch_size) for shard in shards)
    mine = shards[rank] or items[-1:]
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    return batches + batches[-1:] * (n_batches - len(batches))


def in_flight(plan: list[tuple[list, int]], consumed: int) -> tuple[list, int]:
    """The batch of `plan` that `consumed` items stop inside, and how many of its repeats were
    used; ([], 0) when they stop between batches."""
    position = 0
    for batch, repeats in plan:
        if consumed < position + repeats:
            return (batch, consumed - position) if consumed > position else ([], 0)
        position += repeats
    return [], 0


class ImageDataModule(L.LightningDataModule):
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
    """

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
    ):
        super().__init__()
        self._check_sources(root, files, dataset)
        if batch_size < 1 or (steps is not None and steps < 1):
            raise InputError(f"data.batch_size={batch_size}, data.steps={steps}: both must be at least 1")
        if negatives is not None and dataset is not None:
            raise InputError("data.negatives: pair negatives with data.root or data.files, not data.dataset")
        if negatives is not None and not Path(negatives).exists():
            raise InputError(f"data.negatives={negatives}: no such file or folder")
        self.save_hyperparameters()
        self.failures: list[dict] = []

    def _check_sources(self, root, files, dataset) -> None:
        if sum(x is not None for x in (root, files, dataset)) != 1:
            raise InputError("data: give exactly one of data.root (a folder), data.files or data.dataset")

    def model_setting(self, key: str):
        """steps and model are the module's: the data follows them, and a value of its own must
        agree (set from Python, the two could otherwise differ without a word)."""
        own = self.hparams.get(key)
        module = self.trainer.lightning_module if self.trainer else None
        theirs = module.hparams.get(key) if module is not None else None
        if own is not None and theirs is not None and own != theirs:
            raise InputError(f"data.{key}={own} but model.{key}={theirs}: set model.{key} only (the data follows it)")
        return own if own is not None else theirs

    def _resolution(self) -> int:
        if self.hparams.resolution:
            return self.hparams.resolution
        model = self.model_setting("model") or "demo"
        try:
            config = AutoencoderKL.load_config(
                resolve_model(model), subfolder="vae", local_files_only=self.hparams.local_files_only
            )
        except OSError as e:
            if Path(resolve_model(model)).is_dir():
                raise InputError(f"data.model={model!r}: cannot read its vae/config.json to find the resolution; "
                                 "set data.resolution or give a complete model folder") from None
            raise InputError(f"model {model!r}: not in the local Hugging Face cache and the hub did not answer "
                             f"({str(e).strip().splitlines()[0][:150] if str(e).strip() else type(e).__name__}); "
                             f"download it first (`hf download {model}`) or give a local folder") from None
        return int(config["sample_size"])

    def _file_items(self) -> list[dict]:
        hp = self.hparams
        if hp.root is not None:
            root = Path(DEMO_IMAGES if hp.root == "demo" else hp.root)
            if not root.is_dir():
                raise InputError(f"data.root={hp.root}: no such folder")
            paths, failures = find_images(root)
            self.failures += failures
            captions = read_captions(root)
        else:
            files = hp.files
            if isinstance(files, str):
                listing = Path(files)
                if not listing.is_file():
                    raise InputError(f"data.files={files}: no such list file")
                files = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
            paths, root, captions = [Path(f) for f in files], None, {}
            for folder in {path.parent for path in paths}:  # each listed file's folder's metadata.jsonl
                captions |= {(folder / name).as_posix(): text for name, text in read_captions(folder).items()}
        items = []
        for path in paths:
            rel = path.relative_to(root).as_posix() if root else path.as_posix()
            caption = captions.get(rel) or (read_text(path.with_suffix(".txt")).strip()
                                            if path.with_suffix(".txt").is_file() else "")
            items.append({"image_id": rel, "source": str(path), "caption": caption})
        return items

    def _pair_negatives(self, items: list[dict], negatives: Path) -> list[dict]:
        """Give every target its negative image (Algorithm 2); a target without one is an error."""
        if negatives.is_dir():
            pairs = {item["image_id"]: negatives / item["image_id"] for item in items}
        elif negatives.suffix == ".jsonl":
            pairs = {row["image"]: Path(row["negative"]) for row in read_jsonl(negatives)}
        else:
            pairs = {item["image_id"]: negatives for item in items}
        for item in items:
            path = pairs.get(item["image_id"])
            if path is None or not path.is_file():
                raise InputError(f"data.negatives={negatives}: no negative image for {item['image_id']}"
                                 + (f" (expected {path})" if path else ""))
            item["negative_source"] = str(path)
        return items

    def _check(self, items: list[dict]) -> list[dict]:
        """Keep the images that open; list the others in `failures` (one bad file never stops a run)."""
        good = []
        for item in items:
            try:
                for key in ("source", "negative_source"):
                    if key in item:
                        with Image.open(item[key]) as image:
                            # verify() reads no pixels: a truncated or corrupt file passes it and
                            # then stops the run at every restart. Decoding it here costs one read.
                            image.load()
                good.append(item)
            except Exception as e:  # PIL raises many types for broken files
                reason = f"{type(e).__name__}: {e}".splitlines()[0]
                self.failures.append({"image_id": item["image_id"], "source": item["source"], "error": reason})
                log.warning("skipping %s: %s", item["source"], reason)
        return good

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        self.failures = []  # found again by each setup
        self.model_setting("steps")  # a disagreement stops here, before any work
        resolution = self._resolution()
        if hp.dataset is not None:
            import datasets

            try:
                ds = datasets.load_dataset(hp.dataset, split=hp.split)
            except Exception as e:  # hub, network and file errors of many types; all say the same to a user
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise InputError(f"data.dataset={hp.dataset!r}: cannot load it ({reason}); give a dataset id "
                                 "on the hub or in the local cache, or a local folder") from None
            if hp.image_column not in ds.column_names:
                raise InputError(f"data.image_column={hp.image_column!r} not in {hp.dataset} ({ds.column_names})")
            caption = hp.caption_column if hp.caption_column in ds.column_names else None
            if hp.limit:
                ds = ds.select(range(min(hp.limit, len(ds))))
            self.images = HFImages(ds, hp.image_column, caption, hp.dataset, resolution)
        else:
            items = self._file_items()[: hp.limit]
            if hp.get("negatives"):
                items = self._pair_negatives(items, Path(hp.negatives))
            items = self._check(items)
            self.images = ImageFiles(items, resolution)
        if len(self.images) == 0:
            where = hp.get("prompts") or hp.root or hp.files or hp.dataset
            why = f" ({len(self.failures)} could not be read; first: {self.failures[0]['source']}: " \
                  f"{self.failures[0]['error']})" if self.failures else ""
            raise InputError(f"data: no readable images in {where}{why}")

    results_kind = "prompts"  # the run folder's results whose lines mark an image as done
    done_means = "already have prompts in {dir}; inverting the other {todo} (a new trainer.default_root_dir starts afresh)"

    def done_keys(self) -> set[tuple[str, str | None]]:
        """(image id, settings key) of every result in the run folder already (every rank's file)."""
        return RunFolder(self.trainer.default_root_dir).done_keys(self.results_kind)

    def item_key(self, i: int) -> tuple[str, str | None]:
        """What a result line must match to count image i as done: its id (an inversion's prompt
        does not depend on settings a rerun would change; a new run folder is a new run)."""
        return self.images.image_ids()[i], None

    def todo_indices(self, skip_done: bool = True) -> list[int]:
        """Indices of the images without a result in the run folder yet (all of them, if not skip_done)."""
        if not (skip_done and self.hparams.skip_done and self.trainer):
            return list(range(len(self.images)))
        done = self.done_keys()
        todo = [i for i in range(len(self.images)) if self.item_key(i) not in done]
        skipped = len(self.images) - len(todo)
        if skipped and not getattr(self, "_said_skipped", False) and self._rank() == 0:
            self._said_skipped = True  # said once per run, however often the list is asked for
            print(f"{skipped} of {len(self.images)} images " + self.done_means.format(
                dir=self.trainer.default_root_dir, todo=len(todo)))
        return todo

    def rank_indices(self, skip_done: bool = True) -> list[int]:
        """This rank's images: a stride slice of those not done, so every image goes to exactly
        one rank."""
        return self.todo_indices(skip_done)[self._rank() :: self._world()]

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer else 0

    def _world(self) -> int:
        return self.trainer.world_size if self.trainer else 1

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


class PromptedImages(ImageDataModule):
    """Images with their prompts, for `ph2p reconstruct`: one predict batch per `batch_size` images.

    Args:
        prompts: a prompts.jsonl from `ph2p invert`; each line names its image (`source`) and
            its recovered `prompt`; a line may add its own `edit` (it overrides model.edit).
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
    """

    results_kind = "reconstructions"
    done_means = "already done with these settings in {dir}; reconstructing the other {todo}"

    def item_key(self, i: int) -> tuple[str, str | None]:
        # Done means done with these settings: an edit, another negative or guidance is new work.
        item = self.images.items[i]
        return item["image_id"], self.trainer.lightning_module.settings_key(item.get("edit"))

    def __init__(
        self,
        prompts: str | None = None,
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
    ):
        if (prompts is None) == (prompt is None):
            raise InputError("data: give data.prompts (a prompts.jsonl from `ph2p invert`) or data.prompt "
                             "(one text prompt) with data.root or data.files")
        if prompt is not None and (root is None) == (files is None):
            raise InputError("data.prompt: give the images too, as data.root (a folder) or data.files")
        if prompts is not None and (root is not None or files is not None):
            raise InputError("data.prompts names each line's image; leave out data.root and data.files")
        given = dict(root=root, files=files, limit=limit, batch_size=batch_size, resolution=resolution, model=model,
                     local_files_only=local_files_only, num_workers=num_workers, skip_done=skip_done)
        super().__init__(**given)
        # save_hyperparameters reads constructor frames, which differ between a direct call and
        # LightningCLI's; state every key the parent's methods read.
        self.hparams.update(prompts=prompts, prompt=prompt, dataset=None, negatives=None, **given)

    def _check_sources(self, root, files, dataset) -> None:
        pass  # checked above: a prompts file, or a prompt with root or files

    def _file_items(self) -> list[dict]:
        hp = self.hparams
        if hp.prompt is not None:
            return [{**item, "prompt": hp.prompt, "edit": ""} for item in super()._file_items()]
        path = Path(hp.prompts)
        if not path.is_file():
            raise InputError(f"data.prompts={hp.prompts}: no such file (give the prompts.jsonl of an invert run)")
        items = []
        for row in read_jsonl(path):
            if not {"image_id", "source", "prompt"} <= row.keys():
                raise InputError(f"data.prompts={hp.prompts}: every line needs image_id, source and prompt")
            items.append({k: row.get(k, "") for k in ("image_id", "source", "caption", "prompt", "edit")})
        return sorted(items, key=lambda item: item["image_id"])

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(Subset(self.images, self.rank_indices()), batch_size=self.hparams.batch_size,
                          collate_fn=default_collate, num_workers=self.hparams.num_workers)
