"""Fixtures: a tiny random Stable-Diffusion-architecture model, saved once per session in the
diffusers layout so tests go through the real `from_pretrained` code, and a few target images."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTokenizer

from ph2p_lit.backbone import DEMO_MODEL
from ph2p_lit.demo.architecture import build_components, save_pipeline

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer() -> CLIPTokenizer:
    """The shipped real CLIP BPE tokenizer (model_max_length 16)."""
    return CLIPTokenizer.from_pretrained(DEMO_MODEL, subfolder="tokenizer")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer) -> str:
    parts = build_components(
        tokenizer, text_hidden=32, text_layers=1, unet_channels=(32, 32), vae_channels=(16, 16), image_size=16
    )
    return str(save_pipeline(parts, tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> str:
    """Four small RGB images with captions in an imagefolder metadata.jsonl."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        lines.append(f'{{"file_name": "img{i}.png", "text": "caption {i}"}}')
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return str(root)


@pytest.fixture()
def copy_of(tmp_path):
    def copy(src: str) -> str:
        dst = tmp_path / "copy"
        shutil.copytree(src, dst)
        return str(dst)

    return copy
