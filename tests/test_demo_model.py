"""The shipped demo model and oracle: they load through from_pretrained, offline, and they
carry the signal inversion needs."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ph2p_lit.backbone import DEMO_MODEL, Backbone
from ph2p_lit.demo.evaluate import prompt_scores
from ph2p_lit.demo.oracle import AttributeOracle
from ph2p_lit.demo.train import to_tensor
from ph2p_lit.demo.world import ATTRIBUTE_VALUES, make_renders


@pytest.fixture(scope="module")
def demo():
    return Backbone.from_pretrained("demo", local_files_only=True)


def test_shipped_weights_are_small_and_in_diffusers_layout():
    files = [p for p in Path(DEMO_MODEL).rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    assert {"model_index.json"} <= {p.name for p in files}
    assert all((Path(DEMO_MODEL) / part).is_dir() for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"))


def test_oracle_reads_fresh_renders():
    images, scenes = make_renders(300, seed=99)
    reads = AttributeOracle.load().read(to_tensor(images))
    for attribute in ATTRIBUTE_VALUES:
        accuracy = np.mean([r[attribute] == getattr(s, attribute) for r, s in zip(reads, scenes)])
        assert accuracy >= 0.98, attribute


def test_true_caption_has_the_lower_diffusion_loss(demo):
    images, scenes = make_renders(8, seed=98)
    latents = demo.encode_images(to_tensor(images)).repeat_interleave(4, 0)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(100, 900, (32,), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    shuffled = [scenes[(i + 1) % 8].caption for i in range(8)]
    with torch.no_grad():
        true = demo.diffusion_loss(latents, noise, t, demo.encode_text([s.caption for s in scenes]).repeat_interleave(4, 0))
        wrong = demo.diffusion_loss(latents, noise, t, demo.encode_text(shuffled).repeat_interleave(4, 0))
    assert (true.view(8, 4).mean(1) < wrong.view(8, 4).mean(1)).sum() >= 7


def test_inversion_recovers_content_words_of_the_bundled_images(tmp_path):
    """A short PH2P run on the shipped images names their colour/shape/background words far more
    often than the random prompts it starts from."""
    import json

    import lightning as L

    from ph2p_lit.callbacks import ResultsWriter
    from ph2p_lit.data import ImageDataModule
    from ph2p_lit.demo.evaluate import summarise_prompt_scores
    from ph2p_lit.inversion import PromptInversion
    from ph2p_lit.runs import read_jsonl

    root = Path(DEMO_MODEL).parent / "images"
    module = PromptInversion(model="demo", prompt_length=7, init_prompt=None, steps=12, max_iter=5, draws=4,
                             english_words=True, batch_size=8)
    data = ImageDataModule(root=str(root), batch_size=8, steps=12)
    L.Trainer(default_root_dir=tmp_path, max_epochs=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, callbacks=[ResultsWriter()]).fit(module, datamodule=data)
    truth = {(r := json.loads(line))["file_name"]: r for line in (root / "metadata.jsonl").read_text().splitlines()}
    rows = read_jsonl(tmp_path / "prompts.jsonl")
    module.image_ids = [r["image_id"] for r in rows]
    initial = [module.vocab.decode(ids.tolist()) for ids in module.initial_ids()]
    score = lambda prompts: summarise_prompt_scores(
        [prompt_scores(p, truth[r["image_id"]]) for p, r in zip(prompts, rows)])["content_words_present"]
    assert len(rows) == 8
    assert score([r["prompt"] for r in rows]) >= 0.4 > 0.1 >= score(initial)


def test_the_shipped_model_generates_with_the_obvious_diffusers_call():
    """StableDiffusionPipeline.from_pretrained(folder) with no dtype argument: every part loads in
    one dtype (was: the text encoder in float16, the U-Net in float32, and a dtype error)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(DEMO_MODEL)
    image = pipe("a red star on a white background", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
