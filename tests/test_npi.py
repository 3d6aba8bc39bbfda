"""Negative-prompt inversion, editing, attention maps and generation."""

import html
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ph2p_lit.attention import CrossAttentionRecorder, prompt_tokens, token_attention
from ph2p_lit.backbone import Backbone
from ph2p_lit.demo.train import to_tensor
from ph2p_lit.demo.world import make_renders
from ph2p_lit.errors import InputError
from ph2p_lit.npi import apply_edit, ddim_invert, reconstruct
from ph2p_lit.runs import read_jsonl

PH2P = [sys.executable, "-m", "ph2p_lit.cli"]


@pytest.fixture(scope="module")
def demo():
    return Backbone.from_pretrained("demo", local_files_only=True)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return Backbone.from_pretrained(tiny_model, local_files_only=True)


def test_edits_substitute_whole_words_at_once():
    assert apply_edit("a red star, reddish red", "red->green") == "a green star, reddish green"
    assert apply_edit("red square on blue", "red->blue, blue->red") == "blue square on red"
    assert apply_edit("anything", "a photo of a cat") == "a photo of a cat"
    with pytest.raises(InputError, match="old->new"):
        apply_edit("x", "->green")


def test_npi_ignores_guidance_and_equals_the_baseline_at_guidance_one(tiny):
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn((2, *tiny.latent_shape), generator=g)
    source, empty = tiny.encode_text(["a red star", "a blue circle"]), tiny.encode_text(["", ""])
    npi = reconstruct(tiny, x_T, source, guidance=7.5, steps=5)
    assert torch.allclose(npi, reconstruct(tiny, x_T, source, guidance=1.0, steps=5), atol=1e-5)
    assert torch.allclose(npi, reconstruct(tiny, x_T, source, negative=empty, guidance=1.0, steps=5), atol=1e-5)
    baseline = reconstruct(tiny, x_T, source, negative=empty, guidance=7.5, steps=5)
    assert not torch.allclose(npi, baseline, atol=1e-3)


def test_npi_rebuilds_demo_images_better_than_the_empty_negative(demo):
    images, scenes = make_renders(4, seed=97)
    targets = to_tensor(images)
    latents = demo.encode_images(targets)
    cond = demo.encode_text([s.caption for s in scenes])
    x_T = ddim_invert(demo, latents, cond, steps=20)

    def psnr(latents_out):
        mse = ((demo.decode_latents(latents_out) - targets) / 2).pow(2).flatten(1).mean(1)
        return float((-10 * torch.log10(mse)).mean())

    npi = psnr(reconstruct(demo, x_T, cond, guidance=7.5, steps=20))
    baseline = psnr(reconstruct(demo, x_T, cond, negative=demo.encode_text([""] * 4), guidance=7.5, steps=20))
    vae_ceiling = psnr(latents)
    assert npi > baseline + 3 and npi > vae_ceiling - 2


def test_recorder_leaves_the_unet_output_unchanged_and_keeps_probabilities(tiny):
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, *tiny.latent_shape), generator=g)
    t = torch.tensor([300, 700])
    hidden = tiny.encode_text(["a red star", "a cat"])
    with torch.no_grad():
        plain = tiny.unet(x, t, hidden).sample
        recorder = CrossAttentionRecorder()
        tiny.unet.set_attn_processor(recorder)
        try:
            recorded = tiny.unet(x, t, hidden).sample
        finally:
            from diffusers.models.attention_processor import AttnProcessor2_0

            tiny.unet.set_attn_processor(AttnProcessor2_0())
    assert torch.allclose(plain, recorded, atol=1e-5)
    assert recorder.maps and all(torch.allclose(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-5) for m in recorder.maps)
    maps = token_attention(tiny, tiny.encode_images(torch.zeros(2, 3, 16, 16)), hidden, 100, 900, 3)
    assert maps.shape == (2, tiny.max_length, tiny.resolution, tiny.resolution)
    assert torch.allclose(maps.sum(1), torch.ones(2, tiny.resolution, tiny.resolution), atol=1e-4)
    assert [t for _, t in prompt_tokens(tiny, "a red star")] == ["a", "red", "star"]


def test_shape_word_attends_to_the_object_more_than_the_background_word(demo):
    from ph2p_lit.demo.evaluate import attention_iou

    rows = attention_iou(demo, n=8, seed=96, t_min=100, t_max=900, n_timesteps=4)
    assert np.mean([r["shape"] for r in rows]) > np.mean([r["background"] for r in rows])


def _invert(tiny_model, image_folder, run_dir):
    args = ["invert", f"--model.model={tiny_model}", "--model.prompt_length=3", "--model.steps=2",
            "--model.max_iter=1", f"--data.root={image_folder}", "--data.limit=3", f"--trainer.default_root_dir={run_dir}"]
    result = subprocess.run(PH2P + args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir / "prompts.jsonl"


@pytest.mark.slow
def test_reconstruct_writes_one_line_per_image_resumes_and_reuses_inverted_latents(tiny_model, image_folder, tmp_path):
    prompts = _invert(tiny_model, image_folder, tmp_path / "inv")
    base = ["reconstruct", f"--model.model={tiny_model}", "--model.steps=4", "--model.lpips_backbone=random",
            f"--data.prompts={prompts}", "--data.batch_size=2"]

    def run(out, *extra):
        result = subprocess.run(PH2P + base + [f"--trainer.default_root_dir={out}", *extra],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    stdout = run(tmp_path / "rec", "--model.attention_maps=true")
    rows = read_jsonl(tmp_path / "rec" / "reconstructions.jsonl")
    assert sorted(r["image_id"] for r in rows) == ["img0.png", "img1.png", "img2.png"]
    assert all(r["prompt"] == r["source_prompt"] for r in rows)
    for r in rows:  # the PSNR reported is the one between the two images written (to their 8-bit rounding)
        result = np.asarray(Image.open(tmp_path / "rec" / r["image"]), dtype=np.float64)
        target = np.asarray(Image.open(tmp_path / "rec" / r["target"]), dtype=np.float64)
        psnr = 10 * np.log10(255.0**2 / np.mean((result - target) ** 2))
        assert r["psnr"] == pytest.approx(psnr, abs=0.3)
    assert not any(r["cached_inversion"] for r in rows) and "mean" in stdout
    for r in rows:
        assert Image.open(tmp_path / "rec" / r["image"]).size == (16, 16)
        assert Image.open(tmp_path / "rec" / r["target"]).size == (16, 16)
        arrays = np.load((tmp_path / "rec" / r["image"].replace("images/", "attention/")).with_suffix(".npz"))
        assert arrays["maps"].shape == (len(arrays["tokens"]), 16, 16)
    page = (tmp_path / "rec" / "reconstruct.html").read_text()
    assert all(r["image"] in page and r["target"] in page for r in rows)
    stdout = run(tmp_path / "rec")  # again: every image is done with these settings, nothing is added
    assert len(read_jsonl(tmp_path / "rec" / "reconstructions.jsonl")) == 3
    assert "3 of 3 images already done with these settings" in stdout

    # The README's next line, in the same run folder: an edit is new work, not "done".
    source = read_jsonl(prompts)[0]["prompt"].split()[0]
    run(tmp_path / "rec", f"--model.edit={source}->zebra")
    rows = read_jsonl(tmp_path / "rec" / "reconstructions.jsonl")
    edits = [r for r in rows if r["edit"]]
    assert len(rows) == 6 and len(edits) == 3
    assert all(r["cached_inversion"] for r in edits)  # the first run's inversions were reused
    assert any("zebra" in r["prompt"] and r["prompt"] != r["source_prompt"] for r in edits)
    run(tmp_path / "rec", "--model.negative=empty")  # the baseline, too
    rows = read_jsonl(tmp_path / "rec" / "reconstructions.jsonl")
    assert [r["negative"] for r in rows].count("empty") == 3
    assert len({r["image"] for r in rows}) == 9  # each setting keeps its own result files


def test_reconstruct_without_lpips_weights_names_them(tiny_model, image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    line = {"image_id": "a", "source": f"{image_folder}/img0.png", "prompt": "x"}
    (tmp_path / "p.jsonl").write_text(json.dumps(line) + "\n")
    result = subprocess.run(PH2P + ["reconstruct", f"--model.model={tiny_model}", f"--data.prompts={tmp_path / 'p.jsonl'}",
                                    f"--trainer.default_root_dir={tmp_path / 'r'}"], capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "alexnet-owt-7be5be79.pth" in result.stderr and "lpips_backbone=random" in result.stderr


@pytest.mark.slow
def test_generate_writes_a_grid_per_prompt_with_the_target_first(tiny_model, image_folder, tmp_path):
    prompts = _invert(tiny_model, image_folder, tmp_path / "inv")
    args = ["generate", f"--prompts={prompts}", f"--model={tiny_model}", "--images_per_prompt=3", "--steps=3",
            f"--out={tmp_path / 'gen'}"]
    result = subprocess.run(PH2P + args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    grids = sorted((tmp_path / "gen").glob("*.png"))
    assert [g.name for g in grids] == ["img0.png.png", "img1.png.png", "img2.png.png"]
    grid = np.asarray(Image.open(grids[0]))
    assert grid.shape == (128, 4 * 128, 3)  # target + 3 seeds, 16 px scaled to 128
    tiles = grid.reshape(128, 4, 128, 3).transpose(1, 0, 2, 3)
    assert not np.array_equal(tiles[1], tiles[2])  # different seeds, different images
    target = np.asarray(Image.open(f"{image_folder}/img0.png").convert("RGB").resize((16, 16), Image.Resampling.BICUBIC))
    assert np.array_equal(tiles[0][::8, ::8], target)

    # Other settings are new work: the grids are made again (was: skipped, the old grids stayed).
    again = subprocess.run(PH2P + args[:-3] + ["--seed=5", "--images_per_prompt=2", "--steps=3", f"--out={tmp_path / 'gen'}"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    regrid = np.asarray(Image.open(grids[0]))
    assert regrid.shape == (128, 3 * 128, 3) and not np.array_equal(regrid[:, 128:256], grid[:, 128:256])
    same = subprocess.run(PH2P + args[:-3] + ["--seed=5", "--images_per_prompt=2", "--steps=3", f"--out={tmp_path / 'gen'}"],
                          capture_output=True, text=True, timeout=600)
    assert "3 of 3 prompts already have a grid with these settings" in same.stdout


def test_compose_chains_concepts_into_one_html_page(tiny_model, image_folder, tmp_path, capsys):
    from ph2p_lit.compose import compose

    config = tmp_path / "invert.yaml"
    config.write_text(f"model:\n  model: {tiny_model}\n  prompt_length: 2\n  steps: 2\n  max_iter: 1\n")
    concepts = [f"{image_folder}/img{i}.png" for i in range(3)]
    page = compose(concepts, out=str(tmp_path / "c"), config=str(config), images_per_prompt=2, steps=2)
    printed = capsys.readouterr().out
    assert "compose: stage 2 of 2" in printed and " prompts in " not in printed  # its own progress, no inversion tables
    text = page.read_text()
    concept_prompts = [r["prompt"] for r in read_jsonl(tmp_path / "c" / "concepts" / "prompts.jsonl")]
    evolved = [read_jsonl(tmp_path / "c" / f"stage{n}" / "inverted" / "prompts.jsonl")[0]["prompt"] for n in (1, 2)]
    assert text.count("<section>") == 2 and text.count("data:image/png;base64,") == 2 * (2 + 2)
    assert html.escape(f"{concept_prompts[0]} {concept_prompts[1]}") in text  # stage 1 joins A and B
    assert html.escape(f"{evolved[0]} {concept_prompts[2]}") in text  # stage 2: the evolved prompt and C
    with pytest.raises(InputError, match="two or more"):
        compose(concepts[:1], out=str(tmp_path / "d"), config=str(config))


def test_reconstruct_folds_another_ranks_lines_into_one_file(tiny_model, image_folder, tmp_path):
    """A DDP run's reconstructions.rank1.jsonl reaches reconstructions.jsonl (it stayed apart before)."""
    from ph2p_lit.runs import append_line

    prompts = _invert(tiny_model, image_folder, tmp_path / "inv")
    out = tmp_path / "rec"
    out.mkdir()
    append_line(out / "reconstructions.rank1.jsonl", {"image_id": "from_rank1.png", "settings": "x", "psnr": 1.0,
                                                      "lpips": 0.5, "seconds": 1.0, "prompt": "p", "negative": "prompt",
                                                      "guidance": 7.5, "steps": 2})
    result = subprocess.run(PH2P + ["reconstruct", f"--model.model={tiny_model}", "--model.steps=2",
                                    "--model.lpips_backbone=random", f"--data.prompts={prompts}",
                                    f"--trainer.default_root_dir={out}"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    ids = [r["image_id"] for r in read_jsonl(out / "reconstructions.jsonl")]
    assert "from_rank1.png" in ids and len(ids) == 4 and not (out / "reconstructions.rank1.jsonl").exists()


def test_loading_lpips_leaves_the_callers_random_stream_alone():
    from ph2p_lit.reconstruction import load_lpips

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_lpips("alex", "random")
    assert torch.equal(torch.rand(3), expected)
