"""Hostile inputs (issue 28): captions that are not text, files listed twice, a last line without
its newline, negative settings, control characters on the terminal, pipes, BOMs, pixel bombs."""

import json
import os
import struct
import zlib

import lightning as L
import numpy as np
import pytest
from PIL import Image

from ph2p_lit.callbacks import ResultsWriter
from ph2p_lit.data import ImageDataModule, PromptedImages
from ph2p_lit.errors import InputError
from ph2p_lit.inversion import PromptInversion
from ph2p_lit.refine import Refinement
from ph2p_lit.runs import RunFolder, append_line, read_jsonl


def _folder(tmp_path, names=("a.png", "b.png", "c.png")):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / name)
    return root


def _metadata(root, *rows):
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def _setup(**data_kw):
    data = ImageDataModule(resolution=16, **data_kw)
    data.setup()
    return data


# ---- 1. captions that are not text; a file_name that is not a name -------------------------------

def test_a_number_caption_is_its_text_and_null_is_no_caption(tmp_path):
    root = _folder(tmp_path)
    (root / "c.txt").write_text("from the text file")
    _metadata(root, {"file_name": "a.png", "text": 2024}, {"file_name": "b.png", "caption": 1.5},
              {"file_name": "c.png", "text": None})
    captions = {item["image_id"]: item["caption"] for item in _setup(root=str(root)).images.items}
    assert captions == {"a.png": "2024", "b.png": "1.5", "c.png": "from the text file"}


@pytest.mark.parametrize("value, kind", [({"x": 1}, "an object"), (["a", "b"], "a list"), (True, "true")])
def test_a_caption_that_is_not_text_is_one_line_naming_the_line(tmp_path, value, kind):
    root = _folder(tmp_path)
    _metadata(root, {"file_name": "a.png", "text": "fine"}, {"file_name": "b.png", "text": value})
    with pytest.raises(InputError, match=f"metadata.jsonl: line 2: text is {kind}, not a caption") as e:
        _setup(root=str(root))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value", [["a.png"], 3, None])
def test_a_file_name_that_is_not_a_name_is_one_line_naming_the_line(tmp_path, value):
    root = _folder(tmp_path)
    _metadata(root, {"file_name": "a.png", "text": "fine"}, {"file_name": value, "text": "x"})
    with pytest.raises(InputError, match="metadata.jsonl: line 2: file_name must be a file name"):
        _setup(root=str(root))


def test_a_number_caption_no_longer_stops_the_run_after_its_image(tiny_model, tmp_path):
    """The issue's case: batch of one, the caption 2024 collated to a tensor, its line unwritable."""
    root = _folder(tmp_path, ("a.png", "b.png"))
    _metadata(root, {"file_name": "a.png", "text": 2024})
    module = PromptInversion(model=tiny_model, prompt_length=2, steps=1, max_iter=1, local_files_only=True,
                             init_prompt=None)
    data = ImageDataModule(root=str(root), batch_size=1, model=tiny_model)
    trainer = L.Trainer(default_root_dir=tmp_path / "run", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[ResultsWriter()])
    trainer.fit(module, datamodule=data)
    rows = {r["image_id"]: r for r in read_jsonl(tmp_path / "run" / "prompts.jsonl")}
    assert sorted(rows) == ["a.png", "b.png"] and rows["a.png"]["caption"] == "2024"


def test_a_dataset_caption_column_of_numbers_is_text_and_of_objects_is_one_line(tmp_path):
    root = _folder(tmp_path, ("a.png",))
    _metadata(root, {"file_name": "a.png", "text": 2024})
    assert _setup(dataset=str(root)).images[0]["caption"] == "2024"
    _metadata(root, {"file_name": "a.png", "text": {"x": 1}})
    with pytest.raises(InputError, match="data.caption_column='text': in .* it holds dict values, not text"):
        _setup(dataset=str(root))


def test_a_metadata_file_with_a_byte_order_mark_is_read(tmp_path):
    root = _folder(tmp_path)
    (root / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"file_name": "a.png", "text": "a red star"}\n')
    captions = {item["image_id"]: item["caption"] for item in _setup(root=str(root)).images.items}
    assert captions["a.png"] == "a red star"


# ---- 3. a complete last line without its newline ---------------------------------------------------

def test_a_whole_last_line_without_newline_is_kept_and_a_torn_one_is_cut(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"image_id": "a"}\n{"image_id": "b", "prompt": "x"}')  # "\n".join(lines): no final newline
    run = RunFolder(tmp_path)
    assert run.done_keys("prompts") == {("a", None), ("b", None)}  # reading counts b as done ...
    run.append("prompts", {"image_id": "c"})  # ... so appending must keep it
    assert run.done_keys("prompts") == {("a", None), ("b", None), ("c", None)}
    assert path.read_text() == '{"image_id": "a"}\n{"image_id": "b", "prompt": "x"}\n{"image_id": "c"}\n'
    with open(path, "a") as f:
        f.write('{"image_id": "d", "pro')  # a crash mid-line: not done, and cut
    assert ("d", None) not in run.done_keys("prompts")
    append_line(path, {"image_id": "e"})
    assert [r["image_id"] for r in read_jsonl(path)] == ["a", "b", "c", "e"]


# ---- 4. the same image listed twice ------------------------------------------------------------------

def test_the_same_file_listed_twice_is_inverted_once(tmp_path, monkeypatch, caplog):
    _folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link.png").symlink_to(tmp_path / "images" / "a.png")
    files = ["images/a.png", "./images/a.png", "images/b.png", str(tmp_path / "images" / "a.png"), "link.png",
             "images/../images/b.png"]
    data = _setup(files=files)
    assert data.images.image_ids() == ["images/a.png", "images/b.png"]  # the first of each kept
    assert "4 listed image(s) repeat a file listed before (first: images/a.png is images/a.png)" in caplog.text


# ---- 9. settings out of range ------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, expected", [
    ("lr", -1.0, "must be above 0"), ("lr", 0.0, "must be above 0"), ("lr", float("nan"), "must be above 0"),
    ("patience", -1, "must be at least 0"), ("min_delta", -0.5, "must be at least 0"),
    ("history_size", 0, "must be at least 1"), ("max_step", -0.5, "must be above 0"),
    ("negative_weight", -1.0, "must be at least 0"), ("negative_margin", -0.1, "must be at least 0"),
    ("t_min", -5, "must be at least 0"), ("t_max", 0, "must be at least 1"), ("t_min", 900, "the timestep window .* is empty"),
])
def test_model_settings_out_of_range_are_one_line_naming_the_key(key, value, expected):
    with pytest.raises(InputError, match=f"model.{key}=.*: {expected}"):
        PromptInversion(**{key: value})


@pytest.mark.parametrize("key, value, expected", [
    ("draws", 0, "at least 1"), ("screen_draws", -1, "at least 1"), ("budget", -10, "at least 0"),
    ("min_gain", -0.1, "at least 0"), ("prior_weight", -1.0, "at least 0"), ("beams", -1, "at least 0"),
    ("prior_min_prob", 1.5, "at most 1"),
])
def test_refinement_settings_out_of_range_are_one_line_naming_the_key(key, value, expected):
    with pytest.raises(InputError, match=f"model.refinement.{key}=.*{expected}"):
        Refinement(**{key: value})


@pytest.mark.parametrize("key, value, expected", [
    ("limit", -1, "must be at least 1"), ("limit", 0, "must be at least 1"), ("resolution", 0, "must be at least 1"),
    ("num_workers", -1, "must be at least 0"), ("max_pixels", 0, "must be at least 1"),
])
def test_data_settings_out_of_range_are_one_line_naming_the_key(tmp_path, key, value, expected):
    with pytest.raises(InputError, match=f"data.{key}={value}: {expected}"):
        ImageDataModule(root=str(tmp_path), **{key: value})
    with pytest.raises(InputError, match=f"data.{key}={value}: {expected}"):
        PromptedImages(prompt="a red star", root=str(tmp_path), **{key: value})


@pytest.mark.parametrize("setting, expected", [
    ("--data.limit=-1", "data.limit=-1: must be at least 1"),
    ("--model.refinement.draws=0", "model.refinement.draws=0: must be at least 1"),  # a dataclass in `X | None`
])
def test_a_setting_out_of_range_on_the_command_line_is_one_line(tmp_path, setting, expected):
    from ph2p_lit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["invert", "--config", "configs/demo.yaml", f"--data.root={_folder(tmp_path)}", "--model.steps=1",
              "--model.refinement.budget=10", setting, f"--trainer.default_root_dir={tmp_path / 'run'}"])
    assert expected in str(e.value.code) and "\n" not in str(e.value.code)
    assert not (tmp_path / "run" / "prompts.jsonl").exists()


# ---- 11. control characters on the terminal -----------------------------------------------------

HOSTILE = "a\x1b]0;owned\x07b\x1b[2Jc\x9b31md\x7fe\x00f\u202eg\nh\ti"


def _control_characters(text: str) -> list[str]:
    return [ch for ch in text if (ord(ch) < 32 and ch != "\n") or 0x7f <= ord(ch) <= 0x9f or ch == "\u202e"]


def test_one_line_shows_every_control_character_as_an_escape():
    from ph2p_lit.terminal import one_line

    shown = one_line(HOSTILE)
    assert _control_characters(shown) == [] and "\n" not in shown
    assert shown == "a\\x1b]0;owned\\x07b\\x1b[2Jc\\x9b31md\\x7fe\\x00f\\u202eg\\nh\\ti"
    assert one_line("un café, 東京 🙂") == "un café, 東京 🙂"  # printable text is left alone


def test_the_invert_and_reconstruct_tables_print_no_control_character(tmp_path, capsys):
    from ph2p_lit.lightning_cli import print_table
    from ph2p_lit.reconstruction import print_reconstructions

    append_line(tmp_path / "prompts.jsonl", {"image_id": HOSTILE + ".png", "caption": HOSTILE, "prompt": HOSTILE})
    print_table(tmp_path)
    append_line(tmp_path / "reconstructions.jsonl", {
        "image_id": HOSTILE + ".png", "prompt": HOSTILE, "psnr": 20.0, "lpips": 0.1, "seconds": 1.0,
        "negative": "prompt", "guidance": 1.0, "steps": 2})
    print_reconstructions(tmp_path)
    out = capsys.readouterr().out
    assert _control_characters(out) == [] and out.count("\\x1b]0;owned") == 5


def test_an_error_naming_a_hostile_file_prints_no_control_character():
    message = str(InputError(f"data.negatives=x: no negative image for {HOSTILE}"))
    assert _control_characters(message) == [] and "\n" not in message


# ---- also: pipes, pixel bombs ------------------------------------------------------------------------

def test_a_named_pipe_is_listed_as_one_and_never_opened(tmp_path, no_hang):
    root = _folder(tmp_path, ("a.png",))
    os.mkfifo(root / "pipe.png")
    with no_hang():
        folder = _setup(root=str(root))
        listed = _setup(files=[str(root / "a.png"), str(root / "pipe.png")])
    assert folder.images.image_ids() == ["a.png"] and listed.images.image_ids() == [str(root / "a.png")]
    for data in (folder, listed):
        assert [f["error"] for f in data.failures] == ["a named pipe (FIFO), not an image file"]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height 8-bit grey pixels and holds one row of them: tiny on
    disk, hundreds of megabytes once decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1)))
            + chunk(b"IEND", b""))


def test_an_image_over_the_pixel_budget_is_a_failure_not_decoded(tmp_path):
    root = _folder(tmp_path, ("a.png",))
    (root / "bomb.png").write_bytes(_png_header_only(13_300, 13_300))
    data = _setup(root=str(root))
    assert data.images.image_ids() == ["a.png"]
    (failure,) = data.failures
    assert failure["image_id"] == "bomb.png"
    assert failure["error"] == ("13300x13300 pixels (176,890,000) is more than data.max_pixels=100,000,000; "
                                "raise data.max_pixels to read it")


def test_the_pixel_budget_is_a_setting(tmp_path):
    root = _folder(tmp_path, ("a.png",))
    Image.new("RGB", (40, 30)).save(root / "big.png")
    data = _setup(root=str(root), max_pixels=16 * 16)
    assert data.images.image_ids() == ["a.png"] and "more than data.max_pixels=256" in data.failures[0]["error"]
    assert _setup(root=str(root), max_pixels=40 * 30).images.image_ids() == ["a.png", "big.png"]
