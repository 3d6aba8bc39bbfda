"""The Python API: `from ph2p_lit import invert`, the same parser and run folder as the command."""

import pytest
import yaml

from ph2p_lit import invert
from ph2p_lit.errors import InputError
from ph2p_lit.runs import read_jsonl


@pytest.fixture()
def config(tmp_path, tiny_model):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"model": tiny_model, "prompt_length": 2, "steps": 2, "max_iter": 1, "init_prompt": None},
        "data": {"root": "demo", "batch_size": 2},  # the config's images: the call's replace them
        "trainer": {"default_root_dir": str(tmp_path / "from_config"), "enable_progress_bar": False},
    }))
    return str(path)


def test_invert_returns_a_line_per_image_in_the_order_given(config, image_folder, tmp_path):
    files = [f"{image_folder}/img2.png", f"{image_folder}/img0.png"]
    rows = invert(files, config=config, run_dir=tmp_path / "run", model={"steps": 3})
    assert [r["source"] for r in rows] == files
    assert all(r["steps"] == 3 and r["prompt"] for r in rows)  # the keyword section overrides the config
    written = read_jsonl(tmp_path / "run" / "prompts.jsonl")
    assert sorted(r["image_id"] for r in written) == sorted(r["image_id"] for r in rows)
    assert (tmp_path / "run" / "report.html").is_file()  # the config's callbacks ran (the defaults here)
    # Again, with one more image: the two done are returned as they are, only the new one is inverted.
    again = invert([*files, f"{image_folder}/img1.png"], config=config, run_dir=tmp_path / "run", model={"steps": 3})
    assert again[:2] == rows and len(again) == 3
    assert len(read_jsonl(tmp_path / "run" / "prompts.jsonl")) == 3


def test_a_folder_gets_a_run_folder_beside_the_configs(config, image_folder, tmp_path):
    rows = invert(image_folder, config=config, trainer={"callbacks": []})
    assert [r["image_id"] for r in rows] == [f"img{i}.png" for i in range(4)]
    # Not the config's images (demo): a run folder of their own, named after their folder.
    own = tmp_path / f"from_config-{image_folder.rstrip('/').split('/')[-1]}"
    assert (own / "prompts.jsonl").is_file() and not (tmp_path / "from_config").exists()


def test_bad_settings_are_one_line(config, image_folder):
    with pytest.raises(InputError, match="prompt_lenght"):
        invert([f"{image_folder}/img0.png"], config=config, model={"prompt_lenght": 3})
    with pytest.raises(InputError, match="no such file"):
        invert([f"{image_folder}/img0.png"], config="no_such_config.yaml")


def test_reconstruct_returns_the_lines_of_its_own_settings(config, image_folder, tmp_path, tiny_model):
    from ph2p_lit import reconstruct

    invert([f"{image_folder}/img0.png", f"{image_folder}/img1.png"], config=config, run_dir=tmp_path / "inv",
           trainer={"callbacks": []})
    model = {"model": tiny_model, "steps": 2, "lpips_backbone": "random"}
    quiet = {"enable_progress_bar": False}
    plain = reconstruct(tmp_path / "inv" / "prompts.jsonl", run_dir=tmp_path / "rec", model=model, trainer=quiet)
    edited = reconstruct(tmp_path / "inv" / "prompts.jsonl", run_dir=tmp_path / "rec", trainer=quiet,
                         model={**model, "edit": "x->y", "guidance": 1.0})
    ids = [f"{image_folder}/img0.png", f"{image_folder}/img1.png"]  # listed files keep their paths as ids
    assert [r["image_id"] for r in plain] == [r["image_id"] for r in edited] == ids
    assert all(r["edit"] == "" for r in plain) and all(r["edit"] == "x->y" for r in edited)
    assert {r["settings"] for r in plain}.isdisjoint({r["settings"] for r in edited})
    assert len(read_jsonl(tmp_path / "rec" / "reconstructions.jsonl")) == 4
    again = reconstruct(tmp_path / "inv" / "prompts.jsonl", run_dir=tmp_path / "rec", model=model, trainer=quiet)
    assert again == plain and len(read_jsonl(tmp_path / "rec" / "reconstructions.jsonl")) == 4


def test_nested_settings_change_one_key_as_the_command_line_does():
    from ph2p_lit.api import _settings, load_config

    demo = load_config("demo")["model"]["refinement"]
    settings = _settings("demo", None, {"refinement": {"budget": 100}}, None, None)
    # --model.refinement.budget 100 keeps the block's language model, window, draws and prior weight.
    assert settings["model"]["refinement"] == {**demo, "budget": 100}
    assert settings["model"]["steps"] == load_config("demo")["model"]["steps"]
    off = _settings("demo", None, {"refinement": None}, None, None)
    assert off["model"]["refinement"] is None  # None still switches the refinement off
    callbacks = _settings("demo", None, None, None, {"callbacks": []})
    assert callbacks["trainer"]["callbacks"] == []  # a list replaces the config's list
