"""The Python API: what `ph2p invert` and `ph2p reconstruct` do, from a notebook or a script.

    >>> from ph2p_lit import invert, reconstruct
    >>> rows = invert(["a.png", "b.png"], config="demo", run_dir="runs/mine", model={"steps": 10})
    >>> rebuilt = reconstruct("runs/mine/prompts.jsonl", model={"edit": "red->blue"})

The settings go through the same parser as the command line (the config's YAML, then the
keyword sections on top), so a config, the CLI and this function give the same run.
"""

import copy
import os
from pathlib import Path

import yaml

from .configs import packaged_config
from .errors import InputError
from .lightning_cli import INVERT_RUN_DIR, INVERT_SOURCES, own_run_folder, run_inversion, run_reconstruction
from .runs import RunFolder


def invert(
    images: str | Path | list[str | Path],
    config: str | None = "demo",
    run_dir: str | Path | None = None,
    model: dict | None = None,
    data: dict | None = None,
    trainer: dict | None = None,
    ckpt_path: str | None = None,
    table: bool = False,
) -> list[dict]:
    """Recover a prompt per image; returns one dict per image file given, in the order given: its
    line of prompts.jsonl, or, for a file that could not be read, its failures.jsonl entry
    (`image_id`, `source`, `error`; no `prompt`); None for one that data.limit left out. For a
    folder: a dict for each of that folder's images, sorted by image id (the run folder's other
    lines are not returned).

    images: image files, or one folder (searched as data.root).
    config: a YAML config file, or the name of a shipped one (demo, sd15, sd21, sdxl); None:
        the defaults alone.
    run_dir: the run folder (trainer.default_root_dir); None: the config's for the config's own
        images, else the config's folder, a dash and the images' folder name (runs/demo-my_images),
        as the command does. Images already done there are not inverted again: their lines are
        returned as they are.
    model, data, trainer: settings on top of the config's, as in its YAML sections, e.g.
        model={"steps": 100, "refinement": None}, trainer={"callbacks": []}.
    ckpt_path: resume from this checkpoint ("last": the run folder's newest).
    table: print the table of prompts, as the command does.
    """
    settings = _settings(config, run_dir, model, data, trainer)
    paths = [Path(images)] if isinstance(images, (str, Path)) else [Path(p) for p in images]
    if not paths:
        raise InputError("images: give one or more image files or a folder")
    source = {"root": str(paths[0])} if len(paths) == 1 and paths[0].is_dir() else {"files": [str(p) for p in paths]}
    config_data = settings["data"]
    settings["data"] = {**config_data, **{k: None for k in INVERT_SOURCES}, **source}  # these images, not the config's
    if run_dir is None and "default_root_dir" not in (trainer or {}):
        config_run_dir = settings["trainer"].get("default_root_dir", INVERT_RUN_DIR)
        settings["trainer"]["default_root_dir"] = own_run_folder(config_run_dir, config_data, settings["data"])
    if ckpt_path is not None:
        settings["ckpt_path"] = ckpt_path
    try:
        folder, image_ids, failures = run_inversion(settings, table=table)
    except InputError as e:  # the message says it all: raised from here, not under 40 lines of LightningCLI's stack
        raise e.with_traceback(None) from None
    rows = {row["image_id"]: row for row in RunFolder(folder).rows("prompts")}
    # This call's images only (not the folder's others); an image done before it became unreadable keeps its line.
    results = [rows[i] for i in image_ids if i in rows] + [f for f in failures if f["image_id"] not in rows]
    if "root" in source:
        return sorted(results, key=lambda result: result["image_id"])
    # invert writes each source as its absolute path; the inputs may be relative
    by_source = {os.path.abspath(result["source"]): result for result in results}
    return [by_source.get(os.path.abspath(p)) for p in paths]


def reconstruct(
    prompts: str | Path,
    config: str | None = None,
    run_dir: str | Path | None = None,
    model: dict | None = None,
    data: dict | None = None,
    trainer: dict | None = None,
) -> list[dict]:
    """Rebuild (or, with model={"edit": ...}, edit) each image of an invert run from its prompt by
    negative-prompt inversion; returns the lines of reconstructions.jsonl for these settings,
    sorted by image. Results already in the run folder with these settings are not redone.

    prompts: the prompts.jsonl of an invert run (or of `invert`'s run folder).
    config: a reconstruct config (e.g. "reconstruct"), or None for the defaults.
    run_dir: the run folder (trainer.default_root_dir); None: the config's, else runs/reconstruct.
    model, data, trainer: settings on top of the config's, by section, e.g. model={"guidance": 1.0}.
    """
    settings = _settings(config, run_dir, model, data, trainer)
    settings["data"] = {**settings["data"], "prompts": str(prompts), "prompt": None, "root": None, "files": None}
    try:
        folder, keys = run_reconstruction(settings)
    except InputError as e:  # as in invert
        raise e.with_traceback(None) from None
    rows = RunFolder(folder).rows("reconstructions")
    return sorted((r for r in rows if (r["image_id"], r.get("settings")) in keys), key=lambda r: r["image_id"])


def _settings(config: str | None, run_dir, model: dict | None, data: dict | None, trainer: dict | None) -> dict:
    """The config's settings with the call's on top, section by section."""
    settings = load_config(config)
    for section, values in (("model", model), ("data", data), ("trainer", trainer)):
        settings[section] = merged(settings.get(section) or {}, values or {})
    if run_dir is not None:
        settings["trainer"]["default_root_dir"] = str(run_dir)
    return settings


def merged(base: dict, override: dict) -> dict:
    """`override` on top of `base`, key by key at every depth, as `--model.refinement.budget 100`
    changes one key of the config's refinement block and keeps the rest. A value that is not a
    dict on both sides replaces (lists, None); so does a block naming another class_path, whose
    init_args belong to a different class."""
    result = copy.deepcopy(base)
    for key, value in override.items():
        old = result.get(key)
        same_class = not (isinstance(old, dict) and isinstance(value, dict)) or \
            value.get("class_path", old.get("class_path")) == old.get("class_path")
        if isinstance(old, dict) and isinstance(value, dict) and same_class:
            result[key] = merged(old, value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def load_config(config: str | None) -> dict:
    """A config file, or a shipped one by name, as a dict of sections; None: no settings."""
    if config is None:
        return {}
    path = Path(packaged_config(config))
    if not path.is_file():
        raise InputError(f"config={config}: no such file, and no shipped config of that name (demo, sd15, sd21, sdxl)")
    try:
        settings = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(settings, dict):
        raise InputError(f"{path}: expected model:, data: and trainer: sections")
    return settings
