import subprocess
import sys

import pytest

from ph2p_lit.cli import main
from ph2p_lit.runs import read_jsonl

PH2P = [sys.executable, "-m", "ph2p_lit.cli"]


def _run(args, **kw):
    return subprocess.run(PH2P + args, capture_output=True, text=True, timeout=600, **kw)


def test_help_lists_invert(capsys):
    main(["--help"])
    assert "invert" in capsys.readouterr().out


def test_unknown_command_is_one_clear_line():
    with pytest.raises(SystemExit, match="unknown command 'inverse'"):
        main(["inverse"])


def test_print_config_round_trip_and_results_per_image(tiny_model, image_folder, tmp_path):
    run_dir = tmp_path / "run"
    args = ["invert", f"--model.model={tiny_model}", "--model.prompt_length=3", "--model.steps=2",
            "--model.max_iter=2", "--model.english_words=true", f"--data.root={image_folder}",
            f"--trainer.default_root_dir={run_dir}"]
    printed = _run(args + ["--print_config"])
    assert printed.returncode == 0, printed.stderr
    config = tmp_path / "config.yaml"
    config.write_text(printed.stdout)
    result = _run(["invert", f"--config={config}"])
    assert result.returncode == 0, result.stderr[-3000:]
    # A quiet terminal: the progress bars, the table and where it is, nothing else (no seed notes,
    # accelerator lines, tips, weight-loading bars, model summary or library warnings).
    frames = [f.strip() for f in (result.stderr + result.stdout).replace("\r", "\n").splitlines() if f.strip()]
    bars = ("Epoch 0:", "invert:", "report:")  # Lightning draws one "Epoch 0" frame; ours overwrites it
    other = [f for f in frames if not f.startswith(bars)]
    assert other[0].split() == ["image", "caption", "prompt"], frames[:12]
    assert len(other) == 1 + 4 + 1, other  # the header, a row per image, the line naming prompts.jsonl
    rows = read_jsonl(run_dir / "prompts.jsonl")
    last_frame = [f for f in frames if f.startswith("invert:")][-1]  # ends on the last image's result
    assert f"prompt={next(r for r in rows if r['image_id'] == 'img3.png')['prompt'][:60]}," in last_frame
    assert sorted(r["image_id"] for r in rows) == [f"img{i}.png" for i in range(4)]
    assert (run_dir / "config.yaml").is_file()
    report = (run_dir / "report.html").read_text()  # written by every run (HTMLReport is a default callback)
    assert all(f"<td>img{i}.png</td>" in report for i in range(4))
    assert report.count("data:image/png;base64,") == 2 * 4  # each image's target and generated grid
    from ph2p_lit.backbone import Backbone
    from ph2p_lit.vocab import Vocabulary

    backbone = Backbone.from_pretrained(tiny_model)
    allowed = set(Vocabulary(backbone.tokenizer, backbone.token_table, english_words=True,
                             ascii_only=True).token_ids.tolist())
    for r in rows:
        assert r["prompt"].strip() and 1 <= len(r["token_ids"]) <= 3
        assert set(r["token_ids"]) <= allowed
        assert r["caption"] == f"caption {r['image_id'][3]}"
        assert r["steps"] == 2 and r["seconds"] > 0 and r["best_loss"] <= r["final_loss"] + 1e-6


def test_mistyped_key_is_reported_without_traceback(tiny_model, image_folder):
    result = _run(["invert", f"--model.model={tiny_model}", f"--data.root={image_folder}", "--model.promt_length=3"])
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "ph2p invert: error: unrecognized arguments: --model.promt_length=3 (did you mean --model.prompt_length?); "
        "`ph2p invert --help` lists the options"]  # one line, not sixty lines of usage first


@pytest.mark.parametrize("args, named", [
    (["invert", "--model.steps=abc"], 'Parser key "model.steps": Expected a'),
    (["generate", "--seedz", "3"], "--seedz 3 (did you mean --seed?)"),
    (["reconstruct", "--model.edt=a"], "--model.edt=a (did you mean --model.edit?)"),
])
def test_parse_errors_are_one_line_with_the_nearest_option(args, named, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert named in str(e.value.code) and "\n" not in str(e.value.code)
    assert f"`ph2p {args[0]} --help`" in str(e.value.code) and "usage:" not in capsys.readouterr().err


@pytest.mark.parametrize("override, named", [
    ("--data.root=/no/such/folder", "data.root=/no/such/folder"),
    ("--model.model=/no/such/model", "/no/such/model"),
    ("--model.t_max=5000", "model.t_max=5000"),
])
def test_bad_input_is_one_line_naming_the_key(tiny_model, image_folder, override, named, tmp_path):
    result = _run(["invert", f"--model.model={tiny_model}", f"--data.root={image_folder}", "--model.steps=1",
                   "--model.max_iter=1", "--model.prompt_length=2", f"--trainer.default_root_dir={tmp_path}", override])
    assert result.returncode != 0
    assert named in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_two_process_ddp_gives_the_prompts_of_one_process(tiny_model, image_folder, tmp_path):
    """Each of 3 images (an uneven split: 2 batches vs 1) inverted exactly once over 2 ranks
    (gloo), with the prompts of a single-process run: DDP must not average the gradients of
    different prompts, and the shorter rank must not leave the other waiting."""
    common = ["invert", f"--model.model={tiny_model}", "--model.prompt_length=3", "--model.steps=3",
              "--model.max_iter=2", "--model.lr=20", f"--data.root={image_folder}", "--data.limit=3",
              "--data.batch_size=1", "--trainer.accelerator=cpu"]
    prompts = {}
    for devices in (1, 2):
        run_dir = tmp_path / f"d{devices}"
        extra = ["--trainer.devices=2", "--trainer.strategy=ddp"] if devices == 2 else []
        result = _run(common + [f"--trainer.default_root_dir={run_dir}", *extra])
        assert result.returncode == 0, result.stderr[-3000:]
        rows = read_jsonl(run_dir / "prompts.jsonl")
        assert sorted(r["image_id"] for r in rows) == [f"img{i}.png" for i in range(3)]
        assert not list(run_dir.glob("prompts.rank*.jsonl"))
        prompts[devices] = {r["image_id"]: r["token_ids"] for r in rows}
    assert prompts[1] == prompts[2]


@pytest.mark.slow
def test_a_killed_run_resumes_mid_image_to_the_same_prompts(tiny_model, image_folder, tmp_path):
    """SIGKILL in the middle of the second image; the same command with --ckpt_path=last finishes
    with the prompts.jsonl of an uninterrupted run (the first image is not redone)."""
    import os
    from pathlib import Path

    common = ["invert", f"--model.model={tiny_model}", "--model.prompt_length=3", "--model.steps=6",
              "--model.max_iter=2", "--model.lr=20", f"--data.root={image_folder}", "--data.limit=3",
              "--model.score_every_n_steps=2", "--model.refinement.draws=4", "--model.refinement.screen_draws=2",
              "--model.refinement.budget=150"]  # the best so far and the refinement resume too
    checkpoints = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                   "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_last=true",
                   "--trainer.enable_checkpointing=true"]
    whole = tmp_path / "whole"
    assert _run(common + [f"--trainer.default_root_dir={whole}"]).returncode == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    run = common + [f"--trainer.default_root_dir={killed}"] + checkpoints
    first = _run(run + ["--trainer.callbacks+=kill_callback.KillAtStep", "--trainer.callbacks.step=9"], env=env)
    assert first.returncode == -9  # SIGKILL at step 9: image 1 done, image 2 at step 3 of 6
    assert len(read_jsonl(killed / "prompts.jsonl")) == 1
    second = _run(run + ["--ckpt_path=last"])
    assert second.returncode == 0, second.stderr[-3000:]
    rows = read_jsonl(killed / "prompts.jsonl")
    expected = {r["image_id"]: r["token_ids"] for r in read_jsonl(whole / "prompts.jsonl")}
    assert [r["image_id"] for r in rows] == sorted(expected)  # each image once, in order
    assert {r["image_id"]: r["token_ids"] for r in rows} == expected
    assert all("refinement" in r for r in rows)


def test_no_progress_bar_with_the_default_callbacks(tiny_model, image_folder, tmp_path):
    main(["invert", f"--model.model={tiny_model}", "--model.prompt_length=2", "--model.steps=1", "--model.max_iter=1",
          "--model.refinement=null", f"--data.root={image_folder}", "--data.limit=1", "--trainer.enable_progress_bar=false",
          f"--trainer.default_root_dir={tmp_path}"])
    assert len(read_jsonl(tmp_path / "prompts.jsonl")) == 1


@pytest.mark.parametrize("config", ["demo", "sd15", "sd21", "sdxl"])
def test_every_invert_config_parses(config, capsys):
    with pytest.raises(SystemExit) as e:
        main(["invert", "--config", f"configs/{config}.yaml", "--print_config"])
    assert e.value.code in (None, 0)
    assert "model:" in capsys.readouterr().out


def test_the_demo_runs_from_any_folder(tmp_path):
    """Installed, not in a clone: `--config configs/demo.yaml` (or `demo`) finds the shipped
    config, and its data.root `demo` the shipped images."""
    result = _run(["invert", "--config", "configs/demo.yaml", "--data.limit=1", "--model.steps=1", "--model.max_iter=1",
                   "--model.refinement=null", "--trainer.default_root_dir=run"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(read_jsonl(tmp_path / "run" / "prompts.jsonl")) == 1
    result = _run(["train-demo", "--config", "train_demo", "--print_config"], cwd=tmp_path)
    assert result.returncode == 0 and "out_dir: runs/demo_model" in result.stdout  # never the shipped model


def test_a_gpu_config_on_a_machine_without_one_is_one_line(tiny_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as e:
        main(["invert", "--config", "configs/sd15.yaml", f"--model.model={tiny_model}", "--data.root=."])
    assert str(e.value.code).startswith("ph2p invert: error: trainer:") and "\n" not in str(e.value.code)


def test_every_option_of_every_command_has_a_line_of_meaning():
    """`--help` describes each option: every parameter is in its class's or function's Args."""
    import inspect

    from docstring_parser import parse

    from ph2p_lit.compose import compose
    from ph2p_lit.data import ImageDataModule, PromptedImages
    from ph2p_lit.demo.caption_lm import train_caption_lm
    from ph2p_lit.demo.train import train_demo
    from ph2p_lit.evaluation import evaluate
    from ph2p_lit.generate import generate_grids
    from ph2p_lit.inversion import PromptInversion
    from ph2p_lit.reconstruction import Reconstruction

    for thing in (PromptInversion, ImageDataModule, PromptedImages, Reconstruction, generate_grids, evaluate,
                  compose, train_demo, train_caption_lm):
        doc = parse(thing.__doc__)
        described = {p.arg_name for p in doc.params if p.description}
        signature = inspect.signature(thing.__init__ if inspect.isclass(thing) else thing)
        assert set(signature.parameters) - {"self"} <= described, thing.__name__
        assert doc.short_description.endswith("."), thing.__name__  # help's first line is a whole sentence
