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
