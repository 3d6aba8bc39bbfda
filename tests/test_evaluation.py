"""`ph2p evaluate` and image similarity, with tiny randomly initialised CLIP and BERT models
saved in the Hugging Face layout, so the real `from_pretrained` loaders run offline."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer

from ph2p_lit import evaluation, report
from ph2p_lit.backbone import DEMO_MODEL
from ph2p_lit.errors import InputError
from ph2p_lit.evaluation import content_word_scores, evaluate
from ph2p_lit.runs import read_jsonl
from ph2p_lit.similarity import ClipSimilarity, OracleSimilarity

PH2P = [sys.executable, "-m", "ph2p_lit.cli"]
DEMO_IMAGES = Path(DEMO_MODEL).parent / "images"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert")
    words = "a an on the red green blue star circle square white gray background caption large small".split()
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    return str(path)


def _prompts(tmp_path: Path, image_folder: str, prompts: list[str]) -> Path:
    meta = read_jsonl(Path(image_folder) / "metadata.jsonl")
    path = tmp_path / "run" / "prompts.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"image_id": m["file_name"], "prompt": p, "caption": m["text"],
                                        "source": str(Path(image_folder) / m["file_name"]),
                                        "source_root": image_folder}) + "\n"
                            for m, p in zip(meta, prompts)))
    return path


def test_clip_similarity_is_one_for_the_same_image_and_less_otherwise(tiny_clip):
    clip = ClipSimilarity(tiny_clip, local_files_only=True)
    a, b = torch.rand(2, 3, 40, 40) * 2 - 1, torch.rand(2, 3, 40, 40) * 2 - 1
    assert torch.allclose(clip(a, a), torch.ones(2), atol=1e-5)
    assert (clip(a, b) < 0.9999).all()


def test_oracle_similarity_ranks_a_matching_render_above_a_different_one():
    from ph2p_lit.demo.train import to_tensor
    from ph2p_lit.demo.world import make_renders

    images, scenes = make_renders(40, seed=11)
    x = to_tensor(images)
    oracle = OracleSimilarity()
    same = [(i, j) for i in range(40) for j in range(i + 1, 40)
            if (scenes[i].colour, scenes[i].shape, scenes[i].background)
            == (scenes[j].colour, scenes[j].shape, scenes[j].background)]
    differ = [(i, j) for i in range(40) for j in range(i + 1, 40)
              if scenes[i].colour != scenes[j].colour and scenes[i].shape != scenes[j].shape][:50]
    assert differ
    sim_differ = oracle(x[[i for i, _ in differ]], x[[j for _, j in differ]])
    assert sim_differ.mean() < 0.5
    assert torch.allclose(oracle(x[:5], x[:5]), oracle(x[:5], x[:5]))
    if same:
        assert oracle(x[[i for i, _ in same]], x[[j for _, j in same]]).mean() > 0.8
    assert oracle(x[:10], x[:10]).mean() > 0.8


def test_content_words_precision_recall():
    scores = content_word_scores("red star red zebra", "a red star on a blue background")
    assert scores["word_precision"] == 1.0 and scores["word_recall"] == pytest.approx(2 / 3)
    assert content_word_scores("green circle", "a red star on a blue background")["word_f1"] == 0.0


def test_evaluate_writes_every_measure_and_resumes(tmp_path, tiny_model, image_folder, tiny_clip, tiny_bert,
                                                   monkeypatch, capsys):
    prompts = _prompts(tmp_path, image_folder, ["caption 0", "red star", "green circle"])
    kw = dict(model=tiny_model, images_per_prompt=2, steps=2, clip_model=tiny_clip, bert_model=tiny_bert,
              bert_layers=1, lpips_backbone="random", local_files_only=True, device="cpu")
    calls = []
    real_generate = evaluation.generate
    monkeypatch.setattr(evaluation, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    # The report shows the images that were measured; it never samples others.
    monkeypatch.setattr(report, "generate", lambda *a, **k: pytest.fail("the report generated images again"))

    summary = evaluate(str(prompts), **kw)
    rows = read_jsonl(prompts.parent / "metrics.jsonl")
    assert [r["image_id"] for r in rows] == ["img0.png", "img1.png", "img2.png"] and len(calls) == 3
    for key in ("clip_similarity", "lpips_to_target", "lpips_diversity", "bertscore_precision", "bertscore_f1"):
        assert key in summary["means"] and all(key in r for r in rows)
    # The means are the means of the per-image lines, and the measures tell the prompts apart.
    for key in ("clip_similarity", "lpips_to_target", "lpips_diversity"):
        assert summary["means"][key] == pytest.approx(np.mean([r[key] for r in rows]))
        assert len({round(r[key], 6) for r in rows}) > 1, key
    # The prompt equal to its caption scores BERTScore 1; the others less.
    assert rows[0]["bertscore_f1"] == pytest.approx(1.0, abs=1e-4)
    assert max(rows[1]["bertscore_f1"], rows[2]["bertscore_f1"]) < 0.999
    assert json.loads((prompts.parent / "metrics.json").read_text())["means"] == summary["means"]
    assert "| clip_similarity |" in capsys.readouterr().out
    assert "oracle_agreement" not in summary["means"]  # not the demo model
    for row in read_jsonl(prompts):
        assert report.grid_path(prompts.parent, row, 2, 2, 7.5, 0).is_file()

    # A run that died after two images: the rerun does only the third.
    lines = (prompts.parent / "metrics.jsonl").read_text().splitlines()
    (prompts.parent / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    calls.clear()
    assert evaluate(str(prompts), **kw)["means"] == pytest.approx(summary["means"])
    assert len(calls) == 1
    # Other settings: everything is measured again, and the first settings' lines are kept.
    calls.clear()
    evaluate(str(prompts), **dict(kw, seed=1))
    assert len(calls) == 3 and len(read_jsonl(prompts.parent / "metrics.jsonl")) == 6


def test_missing_weights_name_what_to_fetch(tmp_path, image_folder, tiny_model):
    prompts = _prompts(tmp_path, image_folder, ["a", "b", "c"])
    with pytest.raises(InputError, match=r"clip_model='no-such/clip'.*hf download no-such/clip"):
        evaluate(str(prompts), model=tiny_model, clip_model="no-such/clip", bert_model=None, local_files_only=True)
    with pytest.raises(InputError, match=r"bert_model='no-such/bert'"):
        evaluate(str(prompts), model=tiny_model, clip_model=None, bert_model="no-such/bert", local_files_only=True)
    with pytest.raises(InputError, match="prompts="):
        evaluate(str(tmp_path / "none.jsonl"))


def test_ph2p_evaluate_on_demo_prompts_prints_the_table_and_writes_json(tmp_path):
    meta = read_jsonl(DEMO_IMAGES / "metadata.jsonl")[:2]
    run = tmp_path / "run"
    run.mkdir()
    prompts = [meta[0]["text"], "zebra tuesday"]  # the true caption, and words of no attribute
    (run / "prompts.jsonl").write_text("".join(
        json.dumps({"image_id": m["file_name"], "prompt": p, "caption": m["text"],
                    "source": str(DEMO_IMAGES / m["file_name"]), "source_root": str(DEMO_IMAGES)}) + "\n"
        for m, p in zip(meta, prompts)))
    out = subprocess.run([*PH2P, "evaluate", "--config", "configs/evaluate_demo.yaml",
                          f"--prompts={run / 'prompts.jsonl'}", "--steps=20", "--images_per_prompt=2"],
                         capture_output=True, text=True, check=True).stdout
    summary = json.loads((run / "metrics.json").read_text())
    for key in ("lpips_to_target", "oracle_similarity", "word_f1", "oracle_agreement"):
        assert f"| {key} |" in out and key in summary["means"]
    rows = read_jsonl(run / "metrics.jsonl")
    assert rows[0]["word_f1"] == 1.0 and rows[1]["word_f1"] == 0.0
    assert rows[0]["oracle_agreement"] > rows[1]["oracle_agreement"]
    assert rows[0]["oracle_similarity"] > rows[1]["oracle_similarity"]
    page = (run / "report.html").read_text()  # the run's report, now with the measures
    assert "<td>oracle_agreement</td>" in page and all(m["file_name"] in page for m in meta)
    mean = summary["means"]["oracle_agreement"]
    assert f"<td>oracle_agreement</td><td>{mean:.3f}</td><td>higher is better</td>" in page  # the means, with the legend
    assert "<td>lpips_to_target</td>" in page and "lower is better" in page

    bad = subprocess.run([*PH2P, "evaluate", "--config", "configs/evaluate_demo.yaml", f"--prompts={run / 'prompts.jsonl'}",
                          "--clip_model=no-such/clip", "--local_files_only=true"], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("ph2p evaluate: error: clip_model=")


def test_evaluate_reports_prompt_perplexity_under_a_language_model(tmp_path, tiny_model, image_folder):
    from ph2p_lit.language_prior import LanguagePrior

    prompts = _prompts(tmp_path, image_folder, ["caption 0", "a red star on a white background", "green circle"])
    summary = evaluate(str(prompts), model=tiny_model, images_per_prompt=1, steps=2, clip_model=None, bert_model=None,
                       lpips_backbone="random", language_model="demo", local_files_only=True, device="cpu")
    rows = {r["prompt"]: r["prompt_perplexity"] for r in read_jsonl(prompts.parent / "metrics.jsonl")}
    expected = LanguagePrior.from_pretrained("demo").perplexity(list(rows))
    assert list(rows.values()) == pytest.approx(expected.tolist(), rel=1e-5)
    assert rows["a red star on a white background"] < 3 < rows["caption 0"]  # a caption of the world vs junk
    assert summary["means"]["prompt_perplexity"] == pytest.approx(float(expected.mean()), rel=1e-5)


def test_a_big_runs_report_links_thumbnails_and_targets_are_centre_cropped(tmp_path, monkeypatch):
    """Past EMBED_UP_TO images the page links files beside it (no base64 of thousands of images);
    a wide target is shown centre-cropped, as the model sees it, not squashed."""
    from types import SimpleNamespace

    from PIL import Image

    from ph2p_lit import report
    from ph2p_lit.runs import append_line

    wide = Image.new("RGB", (30, 10))
    for x, colour in ((0, (255, 0, 0)), (10, (0, 255, 0)), (20, (0, 0, 255))):
        wide.paste(colour, (x, 0, x + 10, 10))
    wide.save(tmp_path / "wide.png")
    for k in range(3):
        append_line(tmp_path / "prompts.jsonl", {"image_id": f"w{k}.png", "source": str(tmp_path / "wide.png"),
                                                 "prompt": "a green square", "seconds": 2.0, "unet_evals": 100})
    monkeypatch.setattr(report, "EMBED_UP_TO", 2)
    page = report.write_report(tmp_path, SimpleNamespace(resolution=16), {}, images_per_prompt=0).read_text()
    assert "data:image" not in page and page.count('src="report/targets/') == 3
    thumbnail = np.asarray(Image.open(tmp_path / "report" / "targets" / "w0.png.png"))  # a.png, a.jpg: no clash
    assert (thumbnail[..., 1] > 200).all() and (thumbnail[..., [0, 2]] < 60).all()  # only the green middle
    assert "6 s of inversion in all, 100 U-Net evaluations per image" in page
