from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ph2p_lit.batching import RepeatedBatches, in_flight, rank_batches
from ph2p_lit.data import ImageDataModule
from ph2p_lit.errors import InputError


def _folder(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (30, 40, 4), dtype=np.uint8), "RGBA").save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (30, 40), dtype=np.uint8), "L").save(root / "gray.jpg")
    Image.fromarray(rng.integers(0, 65535, (30, 40), dtype=np.uint16)).save(root / "sub" / "deep16.png")
    Image.fromarray(rng.integers(0, 255, (1, 1, 3), dtype=np.uint8)).convert("P").save(root / "tiny.gif")
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "pic.webp")
    (root / "broken.png").write_bytes(b"not an image at all")
    (root / "notes.md").write_text("ignored: not an image extension")
    (root / "pic.txt").write_text("a caption beside the image")
    return root


def test_every_mode_converted_and_broken_files_listed(tmp_path):
    dm = ImageDataModule(root=str(_folder(tmp_path)), resolution=16)
    dm.setup()
    ids = [item["image_id"] for item in dm.images.items]
    assert ids == sorted(["gray.jpg", "pic.webp", "rgb.png", "rgba.png", "sub/deep16.png", "tiny.gif"])
    for i in range(len(dm.images)):
        pixels = dm.images[i]["pixels"]
        assert pixels.shape == (3, 16, 16) and pixels.min() >= -1 and pixels.max() <= 1
    assert [f["image_id"] for f in dm.failures] == ["broken.png"]
    assert dm.images[ids.index("pic.webp")]["caption"] == "a caption beside the image"


def test_sixteen_bit_keeps_its_range(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(root / "white16.png")
    dm = ImageDataModule(root=str(root), resolution=4)
    dm.setup()
    assert torch.allclose(dm.images[0]["pixels"], torch.ones(3, 4, 4))


def test_empty_and_missing_folders_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable images"):
        ImageDataModule(root=str(tmp_path / "empty"), resolution=8).setup()
    with pytest.raises(InputError, match="no such folder"):
        ImageDataModule(root=str(tmp_path / "missing"), resolution=8).setup()
    with pytest.raises(ValueError, match="exactly one"):
        ImageDataModule(root="a", files=["b"])


def test_file_list_and_hf_imagefolder(tmp_path, image_folder):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{image_folder}/img1.png\n{image_folder}/img0.png\n")
    dm = ImageDataModule(files=str(listing), resolution=8)
    dm.setup()
    assert len(dm.images) == 2
    hf = ImageDataModule(dataset=image_folder, resolution=8)
    hf.setup()
    assert len(hf.images) == 4 and hf.images[0]["pixels"].shape == (3, 8, 8)
    assert hf.images[0]["caption"].startswith("caption")
    # An imagefolder keeps each image's file: its name is the id and its path the source, so the
    # report, `reconstruct --data.prompts` and `generate` find the image (was: 000000, name[0]).
    assert sorted(hf.images.image_ids()) == [f"img{i}.png" for i in range(4)]
    assert Path(hf.images[0]["source"]).is_file() and Path(hf.images[0]["source"]).name == hf.images[0]["image_id"]


def test_listed_files_get_their_folders_metadata_captions(image_folder):
    dm = ImageDataModule(files=[f"{image_folder}/img2.png", f"{image_folder}/img0.png"], resolution=8)
    dm.setup()
    assert [dm.images[i]["caption"] for i in range(2)] == ["caption 2", "caption 0"]


def test_each_batch_repeats_once_per_step():
    sampler = RepeatedBatches([(batch, 3) for batch in rank_batches([0, 1, 2], 2, world=1, rank=0)])
    assert list(sampler) == [[0, 1]] * 3 + [[2]] * 3
    assert sampler.images_at(0) == (1, 2) and sampler.images_at(4) == (3, 3) and sampler.n_images() == 3


def test_the_bars_position_is_looked_up_not_walked():
    """images_at answers as a walk of the plan would, at every step (repeated last batches and a
    resumed count included), in time that does not grow with the plan: 200,000 lookups in a
    plan of 100,000 images took hours when each walked the plan."""
    import random
    import time

    def walked(plan, consumed, start):
        seen, position = set(), start
        for batch, repeats in plan:
            if consumed < position + repeats:
                return len(seen) + 1, len(seen) + len(set(batch) - seen)
            seen |= set(batch)
            position += repeats
        return len(seen), len(seen)

    rng = random.Random(0)
    batches = rank_batches(list(range(23)), 3, world=2, rank=1) + [[20, 21]]
    plan = [(b, rng.randint(1, 4)) for b in batches]
    sampler = RepeatedBatches(plan, consumed=5)
    assert [sampler.images_at(c) for c in range(5, len(sampler) + 2)] == \
        [walked(plan, c, 5) for c in range(5, len(sampler) + 2)]
    big = RepeatedBatches([(b, 20) for b in rank_batches(list(range(100_000)), 8, world=1, rank=0)])
    started = time.perf_counter()
    for step in range(0, len(big), 10):
        big.images_at(step)
    assert time.perf_counter() - started < 5 and big.images_at(len(big) - 1) == (99_993, 100_000)


def test_every_rank_gets_as_many_batches_and_each_item_once():
    items = list(range(7))
    shards = [rank_batches(items, 2, world=3, rank=r) for r in range(3)]
    assert [len(s) for s in shards] == [2, 2, 2]  # lockstep: 3 + 2 + 2 items in 2 batches each
    assert sorted({i for s in shards for b in s for i in b}) == items
    assert rank_batches([5], 1, world=2, rank=1) == [[5]]  # a rank without items repeats the last one


def test_the_batch_a_checkpoint_stopped_inside_is_found_by_position():
    plan = [(["a"], 2), (["b", "c"], 4), (["d"], 4)]
    assert in_flight(plan, 0) == ([], 0)
    assert in_flight(plan, 1) == (["a"], 1)
    assert in_flight(plan, 2) == ([], 0)  # between batches: nothing to continue
    assert in_flight(plan, 5) == (["b", "c"], 3)
    assert in_flight(plan, 10) == ([], 0)


def test_a_restarted_run_skips_images_it_already_inverted(tiny_model, image_folder, tmp_path):
    import lightning as L

    from ph2p_lit.callbacks import ResultsWriter
    from ph2p_lit.inversion import PromptInversion
    from ph2p_lit.runs import read_jsonl

    def run(limit):
        module = PromptInversion(model=tiny_model, prompt_length=2, steps=1, max_iter=1, init_prompt=None)
        data = ImageDataModule(root=image_folder, steps=1, model=tiny_model, limit=limit)
        L.Trainer(default_root_dir=tmp_path, max_epochs=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, callbacks=[ResultsWriter()]).fit(module, datamodule=data)
        return data

    run(limit=2)  # a run that stopped after two images
    data = run(limit=None)
    ids = [r["image_id"] for r in read_jsonl(tmp_path / "prompts.jsonl")]
    assert sorted(ids) == [f"img{i}.png" for i in range(4)]  # each image once
    assert data.rank_indices() == []  # nothing is left to do


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the point of the test
def test_a_very_large_image_is_resized(tmp_path):
    """10000 x 10000 (100 M pixels: PIL warns above 89 M) is read, resized and cropped."""
    Image.new("RGB", (10000, 10000), (200, 30, 30)).save(tmp_path / "huge.png")
    dm = ImageDataModule(root=str(tmp_path), resolution=16)
    dm.setup()
    pixels = dm.images[0]["pixels"]
    assert pixels.shape == (3, 16, 16) and not dm.failures
    assert abs(float(pixels[0].mean()) - (200 / 127.5 - 1)) < 0.02


def test_each_image_is_decoded_once_per_batch_not_once_per_step(tiny_model, image_folder, tmp_path, monkeypatch):
    import lightning as L

    import ph2p_lit.images as images
    from ph2p_lit.callbacks import ResultsWriter
    from ph2p_lit.inversion import PromptInversion

    opened = []
    real_open = images.Image.open
    monkeypatch.setattr(images.Image, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    module = PromptInversion(model=tiny_model, prompt_length=2, steps=5, max_iter=1, init_prompt=None, batch_size=2)
    data = ImageDataModule(root=image_folder, steps=5, model=tiny_model, batch_size=2)
    L.Trainer(default_root_dir=tmp_path, max_epochs=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, callbacks=[ResultsWriter()]).fit(module, datamodule=data)
    for i in range(4):  # one open to check the file at set-up, one to decode it for its batch
        assert opened.count(f"{image_folder}/img{i}.png") == 2
    # A rerun finds every image done: none is opened again (a folder of 100,000 took minutes).
    opened.clear()
    again = ImageDataModule(root=image_folder, steps=5, model=tiny_model, batch_size=2)
    L.Trainer(default_root_dir=tmp_path, max_epochs=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, callbacks=[ResultsWriter()]).fit(module, datamodule=again)
    assert opened == [] and len(again.images) == 4


def test_prompted_images_check_their_files_like_the_inversion_targets(tmp_path, image_folder):
    from ph2p_lit.data import PromptedImages
    from ph2p_lit.runs import append_line

    (tmp_path / "broken.png").write_bytes(b"not an image")
    prompts = tmp_path / "prompts.jsonl"
    append_line(prompts, {"image_id": "img1.png", "source": f"{image_folder}/img1.png", "source_root": image_folder,
                          "prompt": "a"})
    append_line(prompts, {"image_id": "broken.png", "source": "broken.png", "prompt": "b"})  # beside the prompts file
    data = PromptedImages(prompts=str(prompts), resolution=8)
    data.setup()
    assert data.images.image_ids() == ["img1.png"]
    assert [f["image_id"] for f in data.failures] == ["broken.png"]
    with pytest.raises(InputError, match="give data.prompts"):
        PromptedImages(resolution=8)
