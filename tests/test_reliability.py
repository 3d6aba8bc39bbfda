"""Nothing lost: damaged images, torn lines, a full disk, other ranks' files, missing images."""

import errno
import io
import json
import shutil

import lightning as L
import numpy as np
import pytest
from PIL import Image

from ph2p_lit import runs
from ph2p_lit.callbacks import ResultsWriter
from ph2p_lit.data import ImageDataModule
from ph2p_lit.errors import InputError
from ph2p_lit.inversion import PromptInversion
from ph2p_lit.runs import append_line, read_jsonl


def _invert(tiny_model, root, run_dir, **data_kw):
    module = PromptInversion(model=tiny_model, prompt_length=2, steps=2, max_iter=1, local_files_only=True,
                             init_prompt=None)
    data = ImageDataModule(root=str(root), batch_size=1, steps=2, model=tiny_model, **data_kw)
    trainer = L.Trainer(default_root_dir=run_dir, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[ResultsWriter()])
    trainer.fit(module, datamodule=data)


def _folder(tmp_path, n=3):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    return root


def test_append_cuts_a_torn_last_line_before_writing(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"image_id": "a"}\n{"image_id": "b", "pro')  # a crash mid-line
    append_line(path, {"image_id": "c"})
    assert path.read_text() == '{"image_id": "a"}\n{"image_id": "c"}\n'
    path.write_text('{"image_id": "torn')  # the only line torn
    append_line(path, {"image_id": "d"})
    assert read_jsonl(path) == [{"image_id": "d"}] and path.read_text().count("\n") == 1


def test_a_full_disk_mid_line_leaves_whole_lines_and_one_line_error(tmp_path, monkeypatch):
    path = tmp_path / "prompts.jsonl"
    append_line(path, {"image_id": "a"})

    def half_then_full(fd, data):
        runs.os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs, "_write", half_then_full)
    with pytest.raises(InputError, match="prompts.jsonl: cannot write .No space left on device.; free some space") as e:
        append_line(path, {"image_id": "b", "prompt": "x" * 100})
    assert "\n" not in str(e.value)
    assert path.read_text() == '{"image_id": "a"}\n'  # the half line was taken back


def test_a_read_only_run_folder_is_one_line(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if (folder / "probe").exists() or _writable(folder):
            pytest.skip("root ignores folder permissions here")
        with pytest.raises(InputError, match="not writable"):
            append_line(folder / "prompts.jsonl", {"image_id": "a"})
    finally:
        folder.chmod(0o700)


def _writable(folder) -> bool:
    try:
        (folder / "probe").write_text("")
        return True
    except OSError:
        return False


def test_disk_full_and_torn_line_mid_run_then_rerun_gives_every_image_once(tiny_model, tmp_path, monkeypatch):
    """Fault injection: the second image's line hits a full disk half-way; the run stops with the
    one-line error; a crash then tears a line; the rerun inverts what is missing, each image once."""
    root, run = _folder(tmp_path), tmp_path / "run"
    real, calls = runs._write, []

    def disk_full_on_second_result(fd, data):
        if b'"image_id"' in data and b"prompt" in data:
            calls.append(1)
            if len(calls) == 2:
                real(fd, data[:20])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(runs, "_write", disk_full_on_second_result)
    with pytest.raises(InputError, match="No space left"):
        _invert(tiny_model, root, run)
    monkeypatch.setattr(runs, "_write", real)
    assert [r["image_id"] for r in read_jsonl(run / "prompts.jsonl")] == ["img0.png"]
    with open(run / "prompts.jsonl", "a") as f:
        f.write('{"image_id": "img1.png", "prompt": "to')  # a crash tears the next line
    _invert(tiny_model, root, run)
    lines = (run / "prompts.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["image_id"] for line in lines) == ["img0.png", "img1.png", "img2.png"]


@pytest.mark.parametrize("damage", ["truncated_png", "truncated_jpeg", "garbage_middle_jpeg"])
def test_a_damaged_image_goes_to_failures_and_the_others_are_inverted(tiny_model, tmp_path, damage):
    root, run = _folder(tmp_path), tmp_path / "run"
    rng = np.random.default_rng(1)
    picture = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG" if damage == "truncated_png" else "JPEG")
    data = buffer.getvalue()
    if damage.startswith("truncated"):
        data = data[: len(data) // 2]  # verify() passes this; decoding it fails
    else:
        data = data[:200] + bytes(rng.integers(0, 255, len(data) - 400, dtype=np.uint8)) + data[-200:]
    name = "img1_bad.png" if damage == "truncated_png" else "img1_bad.jpg"
    (root / name).write_bytes(data)
    _invert(tiny_model, root, run)
    _invert(tiny_model, root, run)  # a rerun neither dies on it nor lists it twice
    assert sorted(r["image_id"] for r in read_jsonl(run / "prompts.jsonl")) == ["img0.png", "img1.png", "img2.png"]
    failures = read_jsonl(run / "failures.jsonl")
    assert [f["image_id"] for f in failures] == [name]


def test_another_ranks_results_reach_prompts_jsonl_on_one_process(tiny_model, tmp_path):
    """A DDP run resumed on one device: rank 1's finished lines are merged, not hidden."""
    root, run = _folder(tmp_path), tmp_path / "run"
    run.mkdir()
    (run / "prompts.rank1.jsonl").write_text(json.dumps({"image_id": "img1.png", "prompt": "from rank one"}) + "\n")
    _invert(tiny_model, root, run)
    rows = {r["image_id"]: r for r in read_jsonl(run / "prompts.jsonl")}
    assert sorted(rows) == ["img0.png", "img1.png", "img2.png"] and rows["img1.png"]["prompt"] == "from rank one"
    assert not (run / "prompts.rank1.jsonl").exists()


def test_a_results_line_without_image_id_is_a_one_line_error(tiny_model, tmp_path):
    root, run = _folder(tmp_path), tmp_path / "run"
    run.mkdir()
    (run / "prompts.jsonl").write_text('{"prompt": "no id"}\n')
    with pytest.raises(InputError, match="prompts.jsonl: a line without image_id"):
        _invert(tiny_model, root, run)


def test_evaluate_measures_the_others_when_an_image_is_missing(tiny_model, tmp_path, capsys):
    from ph2p_lit.evaluation import evaluate

    root = _folder(tmp_path)
    rows = [{"image_id": f"img{i}.png", "source": str(root / f"img{i}.png"), "source_root": str(root),
             "prompt": "a red star", "caption": ""} for i in range(3)]
    prompts = tmp_path / "run" / "prompts.jsonl"
    prompts.parent.mkdir()
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "img1.png").unlink()
    summary = evaluate(str(prompts), model=tiny_model, images_per_prompt=1, steps=2, clip_model=None, bert_model=None,
                       lpips_backbone="random", local_files_only=True, device="cpu")
    assert summary["images"] == 2 and [m["image_id"] for m in summary["missing"]] == ["img1.png"]
    assert json.loads((prompts.parent / "metrics.json").read_text())["missing"][0]["image_id"] == "img1.png"
    assert "skipping img1.png" in capsys.readouterr().out
    shutil.rmtree(prompts.parent)


# ---- one-line errors where a library would give a traceback -----------------------------------

def test_bad_metadata_lines_name_the_file_and_line(tmp_path):
    root = _folder(tmp_path)
    for text, expected in (('{"file_name": "img0.png", "text": "ok"}\n{not json\n', "line 2 is not JSON"),
                           ('{"text": "no file"}\n', "line 1 has no file_name")):
        (root / "metadata.jsonl").write_text(text)
        with pytest.raises(InputError, match=expected):
            ImageDataModule(root=str(root), resolution=16).setup()


def test_a_latin1_caption_file_is_read(tmp_path):
    root = _folder(tmp_path, n=1)
    (root / "img0.txt").write_bytes("un café crème".encode("latin-1"))
    data = ImageDataModule(root=str(root), resolution=16)
    data.setup()
    assert data.images.items[0]["caption"] == "un café crème"


@pytest.mark.parametrize("key, value", [("steps", -3), ("max_iter", 0), ("batch_size", 0), ("steps", 0)])
def test_counts_below_one_are_one_line_errors(key, value):
    with pytest.raises(InputError, match=f"model.{key}={value}: must be at least 1"):
        PromptInversion(**{key: value})


def test_data_batch_size_zero_is_a_one_line_error(tmp_path):
    with pytest.raises(InputError, match="data.batch_size=0"):
        ImageDataModule(root=str(tmp_path), batch_size=0)


def test_a_dataset_that_does_not_load_is_one_line(tmp_path):
    data = ImageDataModule(dataset=str(tmp_path / "no_such_dir"), resolution=16)
    with pytest.raises(InputError, match="data.dataset=.*no_such_dir.*cannot load it") as e:
        data.setup()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("part, damage", [("text_encoder", "model.safetensors"), ("tokenizer", "tokenizer.json")])
def test_a_corrupt_component_names_its_folder(tiny_model, copy_of, part, damage):
    from ph2p_lit.backbone import Backbone

    model = copy_of(tiny_model)
    target = next(p for p in (__import__("pathlib").Path(model) / part).iterdir() if p.name == damage)
    target.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputError, match=f"cannot load its {part}/") as e:
        Backbone.from_pretrained(model, local_files_only=True)
    assert "\n" not in str(e.value)


def test_a_checkpoint_path_that_is_missing_or_garbage_is_one_line(tiny_model, tmp_path, capsys):
    from ph2p_lit.cli import main

    root = _folder(tmp_path, n=1)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint" * 20)
    for path, expected in ((tmp_path / "none.ckpt", "no such file"), (garbage, "cannot resume from it")):
        with pytest.raises(SystemExit) as e:
            main(["invert", f"--model.model={tiny_model}", "--model.prompt_length=2", "--model.steps=1",
                  "--model.local_files_only=true", f"--data.root={root}", f"--trainer.default_root_dir={tmp_path / 'run'}",
                  "--trainer.callbacks=[{class_path: ph2p_lit.callbacks.ResultsWriter}]",
                  "--trainer.enable_progress_bar=false", f"--ckpt_path={path}"])
        assert expected in str(e.value.code) and "\n" not in str(e.value.code)


def test_a_second_run_on_a_busy_run_folder_stops_with_one_line(tiny_model, tmp_path):
    from ph2p_lit.runs import RunLock

    root, run = _folder(tmp_path), tmp_path / "run"
    run.mkdir()
    other = RunLock(run)
    other.acquire()  # a first run is writing there
    try:
        with pytest.raises(InputError, match="another run is writing to this run folder"):
            _invert(tiny_model, root, run)
        assert not (run / "prompts.jsonl").exists()
    finally:
        other.release()
    _invert(tiny_model, root, run)  # once it is done, the folder is free again
    assert len(read_jsonl(run / "prompts.jsonl")) == 3


def test_a_folder_of_only_bad_files_says_why(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"no readable images in .*\(1 could not be read; first: .*a.png"):
        ImageDataModule(root=str(root), resolution=16).setup()


def test_a_dark_16_bit_image_stays_dark():
    from ph2p_lit.images import to_rgb

    dark = Image.fromarray(np.full((4, 4), 200, dtype=np.uint16))
    assert dark.mode.startswith("I;16")
    assert np.asarray(to_rgb(dark)).max() <= 1  # 200 / 65535 of white, not 200 / 255


def test_a_checkpoint_of_another_prompt_length_is_one_line(tiny_model, tmp_path):
    from ph2p_lit.cli import main

    root = _folder(tmp_path, n=1)
    common = [f"--model.model={tiny_model}", "--model.steps=2", "--model.local_files_only=true", f"--data.root={root}",
              "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=true",
              "--trainer.callbacks=[{class_path: ph2p_lit.callbacks.ResultsWriter}, "
              "{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {every_n_train_steps: 1, save_last: true}}]"]
    main(["invert", "--model.prompt_length=2", f"--trainer.default_root_dir={tmp_path / 'a'}", *common])
    last = next((tmp_path / "a").rglob("last.ckpt"))
    with pytest.raises(SystemExit) as e:
        main(["invert", "--model.prompt_length=3", f"--trainer.default_root_dir={tmp_path / 'b'}", f"--ckpt_path={last}",
              *common])
    assert "cannot resume from it" in str(e.value.code) and "\n" not in str(e.value.code)


@pytest.mark.slow
def test_resuming_from_last_after_images_were_added_inverts_each_image_once(tiny_model, tmp_path):
    """--ckpt_path=last after a kill continues the image it stopped in, even though an image was
    added before it in the folder's order; after a finished run it inverts an image added since."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = _folder(tmp_path, n=3)  # img0, img1, img2
    common = [sys.executable, "-m", "ph2p_lit.cli", "invert", f"--model.model={tiny_model}", "--model.prompt_length=2",
              "--model.steps=4", "--model.max_iter=1", "--model.lr=20", "--model.refinement=null",
              f"--data.root={root}"]
    checkpoints = ["--trainer.enable_checkpointing=true", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                   "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_last=true"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}

    def run(name, *extra):
        done = subprocess.run([*common, f"--trainer.default_root_dir={tmp_path / name}", *checkpoints, *extra],
                              capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode in (0, -9), done.stderr[-3000:]
        return {r["image_id"]: r for r in read_jsonl(tmp_path / name / "prompts.jsonl")}

    killed = run("run", "--trainer.callbacks+=kill_callback.KillAtStep", "--trainer.callbacks.step=6")
    assert list(killed) == ["img0.png"]  # killed at step 2 of 4 of img1
    Image.fromarray(np.full((16, 16, 3), 90, dtype=np.uint8)).save(root / "img0b.png")  # sorts before img1
    resumed = run("run", "--ckpt_path=last")
    whole = run("whole")  # all four images, uninterrupted
    assert sorted(resumed) == sorted(whole) and all(r["steps"] == 4 for r in resumed.values())
    assert {k: r["token_ids"] for k, r in resumed.items()} == {k: r["token_ids"] for k, r in whole.items()}
    assert len(read_jsonl(tmp_path / "run" / "prompts.jsonl")) == 4  # each image once

    Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8)).save(root / "img3.png")
    after_finish = run("run", "--ckpt_path=last")
    assert sorted(after_finish) == sorted([*whole, "img3.png"])
    assert len(read_jsonl(tmp_path / "run" / "prompts.jsonl")) == 5


def test_links_that_loop_or_lead_nowhere_and_unreadable_folders_are_listed(tiny_model, tmp_path, monkeypatch):
    import os

    root = _folder(tmp_path, n=1)
    (root / "sub").mkdir()
    (root / "locked").mkdir()
    Image.new("RGB", (16, 16)).save(root / "sub" / "b.png")
    (root / "sub" / "loop").symlink_to(root)
    (root / "gone.png").symlink_to(tmp_path / "deleted.png")
    scandir = os.scandir

    def refuse_locked(path="."):
        if str(path).endswith("locked"):  # chmod 000 does not stop root, so refuse as the OS would
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse_locked)
    _invert(tiny_model, root, tmp_path / "run")
    assert sorted(r["image_id"] for r in read_jsonl(tmp_path / "run" / "prompts.jsonl")) == ["img0.png", "sub/b.png"]
    failures = {f["image_id"]: f["error"] for f in read_jsonl(tmp_path / "run" / "failures.jsonl")}
    assert set(failures) == {"sub/loop", "gone.png", "locked"}
    assert "already searched" in failures["sub/loop"] and "does not exist" in failures["gone.png"]
    assert "Permission denied" in failures["locked"]


def test_a_file_name_with_a_newline_keeps_to_its_row_of_the_table(tmp_path, capsys):
    from ph2p_lit.lightning_cli import print_table

    append_line(tmp_path / "prompts.jsonl", {"image_id": "two\nlines.png", "caption": "a\tb", "prompt": "a red star"})
    append_line(tmp_path / "prompts.jsonl", {"image_id": "plain.png", "caption": "c", "prompt": "a blue moon"})
    print_table(tmp_path)
    table = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(table) == 4  # header, two rows, the count
    assert table[2].startswith("two\\nlines.png") and table[2].endswith("a red star") and "a\\tb" in table[2]


def test_an_image_source_on_the_command_line_replaces_the_configs(tmp_path, capsys):
    from ph2p_lit.cli import main

    listing = tmp_path / "list.txt"
    listing.write_text("ph2p_lit/demo/images/render_1000_00000.png\n")
    with pytest.raises(SystemExit):
        main(["invert", "--config", "configs/demo.yaml", f"--data.files={listing}", "--print_config"])
    printed = capsys.readouterr().out
    assert "  root: null" in printed and f"  files: {listing}" in printed
    with pytest.raises(SystemExit):
        main(["reconstruct", "--config", "configs/reconstruct.yaml", "--data.prompt=a red star",
              "--data.root=ph2p_lit/demo/images", "--print_config"])
    printed = capsys.readouterr().out
    assert "  prompts: null" in printed and "  prompt: a red star" in printed
