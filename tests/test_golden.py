"""Golden values: one inversion and one NPI latent slice on the shipped demo model, pinned.

They were recorded on this code (torch 2.14.1, CPU); a change anywhere on the path (sampler
streams, projection, the update rule, the scheduler, DDIM inversion) moves them. If a change is
meant to move them, record the new values in the same commit and say why.
"""

import shutil

import pytest
import torch
from PIL import Image

from ph2p_lit import invert
from ph2p_lit.backbone import Backbone
from ph2p_lit.images import DEMO_IMAGES, to_pixels
from ph2p_lit.npi import ddim_invert

IMAGE = DEMO_IMAGES / "render_1000_00000.png"  # "a large green star on a pink background"


def test_a_tiny_inversion_of_a_demo_image_gives_its_recorded_prompt(tmp_path):
    # In a folder of its own: the image id (which seeds the draws) is then its file name, the same
    # in every checkout (a listed file's id is its path).
    (tmp_path / "images").mkdir()
    shutil.copy(IMAGE, tmp_path / "images" / IMAGE.name)
    settings = dict(model="demo", prompt_length=4, steps=3, max_iter=2, init_prompt=None, seed=0)
    (row,) = invert(tmp_path / "images", config=None, run_dir=tmp_path / "run", model=settings,
                    trainer={"callbacks": [], "enable_progress_bar": False})
    assert row["image_id"] == IMAGE.name
    assert row["token_ids"] == [8155, 44634, 16215, 29042]
    assert row["best_loss"] == pytest.approx(0.014449, abs=2e-5)
    assert row["unet_evals"] == 3 * 2 * 1 + 2 * 8  # steps x max_iter x draws, then scorings at steps 1 and 3 x 8 draws


def test_ddim_inversion_of_a_demo_image_gives_its_recorded_latents():
    backbone = Backbone.from_pretrained("demo")
    with Image.open(IMAGE) as image:
        pixels = to_pixels(image, backbone.resolution)[None]
    cond = backbone.encode_text(["a large green star on a pink background"])
    x_T = ddim_invert(backbone, backbone.encode_images(pixels), cond, 5)
    expected = torch.tensor([[0.044398, 0.384967, 0.207087, 0.297530], [-0.290859, -0.031918, -0.130308, 0.189697]])
    torch.testing.assert_close(x_T[0, 0, :2, :4], expected, atol=1e-4, rtol=0)
