"""The Python API: what `ph2p invert` and `ph2p reconstruct` do, from a notebook or a script.

    >>> from ph2p_lit import invert, reconstruct
    >>> rows = invert(["a.png", "b.png"], config="demo", model={"steps": 10})
    >>> rebuilt = reconstruct("runs/demo/prompts.jsonl", model={"edit": "red->blue"})

The settings go through the same parser as the command line (the config's YAML, then the
keyword sections on top), so a config, the CLI and this function give the same run.
"""

import copy
from pathlib import Path

import yaml

from .configs import packaged_config
from .errors import InputError
from .lightning_cli import run_inversion, run_reconstruction
from .runs import RunFolder

SOURCES = ("root", "files", "dataset")


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
    """Recover a prompt per image; returns their lines of prompts.jsonl, in the order given.

    images: image files, or one folder (searched as data.root).
    config: a YAML config file, or the name of a shipped one (demo, sd15, sd21, sdxl); None:
        the defaults alone.
    run_dir: the run folder (trainer.default_root_dir); None: the config's. Images already done
        there are not inverted again: their lines are returned as they are.
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
    settings["data"] = {**settings["data"], **{k: None for k in SOURCES}, **source}  # these images, not the config's
    if ckpt_path is not None:
        settings["ckpt_path"] = ckpt_path
    try:
        folder = run_inversion(settings, table=table)
    except InputError as e:  # the message says it all: raised from here, not under 40 lines of LightningCLI's stack
        raise e.with_traceback(None) from None
    rows = RunFolder(folder).rows("prompts")
    if "root" in source:
        return sorted(rows, key=lambda row: row["image_id"])
    by_source = {row.get("source"): row for row in rows}
    return [by_source[str(p)] for p in paths if str(p) in by_source]


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
        settings.setdefault(section, {}).update(copy.deepcopy(values or {}))
    if run_dir is not None:
        settings["trainer"]["default_root_dir"] = str(run_dir)
    return settings


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
