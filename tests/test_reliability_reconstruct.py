"""Nothing lost, round two, on the reading side: `ph2p reconstruct` and `ph2p evaluate` hold the run
folder's lock, keep every measure, name a bad prompts line in one line, never hang on a FIFO, read a
prompts file's images only inside a root, and say which settings their tables and means cover."""

import json
import os
import time

import lightning as L
import numpy as np
import pytest
from PIL import Image

from ph2p_lit import evaluation, report
from ph2p_lit.api import reconstruct
from ph2p_lit.callbacks import ResultsWriter
from ph2p_lit.data import ImageDataModule, PromptedImages
from ph2p_lit.errors import InputError
from ph2p_lit.evaluation import evaluate
from ph2p_lit.inversion import PromptInversion
from ph2p_lit.runs import RunLock, append_line, read_jsonl


def _folder(tmp_path, n=3, name="images"):
    root = tmp_path / name
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    return root


def _invert(tiny_model, root, run_dir):
    module = PromptInversion(model=tiny_model, prompt_length=2, steps=1, max_iter=1, local_files_only=True,
                             init_prompt=None)
    data = ImageDataModule(root=str(root), batch_size=3, steps=1, model=tiny_model)
    trainer = L.Trainer(default_root_dir=run_dir, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[ResultsWriter()])
    trainer.fit(module, datamodule=data)
    return run_dir / "prompts.jsonl"


def _prompts(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _reconstruct(tiny_model, prompts, run_dir, **model):
    return reconstruct(prompts, run_dir=run_dir, data={"batch_size": 3},
                       model={"model": tiny_model, "steps": 2, "lpips_backbone": "random", **model},
                       trainer={"enable_progress_bar": False})


EVALUATE = dict(images_per_prompt=1, steps=2, clip_model=None, bert_model=None, lpips_backbone="random",
                local_files_only=True, device="cpu")


# ---- 5: reconstruct holds the run folder's lock --------------------------------------------------

def test_a_second_reconstruct_on_a_busy_run_folder_stops_with_one_line(tiny_model, tmp_path):
    root = _folder(tmp_path)
    prompts = _prompts(tmp_path / "inv" / "prompts.jsonl", [
        {"image_id": f"img{i}.png", "source": str(root / f"img{i}.png"), "source_root": str(root),
         "prompt": "a red star"}
        for i in range(3)])
    run = tmp_path / "rec"
    run.mkdir()
    other = RunLock(run)
    other.acquire()  # a first reconstruct is writing there
    try:
        with pytest.raises(InputError, match="another run is writing to this run folder") as e:
            _reconstruct(tiny_model, prompts, run)
        assert "\n" not in str(e.value)
        assert not (run / "reconstructions.jsonl").exists() and not (run / "images").exists()
    finally:
        other.release()
    assert len(_reconstruct(tiny_model, prompts, run)) == 3  # once it is done, the folder is free again


# ---- 6: evaluate keeps other settings' measures; metrics.json says what it covers ----------------

def test_evaluate_with_other_settings_keeps_the_earlier_measures(tiny_model, tmp_path, monkeypatch):
    root = _folder(tmp_path)
    prompts = _prompts(tmp_path / "run" / "prompts.jsonl", [
        {"image_id": f"img{i}.png", "source": str(root / f"img{i}.png"), "source_root": str(root),
         "prompt": f"a red star {i}"} for i in range(3)])
    first = evaluate(str(prompts), model=tiny_model, **EVALUATE)
    (first_key,) = {r["settings"] for r in read_jsonl(prompts.parent / "metrics.jsonl")}
    assert first["images"] == 3

    # Other settings, killed after their first image: the first settings' measures are all kept,
    # and metrics.json still describes them (settings, key and count), not a mix.
    real, calls = evaluation.generate, []

    def killed_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(evaluation, "generate", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        evaluate(str(prompts), model=tiny_model, **dict(EVALUATE, seed=1))
    lines = read_jsonl(prompts.parent / "metrics.jsonl")
    assert len(lines) == 4 and [r["settings"] for r in lines].count(first_key) == 3
    summary = json.loads((prompts.parent / "metrics.json").read_text())
    assert summary["settings"]["seed"] == 0 and summary["images"] == 3 and summary["settings_key"] == first_key

    # Back to the first settings: nothing is measured again, and the means are the same.
    calls.clear()
    monkeypatch.setattr(evaluation, "generate", lambda *a, **k: pytest.fail("measured again"))
    again = evaluate(str(prompts), model=tiny_model, **EVALUATE)
    assert again["means"] == pytest.approx(first["means"])
    assert len(read_jsonl(prompts.parent / "metrics.jsonl")) == 4  # the other settings' line stays too


def test_evaluate_holds_the_run_folders_lock(tiny_model, tmp_path):
    root = _folder(tmp_path, n=1)
    prompts = _prompts(tmp_path / "run" / "prompts.jsonl", [
        {"image_id": "img0.png", "source": str(root / "img0.png"), "source_root": str(root), "prompt": "a"}])
    other = RunLock(prompts.parent)
    other.acquire()  # an invert (or another evaluate) is writing to that run folder
    try:
        with pytest.raises(InputError, match="another run is writing to this run folder"):
            evaluate(str(prompts), model=tiny_model, **EVALUATE)
        assert not (prompts.parent / "metrics.jsonl").exists()
    finally:
        other.release()


# ---- 10: no hang on a FIFO; a bad prompts line is one line naming the file, line and key ----------

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_source_is_a_failure_not_a_hang(tiny_model, tmp_path, no_hang):
    root = _folder(tmp_path, n=2)
    os.mkfifo(root / "pipe.png")
    rows = [{"image_id": name, "source": str(root / name), "source_root": str(root), "prompt": "a"}
            for name in ("img0.png", "pipe.png", "img1.png")]
    prompts = _prompts(tmp_path / "run" / "prompts.jsonl", rows)
    data = PromptedImages(prompts=str(prompts), resolution=8)
    with no_hang():
        data.setup()
    assert data.images.image_ids() == ["img0.png", "img1.png"]
    assert [f["image_id"] for f in data.failures] == ["pipe.png"] and "not a regular file" in data.failures[0]["error"]
    with no_hang():
        summary = evaluate(str(prompts), model=tiny_model, **EVALUATE)
    assert summary["images"] == 2 and [m["image_id"] for m in summary["missing"]] == ["pipe.png"]


BAD_LINES = [
    ({"image_id": 7, "prompt": "a"}, "image_id"),
    ({"image_id": "a\x00b.png", "prompt": "a"}, "image_id"),
    ({"image_id": "", "prompt": "a"}, "image_id"),
    ({"prompt": "a"}, "image_id"),
    ({"image_id": "b.png", "prompt": ["a", "b"]}, "prompt"),
    ({"image_id": "b.png", "prompt": None}, "prompt"),
    ({"image_id": "b.png", "prompt": "a", "edit": 3}, "edit"),
    ({"image_id": "b.png", "prompt": "a", "source": ["img0.png"]}, "source"),
    (["not", "an", "object"], "object"),
]


@pytest.mark.parametrize("line, key", BAD_LINES, ids=[f"{k}-{i}" for i, (_, k) in enumerate(BAD_LINES)])
def test_a_bad_prompts_line_is_one_line_naming_the_file_line_and_key(tmp_path, line, key):
    root = _folder(tmp_path, n=1)
    source = {"source": str(root / "img0.png"), "source_root": str(root)}
    good = {"image_id": "img0.png", "prompt": "a", **source}
    prompts = _prompts(tmp_path / "run" / "prompts.jsonl", [good, {**source, **line} if isinstance(line, dict) else line])
    with pytest.raises(InputError) as e:
        PromptedImages(prompts=str(prompts), resolution=8).setup()
    message = str(e.value)
    assert message.startswith(f"{prompts}: line 2") and key in message and "\n" not in message
    with pytest.raises(InputError) as e:  # evaluate reads the file the same way, before loading any model
        evaluate(str(prompts), model="no-such-model", **EVALUATE)
    assert str(e.value) == message


# ---- 12: a prompts file's images are read inside a root; `source` resolves from any folder -------

def test_sources_outside_the_root_are_refused_unless_the_user_states_a_root_that_holds_them(tiny_model, tmp_path):
    root = _folder(tmp_path, n=2)
    private = _folder(tmp_path, n=1, name="private")
    rows = [
        {"image_id": "img0.png", "source": "img0.png", "source_root": str(root), "prompt": "a"},
        {"image_id": "up.png", "source": "../private/img0.png", "source_root": str(root), "prompt": "a"},
        {"image_id": "abs.png", "source": str(private / "img0.png"), "source_root": str(root), "prompt": "a"},
        {"image_id": "bare.png", "source": str(private / "img0.png"), "prompt": "a"},  # no root: the file's folder
    ]
    prompts = _prompts(tmp_path / "run" / "prompts.jsonl", rows)
    data = PromptedImages(prompts=str(prompts), resolution=8)
    data.setup()
    assert data.images.image_ids() == ["img0.png"]
    refused = {f["image_id"]: f["error"] for f in data.failures}
    assert sorted(refused) == ["abs.png", "bare.png", "up.png"]
    assert all("outside" in why and "data.source_root" in why for why in refused.values())
    # evaluate's page shows no refused file either
    summary = evaluate(str(prompts), model=tiny_model, **EVALUATE)
    assert summary["images"] == 1 and "private" not in (prompts.parent / "report.html").read_text()

    # The user states a root that holds them: they are read (and only what is under it).
    data = PromptedImages(prompts=str(prompts), resolution=8, source_root=str(tmp_path))
    data.setup()
    assert data.images.image_ids() == ["abs.png", "bare.png", "img0.png", "up.png"]


def test_an_inverted_runs_sources_are_found_from_any_folder_and_after_a_move(tiny_model, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    _folder(work)
    monkeypatch.chdir(work)
    prompts = _invert(tiny_model, "images", work / "runs" / "inv")  # a relative data.root, as the README has it
    monkeypatch.chdir(tmp_path)  # reconstruct from another folder
    data = PromptedImages(prompts=str(prompts), resolution=8)
    data.setup()
    assert data.images.image_ids() == ["img0.png", "img1.png", "img2.png"] and data.failures == []
    # The images moved (a run folder and its images copied elsewhere): data.source_root says where.
    (work / "images").rename(tmp_path / "moved")
    data = PromptedImages(prompts=str(prompts), resolution=8, source_root=str(tmp_path / "moved"))
    data.setup()
    assert data.images.image_ids() == ["img0.png", "img1.png", "img2.png"]


# ---- README 3: the reconstruct table is this call's settings; an edit that matches nothing is said --

def test_the_table_shows_this_calls_settings_and_an_edit_that_matches_nothing_is_said(tiny_model, tmp_path, capsys):
    root = _folder(tmp_path)
    prompts = _prompts(tmp_path / "inv" / "prompts.jsonl", [
        {"image_id": f"img{i}.png", "source": str(root / f"img{i}.png"), "source_root": str(root),
         "prompt": "a red star" if i else "a blue circle"} for i in range(3)])
    run = tmp_path / "rec"
    _reconstruct(tiny_model, prompts, run)
    capsys.readouterr()
    rows = _reconstruct(tiny_model, prompts, run, negative="empty")
    table = capsys.readouterr().out
    assert len(rows) == 3 and all(r["negative"] == "empty" for r in rows)
    body = [line for line in table.splitlines() if line.startswith("img")]
    assert len(body) == 3  # not the first call's rows too
    means = [line for line in table.splitlines() if line.startswith("mean")]
    assert len(means) == 1 and "negative=empty" in means[0] and "negative=prompt" not in table
    assert f"{np.mean([r['psnr'] for r in rows]):.2f}" in means[0]

    edited = _reconstruct(tiny_model, prompts, run, edit="red->green")
    out = capsys.readouterr().out
    assert [r["edit_applied"] for r in edited] == [False, True, True]  # img0's prompt has no "red"
    assert [line for line in out.splitlines() if "matched no word" in line] == [
        "warning: the edit matched no word in 1 of 3 prompts (img0.png); those images are reconstructions, "
        "edit_applied: false in reconstructions.jsonl"]
    assert "edit red->green" in [line for line in out.splitlines() if line.startswith("mean")][0]


# ---- the report writes a thumbnail only when it is missing or older than its image --------------

def test_a_rerun_of_a_big_report_writes_no_thumbnail_again(tmp_path, monkeypatch):
    from types import SimpleNamespace

    root = _folder(tmp_path)
    for i in range(3):
        append_line(tmp_path / "prompts.jsonl", {"image_id": f"img{i}.png", "source": str(root / f"img{i}.png"),
                                                 "source_root": str(root), "prompt": "a"})
    monkeypatch.setattr(report, "EMBED_UP_TO", 2)
    backbone = SimpleNamespace(resolution=16)
    report.write_report(tmp_path, backbone, {}, images_per_prompt=0)
    thumbnails = sorted((tmp_path / "report" / "targets").iterdir())
    assert len(thumbnails) == 3
    written = {p: p.stat().st_mtime_ns for p in thumbnails}
    opened = []
    real_open = report.Image.open
    monkeypatch.setattr(report.Image, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    report.write_report(tmp_path, backbone, {}, images_per_prompt=0)
    assert opened == [] and {p: p.stat().st_mtime_ns for p in thumbnails} == written
    # A source changed since: its thumbnail (only) is made again.
    later = time.time() + 5
    os.utime(root / "img1.png", (later, later))
    report.write_report(tmp_path, backbone, {}, images_per_prompt=0)
    assert opened == [str(root / "img1.png")]
