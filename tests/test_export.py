"""`ph2p export`: each format read back by the tool that consumes it."""

import csv

import numpy as np
import pytest
from PIL import Image

from ph2p_lit.cli import main
from ph2p_lit.export import export
from ph2p_lit.runs import RunFolder

PROMPTS = {"a b.png": "a red circle, on «white»", "sub/ü.png": 'a "blue" square', "c.jpg": "a café"}


@pytest.fixture()
def run(tmp_path):
    """A run folder as `ph2p invert --data.root images` leaves it: one line on rank 0, one still in
    a rank file (a running DDP run), and a torn tail."""
    images = tmp_path / "images"
    for k, name in enumerate(PROMPTS):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(images / name)
    folder = RunFolder(tmp_path / "run")
    for rank, (name, prompt) in enumerate(PROMPTS.items()):
        row = {"image_id": name, "source": str(images / name), "source_root": str(images),
               "caption": f"caption {name}", "prompt": prompt}
        folder.append("prompts", row, rank=min(rank, 1))
    with open(folder.results_file("prompts"), "a") as f:
        f.write('{"image_id": "torn.png", "prom')  # a write cut by a kill: not an image yet
    return tmp_path


def test_txt_beside_each_image_keeps_a_users_caption_unless_told(run, capsys):
    images = run / "images"
    (images / "c.txt").write_text("my own caption\n")
    export(str(run / "run"), "txt")
    assert (images / "a b.txt").read_text(encoding="utf-8") == PROMPTS["a b.png"] + "\n"
    assert (images / "sub" / "ü.txt").read_text(encoding="utf-8") == PROMPTS["sub/ü.png"] + "\n"
    assert (images / "c.txt").read_text() == "my own caption\n"  # the user's, kept
    assert "1 existing caption files kept" in capsys.readouterr().out
    # A new prompt for a.png: the file an earlier export wrote is updated; the user's still kept.
    folder = RunFolder(run / "run")
    folder.append("prompts", {"image_id": "a b.png", "source": str(images / "a b.png"), "source_root": str(images),
                              "prompt": "a new prompt"})
    export(str(run / "run"), "txt")
    assert (images / "a b.txt").read_text() == "a new prompt\n" and (images / "c.txt").read_text() == "my own caption\n"
    export(str(run / "run"), "txt", overwrite=True)
    assert (images / "c.txt").read_text(encoding="utf-8") == "a café\n"


def test_txt_in_a_mirror_of_the_input_tree(run):
    export(str(run / "run"), "txt", out=str(run / "captions"))
    written = sorted(p.relative_to(run / "captions").as_posix() for p in (run / "captions").rglob("*.txt"))
    assert written == ["a b.txt", "c.txt", "sub/ü.txt"]
    assert not (run / "images" / "a b.txt").exists()  # the input tree is left alone


def test_imagefolder_loads_with_datasets(run):
    import datasets

    out = export(str(run / "run"), "imagefolder")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    got = {row["image_id"]: row["prompt"] for row in loaded}
    assert got == PROMPTS
    assert loaded[0]["image"].size == (8, 8)
    export(str(run / "run"), "imagefolder")  # a rerun changes nothing
    assert len((out / "metadata.jsonl").read_text(encoding="utf-8").splitlines()) == 3


def test_csv_reads_back_with_the_csv_module(run):
    main(["export", str(run / "run"), "--format", "csv"])
    with open(run / "run" / "prompts.csv", newline="", encoding="utf-8") as f:
        rows = {row["image_id"]: row for row in csv.DictReader(f)}
    assert {k: r["prompt"] for k, r in rows.items()} == PROMPTS
    assert rows["a b.png"]["caption"] == "caption a b.png"


def test_a_folder_without_prompts_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no prompts.jsonl here"):
        main(["export", str(tmp_path), "--format", "txt"])


def test_a_line_naming_a_file_outside_its_root_writes_nothing_there(run, capsys):
    """A prompts file from someone else cannot make export write beside any file it names."""
    outside = run / "elsewhere" / "x.png"
    outside.parent.mkdir()
    outside.write_bytes((run / "images" / "c.jpg").read_bytes())
    RunFolder(run / "run").append("prompts", {"image_id": "x.png", "source": "../elsewhere/x.png",
                                              "source_root": str(run / "images"), "prompt": "p"})
    export(str(run / "run"), "txt")
    assert not (run / "elsewhere" / "x.txt").exists() and (run / "images" / "c.txt").is_file()
    assert "1 images not found" in capsys.readouterr().out
    export(str(run / "run"), "txt", source_root=str(run))  # the user trusts it: a root that holds it
    assert (run / "elsewhere" / "x.txt").read_text() == "p\n"
