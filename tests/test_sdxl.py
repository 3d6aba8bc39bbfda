"""SDXL: one token sequence read by two text encoders, the pooled text embedding and the size
conditioning, on a tiny model of SDXL's architecture (ph2p_lit.architectures 'tiny_sdxl')."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from ph2p_lit.architectures import build_pipeline
from ph2p_lit.backbone import Backbone
from ph2p_lit.cli import main
from ph2p_lit.runs import read_jsonl
from ph2p_lit.vocab import Vocabulary


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> str:
    return str(build_pipeline("tiny_sdxl", tmp_path_factory.mktemp("sdxl") / "model"))


@pytest.fixture(scope="module")
def backbone(tiny_sdxl) -> Backbone:
    return Backbone.from_pretrained(tiny_sdxl, local_files_only=True)


def test_conditioning_is_the_sdxl_pipelines(tiny_sdxl, backbone):
    """Our embedding path gives what diffusers' StableDiffusionXLPipeline.encode_prompt gives:
    both encoders' penultimate states side by side, and the second one's pooled projection."""
    prompts = ["a red star on a white background", "two dogs", ""]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    hidden, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    ours = backbone.encode_text(prompts)
    assert ours.shape == (3, backbone.max_length + 1, hidden.shape[-1])
    torch.testing.assert_close(ours[:, :-1], hidden)
    torch.testing.assert_close(ours[:, -1, : pooled.shape[-1]], pooled)


def test_the_unet_reads_the_pooled_row_and_the_size(backbone):
    cond = backbone.encode_text(["a red star", "a red star"])
    cond[1, -1] += 1.0  # only the pooled embedding differs
    x, t = torch.randn(1, *backbone.latent_shape).expand(2, -1, -1, -1), torch.tensor([500, 500])
    pred = backbone.predict(x, t, cond)
    assert not torch.allclose(pred[0], pred[1])


def test_one_soft_prompt_projects_onto_the_shared_ids_by_the_summed_distances(backbone):
    table = backbone.token_table
    width_1 = backbone.text_encoder.config.hidden_size
    assert table.shape == (len(backbone.tokenizer), width_1 + backbone.text_encoder_2.config.hidden_size)
    vocab = Vocabulary(backbone.tokenizer, table)
    a, b = int(vocab.token_ids[10]), int(vocab.token_ids[20])
    # First half at token a, second half at token b: the nearest by the summed squared distances.
    soft = torch.cat([table[a, :width_1], table[b, width_1:]])
    d = (table[vocab.token_ids] - soft).pow(2)
    expected = vocab.token_ids[(d[:, :width_1].sum(1) + d[:, width_1:].sum(1)).argmin()]
    assert int(vocab.project(soft[None])[0]) == int(expected)
    assert int(vocab.project(table[a][None])[0]) == a


def test_invert_generate_reconstruct_and_a_checkpoint_of_only_the_soft_prompts(tiny_sdxl, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(images / f"i{i}.png")
    main(["invert", f"--model.model={tiny_sdxl}", "--model.prompt_length=3", "--model.steps=3", "--model.max_iter=2",
          "--model.refinement.draws=4", "--model.refinement.budget=60", f"--data.root={images}", "--data.batch_size=2",
          f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.enable_checkpointing=true",
          "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.save_last=true"])
    rows = read_jsonl(tmp_path / "run" / "prompts.jsonl")
    assert sorted(r["image_id"] for r in rows) == ["i0.png", "i1.png"]
    assert all(r["prompt"] and r["steps"] == 3 and r["unet_evals"] > 0 and r["peak_memory_mb"] > 0 for r in rows)
    checkpoint = torch.load(next((tmp_path / "run").rglob("last.ckpt")), weights_only=False)
    assert list(checkpoint["state_dict"]) == ["soft_prompt"]  # the frozen model is never saved
    assert checkpoint["state_dict"]["soft_prompt"].shape == (2, 3, 64)  # both encoders' widths, 32 + 32

    main(["generate", f"--model={tiny_sdxl}", f"--prompts={tmp_path / 'run' / 'prompts.jsonl'}",
          f"--out={tmp_path / 'gen'}", "--steps=2", "--images_per_prompt=2"])
    with Image.open(tmp_path / "gen" / "i0.png.png") as grid:
        assert grid.width >= 3 * grid.height  # the target and two generated images

    main(["reconstruct", f"--model.model={tiny_sdxl}", f"--data.prompts={tmp_path / 'run' / 'prompts.jsonl'}",
          "--model.steps=2", "--model.lpips_backbone=random", f"--trainer.default_root_dir={tmp_path / 'rec'}"])
    assert len(read_jsonl(tmp_path / "rec" / "reconstructions.jsonl")) == 2
