"""Fixtures: a tiny random Stable-Diffusion-architecture model, saved once per session in the
diffusers layout so tests go through the real `from_pretrained` code, and a few target images."""

import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from ph2p_lit.backbone import DEMO_MODEL
from ph2p_lit.demo.architecture import build_components, save_pipeline

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
NOT_THE_SUITES = {".git", ".venv", "__pycache__", ".pytest_cache"}  # git, the install, caches


def _files_in_checkout() -> set[str]:
    files = set()
    for folder, subfolders, names in os.walk(ROOT):
        subfolders[:] = [s for s in subfolders if s not in NOT_THE_SUITES and not s.endswith(".egg-info")]
        files.update(os.path.relpath(os.path.join(folder, n), ROOT) for n in names)
    return files


@pytest.fixture(scope="session", autouse=True)
def checkout_left_as_it_was():
    """The suite writes in temporary folders only: after `make test` the checkout holds the same
    files, ignored ones included (a test that forgot its run folder left runs/invert/ behind)."""
    before = _files_in_checkout()
    yield
    added = sorted(_files_in_checkout() - before)
    assert not added, f"the test suite wrote into the checkout: {added[:10]}"


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


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """A tiny random CLIPModel and its image processor, saved as transformers saves them."""
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(small, vocab_size=100),
                        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


@pytest.fixture()
def copy_of(tmp_path):
    def copy(src: str) -> str:
        dst = tmp_path / "copy"
        shutil.copytree(src, dst)
        return str(dst)

    return copy


@contextmanager
def _fail_if_blocked(seconds: int = 20):
    def give_up(*_):
        raise TimeoutError(f"blocked for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture()
def no_hang():
    """`with no_hang():` fails, rather than waits for ever, if the code under test blocks (opening
    a FIFO does): the alarm's exception interrupts the blocked call."""
    return _fail_if_blocked
