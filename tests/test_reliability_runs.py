"""A run's start and end on every rerun (the merge of rank files, the report, config.yaml), the
API's one result per input, a new image source's own run folder, a read-only run folder and a
full disk during a checkpoint save."""

import errno
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ph2p_lit import invert
from ph2p_lit.cli import main
from ph2p_lit.runs import RunLock, read_jsonl

REPORT = "{class_path: ph2p_lit.report.HTMLReport, init_args: {images_per_prompt: 0}}"


def _images(folder, n=3, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for name in names or [f"img{i}.png" for i in range(n)]:
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / name)
    return folder


def _cli(tiny_model, *extra, callbacks=f"[{REPORT}]"):
    """`ph2p invert` in this process with tiny settings; `extra` names the images and the run folder."""
    main(["invert", f"--model.model={tiny_model}", "--model.prompt_length=2", "--model.steps=2", "--model.max_iter=1",
          "--model.local_files_only=true", "--model.init_prompt=null", "--data.batch_size=3",
          "--trainer.enable_progress_bar=false", f"--trainer.callbacks={callbacks}", *extra])


# ---- item 2: a rerun that finds every image done still ends the run -------------------------

def test_a_rerun_with_every_image_done_merges_the_ranks_and_writes_the_missing_report(tiny_model, tmp_path):
    """A DDP run killed while rank 0 wrote the report: rank 1's lines unmerged, no report.html.
    The rerun has nothing to invert; it merges, writes the report, and says nothing of a
    zero-length DataLoader."""
    root, run = _images(tmp_path / "images"), tmp_path / "run"
    _cli(tiny_model, f"--data.root={root}", f"--trainer.default_root_dir={run}")
    lines = (run / "prompts.jsonl").read_text().splitlines(keepends=True)
    (run / "prompts.jsonl").write_text(lines[0])
    (run / "prompts.rank1.jsonl").write_text("".join(lines[1:]))
    (run / "report.html").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _cli(tiny_model, f"--data.root={root}", f"--trainer.default_root_dir={run}")
    assert (run / "prompts.jsonl").read_text() == "".join(lines)  # merged, nothing inverted again
    assert not (run / "prompts.rank1.jsonl").exists()
    report = (run / "report.html").read_text()
    assert all(f"<td>img{i}.png</td>" in report for i in range(3))
    assert not [str(w.message) for w in caught if "across ranks is zero" in str(w.message)]


def test_a_rerun_leaves_an_up_to_date_report_alone(tiny_model, tmp_path):
    """`ph2p evaluate` writes the report again with its measures; a rerun with nothing to do keeps it."""
    root, run = _images(tmp_path / "images", n=1), tmp_path / "run"
    _cli(tiny_model, f"--data.root={root}", f"--trainer.default_root_dir={run}")
    page = run / "report.html"
    page.write_text(page.read_text().replace("</h1>", "</h1><p>measures by evaluate</p>"))
    _cli(tiny_model, f"--data.root={root}", f"--trainer.default_root_dir={run}")
    assert "measures by evaluate" in page.read_text()
    append = {**read_jsonl(run / "prompts.jsonl")[0], "image_id": "other.png", "prompt": "another prompt"}
    (run / "prompts.jsonl").write_text((run / "prompts.jsonl").read_text() + json.dumps(append) + "\n")
    _cli(tiny_model, f"--data.root={root}", f"--trainer.default_root_dir={run}")
    assert "another prompt" in page.read_text()  # out of date: written again


# ---- item 7: config.yaml describes the prompts in the folder --------------------------------

def test_config_yaml_is_written_only_by_a_run_that_holds_the_folder_and_inverts(tiny_model, tmp_path):
    root, run = _images(tmp_path / "images", n=2), tmp_path / "run"
    run.mkdir()
    other = RunLock(run)
    other.acquire()  # another run is writing there
    try:
        with pytest.raises(SystemExit, match="another run is writing"):
            _cli(tiny_model, f"--data.root={root}", f"--trainer.default_root_dir={run}", "--model.lr=0.5")
        assert not (run / "config.yaml").exists()
    finally:
        other.release()
    _cli(tiny_model, f"--data.root={root}", f"--trainer.default_root_dir={run}", "--model.lr=0.5")
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["lr"] == 0.5
    _cli(tiny_model, f"--data.root={root}", f"--trainer.default_root_dir={run}", "--model.lr=0.25")  # all done
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["lr"] == 0.5
    _images(root, names=["new.png"])
    _cli(tiny_model, f"--data.root={root}", f"--trainer.default_root_dir={run}", "--model.lr=0.25")  # one to do
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["lr"] == 0.25


# ---- item 8: the Python API gives one result per input, in order -----------------------------

@pytest.fixture()
def config(tmp_path, tiny_model):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"model": tiny_model, "prompt_length": 2, "steps": 2, "max_iter": 1, "init_prompt": None,
                  "local_files_only": True},
        "data": {"root": str(_images(tmp_path / "config_images", n=1)), "batch_size": 2},
        "trainer": {"default_root_dir": str(tmp_path / "runs" / "tiny"), "enable_progress_bar": False,
                    "callbacks": []},
    }))
    return str(path)


def test_invert_gives_an_unreadable_input_its_own_place(config, tmp_path):
    root = _images(tmp_path / "mine", n=2)
    (root / "bad.png").write_bytes(b"not a png")
    files = [root / "img0.png", root / "bad.png", root / "img1.png"]
    rows = invert(files, config=config, run_dir=tmp_path / "run")
    assert len(rows) == 3
    assert rows[0]["source"] == str(files[0]) and rows[2]["source"] == str(files[2])
    assert rows[1]["source"] == str(files[1]) and "error" in rows[1] and "prompt" not in rows[1]
    assert [r["source"] for r in invert(files[::-1], config=config, run_dir=tmp_path / "run")] == \
        [str(f) for f in files[::-1]]  # again, done: the same lines in the new order


def test_invert_of_a_folder_returns_that_folders_images_only(config, tmp_path):
    run = tmp_path / "run"
    invert([_images(tmp_path / "first", n=1, names=["x.png"]) / "x.png"], config=config, run_dir=run)
    second = _images(tmp_path / "second", n=2)
    rows = invert(second, config=config, run_dir=run)
    assert [r["image_id"] for r in rows] == ["img0.png", "img1.png"]
    assert len(read_jsonl(run / "prompts.jsonl")) == 3


# ---- README item 1: another image source gets its own run folder ----------------------------

def test_another_image_source_gets_its_own_run_folder(config, tiny_model, tmp_path, capsys):
    """`--config X --data.root my_images/` does not append to X's run folder, rewrite its
    config.yaml, or take a new image for done because a config image has its file name."""
    demo = tmp_path / "runs" / "tiny"
    main(["invert", f"--config={config}"])
    before = {p.name: p.read_bytes() for p in demo.iterdir() if p.is_file() and p.name != "run.lock"}
    mine = _images(tmp_path / "my_images", n=1)  # img0.png, as the config's own image is named
    main(["invert", f"--config={config}", "--data.root", f"{mine}/"])
    assert {p.name: p.read_bytes() for p in demo.iterdir() if p.is_file() and p.name != "run.lock"} == before
    own = tmp_path / "runs" / "tiny-my_images"
    assert [r["source"] for r in read_jsonl(own / "prompts.jsonl")] == [str(mine / "img0.png")]
    assert f"1 prompts in {own / 'prompts.jsonl'}" in capsys.readouterr().out
    assert yaml.safe_load((own / "config.yaml").read_text())["data"]["root"] == f"{mine}/"
    with pytest.raises(SystemExit):  # the config it would run with says so too
        main(["invert", f"--config={config}", "--data.root", f"{mine}/", "--print_config"])
    assert f"default_root_dir: {own}\n" in capsys.readouterr().out
    # The API too; and a run folder the user names is used as named.
    assert invert(mine, config=config)[0]["source"] == str(mine / "img0.png")
    assert len(read_jsonl(own / "prompts.jsonl")) == 1
    main(["invert", f"--config={config}", f"--data.files=[{mine / 'img0.png'}]", f"--trainer.default_root_dir={demo}"])
    assert len(read_jsonl(demo / "prompts.jsonl")) == 2


def test_the_configs_own_source_keeps_the_configs_run_folder(config, tmp_path):
    source = yaml.safe_load(open(config))["data"]["root"]
    main(["invert", f"--config={config}", f"--data.root={source}"])
    assert (tmp_path / "runs" / "tiny" / "prompts.jsonl").is_file()
    assert not (tmp_path / "runs" / "tiny-config_images").exists()


# ---- item 10: a read-only run folder, a full disk during a checkpoint -----------------------

def test_a_read_only_run_folder_is_one_line_naming_it(tiny_model, tmp_path, monkeypatch):
    root, run = _images(tmp_path / "images", n=1), tmp_path / "run"
    run.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kw):  # chmod does not stop root: refuse as a read-only mount would
        if str(path).startswith(str(run)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(SystemExit) as e:
        _cli(tiny_model, f"--data.root={root}", f"--trainer.default_root_dir={run}")
    assert str(run) in str(e.value.code) and "not writable" in str(e.value.code) and "\n" not in str(e.value.code)


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_keeps_the_last_checkpoint(tiny_model, tmp_path,
                                                                                          monkeypatch):
    """The disk fills half-way through the third checkpoint file. (Checked on a full 40 KB tmpfs
    too: Lightning's own save left a 4096-byte .ckpt and a traceback.)"""
    root, run = _images(tmp_path / "images", n=2), tmp_path / "run"
    real_write, saves = Path.write_bytes, []

    def disk_full_on_third_checkpoint(self, data):
        if ".ckpt" in self.name:
            saves.append(self.name)
            if len(saves) == 3:
                real_write(self, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", disk_full_on_third_checkpoint)
    with pytest.raises(SystemExit) as e:
        _cli(tiny_model, f"--data.root={root}", f"--trainer.default_root_dir={run}", "--data.batch_size=1",
             "--trainer.enable_checkpointing=true",
             callbacks="[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, "
                       "init_args: {every_n_train_steps: 1, save_last: true, save_top_k: 0}}]")
    message = str(e.value.code)
    assert "last.ckpt: cannot write (No space left on device)" in message and "\n" not in message
    checkpoints = [p for p in run.rglob("*") if p.is_file() and "ckpt" in p.name]
    assert [p.name for p in checkpoints] == ["last.ckpt"]  # no half file, no temporary beside it
    assert torch.load(checkpoints[0], weights_only=False)["global_step"] == 2  # the second save, whole
